"""Start the CDS service: `python -m services.cds`."""

import gc
from dataclasses import dataclass

import ollama
from arxio.cds.v1 import cds_pb2_grpc

from services.cds import hooks
from services.cds.knowledge_base import load_knowledge_base
from services.cds.model_config import ModelConfig
from services.cds.model_presence import MODEL_HEALTH_NAME, ModelPresence
from services.cds.model_reviewer import ModelReviewer
from services.cds.servicer import ClinicalReviewServicer
from services.common.config import Environment, ServerConfig
from services.common.server import (
    DependencyHealth,
    Registration,
    run_service,
    serve,
)


@dataclass(frozen=True)
class CdsConfig:
    server: ServerConfig
    model: ModelConfig

    @classmethod
    def from_env(cls, env: Environment) -> "CdsConfig":
        return cls(
            server=ServerConfig.from_env(env, default_port=50052),
            model=ModelConfig.from_env(env),
        )


async def main() -> None:
    config = CdsConfig.from_env(Environment())
    knowledge_base = load_knowledge_base()
    # The knowledge base and the loaded modules live as long as the process:
    # moved out of the collector's reach, they no longer make each full
    # collection a pause of several milliseconds in a screening.
    gc.freeze()
    client = ollama.AsyncClient(host=config.model.ollama_host)
    servicer = ClinicalReviewServicer(
        knowledge_base, ModelReviewer(client, config.model)
    )
    presence = ModelPresence(client, config.model.model)
    # The screening needs only the knowledge base, loaded above, so the
    # service's own names are SERVING from the start. The model has its
    # own health-check name, NOT_SERVING until the server lists the model.
    await serve(
        "cds",
        config.server,
        [
            Registration(
                cds_pb2_grpc.add_ClinicalDecisionSupportServiceServicer_to_server,
                servicer,
                "arxio.cds.v1.ClinicalDecisionSupportService",
            ),
            hooks.registration(
                knowledge_base, client, config.model, Environment()
            ),
        ],
        on_stop=client.close,
        dependencies=[
            DependencyHealth(
                MODEL_HEALTH_NAME,
                presence.check,
                config.model.check_interval,
            )
        ],
    )


if __name__ == "__main__":
    run_service("cds", main)
