"""Start the CDS service: `python -m services.cds`."""

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

import ollama
from arxio.cds.v1 import cds_pb2_grpc

from services.cds.knowledge_base import load_knowledge_base
from services.cds.servicer import ClinicalReviewServicer
from services.common.config import ConfigError, Environment, ServerConfig
from services.common.server import Registration, run_service, serve


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def checked_ollama_host(value: str) -> str:
    """Accept an Ollama URL on loopback, or over TLS anywhere else."""
    if "://" not in value:
        value = "http://" + value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"OLLAMA_HOST={value!r} is invalid: expected http://HOST:PORT "
            "or https://HOST:PORT"
        )
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ConfigError(
            f"OLLAMA_HOST={value!r} sends patient data unencrypted off this "
            "machine: use https:// or a loopback address"
        )

    return value


@dataclass(frozen=True)
class CdsConfig:
    server: ServerConfig
    ollama_host: str
    model: str
    # Seconds the model review may take before the findings return without it.
    model_timeout: float

    @classmethod
    def from_env(cls, env: Environment) -> "CdsConfig":
        return cls(
            server=ServerConfig.from_env(env, default_port=50052),
            ollama_host=checked_ollama_host(env.text("OLLAMA_HOST")),
            model=env.text("ARXIO_MODEL", "gemma3:270m"),
            model_timeout=env.number(
                "ARXIO_MODEL_TIMEOUT_SECONDS", 30.0, minimum=0.1
            ),
        )


async def main() -> None:
    config = CdsConfig.from_env(Environment())
    knowledge_base = load_knowledge_base()
    client = ollama.AsyncClient(host=config.ollama_host)
    servicer = ClinicalReviewServicer(
        knowledge_base, client, config.model, config.model_timeout
    )
    # The screening needs only the knowledge base, loaded above; a model
    # outage degrades the review but does not make the service unready.
    await serve(
        "cds",
        config.server,
        [
            Registration(
                cds_pb2_grpc.add_ClinicalDecisionSupportServiceServicer_to_server,
                servicer,
                "arxio.cds.v1.ClinicalDecisionSupportService",
            )
        ],
    )


if __name__ == "__main__":
    run_service("cds", main)
