"""HL7 CDS Hooks 2.0 over the screening engine, with FHIR R4 input.

`registration` builds the gRPC service that the edge exposes at
`/cds-services`: discovery, the order-select, order-sign and patient-view
services, and feedback.
"""

import ollama
from arxio.cds.v1 import hooks_pb2_grpc

from services.cds.hooks.servicer import CdsHooksServicer
from services.cds.hooks.store import FeedbackStore
from services.cds.knowledge_base import KnowledgeBase
from services.cds.model_config import ModelConfig
from services.cds.model_reviewer import ModelReviewer
from services.common import db
from services.common.config import Environment
from services.common.server import Registration


def registration(
    knowledge_base: KnowledgeBase,
    client: ollama.AsyncClient,
    model_config: ModelConfig,
    env: Environment,
) -> Registration:
    """Build the CDS Hooks servicer from the CDS service's settings.

    DATABASE_URL, when set, is where feedback is recorded. Without it the
    hooks still return cards, and feedback calls get UNAVAILABLE.
    """
    database_url = env.optional("DATABASE_URL")
    store = None
    if database_url:
        # A small pool: feedback is the only database work of this service.
        engine = db.create_pooled_engine(
            database_url, db.PoolSettings.from_env(env, 2)
        )
        store = FeedbackStore(db.session_factory(engine))
    # NOTE: this reviewer has its own concurrency limit and circuit breaker,
    # apart from ClinicalReview's, so model calls of both can add up to
    # twice ARXIO_MODEL_CONCURRENCY. Hooks use it only for organizations
    # that enabled the model review.
    reviewer = ModelReviewer(client, model_config)

    return Registration(
        hooks_pb2_grpc.add_CdsHooksServiceServicer_to_server,
        CdsHooksServicer(knowledge_base, reviewer, store),
        "arxio.cds.v1.CdsHooksService",
    )
