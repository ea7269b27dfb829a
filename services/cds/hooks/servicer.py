"""The CdsHooksService RPCs: discovery, hook calls and feedback.

Bodies arrive and leave as raw JSON (`google.api.HttpBody`). A hook call
is PHI: it lives only in this call's memory, and log lines carry ids,
counts and durations only.
"""

import datetime
import json
import time

import grpc
import structlog
from arxio.cds.v1 import hooks_pb2_grpc
from google.api import httpbody_pb2
from google.protobuf import json_format
from sqlalchemy.exc import SQLAlchemyError

from services.cds.hooks.cards import build_cards
from services.cds.hooks.discovery import SERVICES, discovery_document
from services.cds.hooks.feedback import read_feedback, rule_index
from services.cds.hooks.hook_request import (
    MissingPrefetch,
    map_hook_request,
    parse_json,
)
from services.cds.hooks.mapping import InvalidFhir
from services.cds.hooks.store import FeedbackStore
from services.cds.knowledge_base import KnowledgeBase
from services.cds.model_reviewer import RESPONSE_RESERVE, ModelReviewer
from services.cds.screening import screen
from services.common.errors import abort, abort_invalid, build_status
from services.common.identity import (
    HOOKS_MODEL_TIMEOUT_HEADER,
    caller_org_id,
    metadata_value,
    request_id_of,
)

log = structlog.get_logger()

# Set by the edge to the content type the client sent, before transcoding
# (ORIGINAL_CONTENT_TYPE_HEADER in services/launcher/envoy_config.py).
ORIGINAL_CONTENT_TYPE_HEADER = "x-arxio-original-content-type"
# Response metadata that the edge's CDS Hooks routes turn into the HTTP
# status (CDS_HOOKS_STATUS_HEADER in services/launcher/envoy_config.py).
HTTP_STATUS_HEADER = "x-arxio-http-status"


def json_body(document: dict) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(
        content_type="application/json",
        data=json.dumps(document, separators=(",", ":")).encode(),
    )


def model_timeout(context: grpc.aio.ServicerContext) -> float:
    """Return the organization's hook model deadline in seconds, or 0."""
    raw = metadata_value(context, HOOKS_MODEL_TIMEOUT_HEADER)
    try:
        return max(int(raw), 0) / 1000
    except ValueError:
        return 0.0


class CdsHooksServicer(hooks_pb2_grpc.CdsHooksServiceServicer):
    def __init__(
        self,
        knowledge_base: KnowledgeBase,
        model_reviewer: ModelReviewer | None,
        feedback_store: FeedbackStore | None,
        clock=lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self._kb = knowledge_base
        self._model_reviewer = model_reviewer
        self._feedback_store = feedback_store
        self._rule_index = rule_index(knowledge_base)
        self._clock = clock

    async def _service(self, context, service_id: str):
        service = SERVICES.get(service_id)
        if service is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no CDS service {service_id[:100]!r}: list them at "
                "GET /cds-services",
            )

        return service

    async def _document(self, context, body: httpbody_pb2.HttpBody):
        try:
            return parse_json(body.data, body.content_type)
        except InvalidFhir as error:
            await abort_invalid(context, error.violations)

    async def ListHookServices(self, request, context):
        return json_body(discovery_document())

    async def CallHookService(self, request, context):
        service = await self._service(context, request.service_id)
        document = await self._document(context, request.body)
        try:
            mapped = map_hook_request(
                service, document, self._kb, self._clock().date()
            )
        except MissingPrefetch as missing:
            return await self._missing_prefetch(context, service, missing)
        except InvalidFhir as error:
            await abort_invalid(context, error.violations)

        started = time.perf_counter()
        screening = screen(mapped.request, self._kb)
        model_review = await self._model_review(context, mapped, screening)
        cards = build_cards(
            service, mapped, screening, self._kb.version, model_review
        )
        log.info(
            "hooks.cards",
            service_id=service.id,
            medications=len(mapped.request.medications),
            findings=len(screening.findings),
            cards=len(cards),
            screening_ms=round((time.perf_counter() - started) * 1000, 2),
        )

        return json_body({"cards": cards})

    async def _missing_prefetch(self, context, service, missing):
        """Return 412 over REST, or abort FAILED_PRECONDITION over gRPC."""
        message = (
            "the request lacks the prefetch key(s) "
            f"{', '.join(missing.keys)} that service {service.id} needs: "
            "send each key, with null when the EHR has no data for it"
        )
        original = metadata_value(context, ORIGINAL_CONTENT_TYPE_HEADER)
        if original.startswith("application/grpc"):
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, message)
        log.info(
            "hooks.prefetch_missing",
            service_id=service.id,
            keys=missing.keys,
        )
        await context.send_initial_metadata(((HTTP_STATUS_HEADER, "412"),))
        status = build_status(
            grpc.StatusCode.FAILED_PRECONDITION,
            message,
            request_id_of(context),
        )

        return json_body(json_format.MessageToDict(status))

    async def _model_review(self, context, mapped, screening):
        timeout = model_timeout(context)
        if timeout <= 0 or self._model_reviewer is None:
            return None
        remaining = context.time_remaining()
        budget = timeout + RESPONSE_RESERVE
        if remaining is not None:
            budget = min(budget, remaining)
        review, _ = await self._model_reviewer.review(
            mapped.request,
            screening.findings,
            caller_org_id(context),
            budget,
        )

        return review

    async def RecordHookFeedback(self, request, context):
        service = await self._service(context, request.service_id)
        document = await self._document(context, request.body)
        try:
            rows = read_feedback(document, self._rule_index)
        except InvalidFhir as error:
            await abort_invalid(context, error.violations)
        if self._feedback_store is None:
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "feedback cannot be recorded: the CDS service has no "
                "database (DATABASE_URL is not set)",
            )
        org_id = caller_org_id(context)
        if not org_id:
            await abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "no organization on the request: call through the edge",
            )
        try:
            await self._feedback_store.insert(
                org_id, service.id, request_id_of(context), rows
            )
        except (SQLAlchemyError, OSError) as error:
            log.error(
                "hooks.feedback_failed",
                service_id=service.id,
                error=type(error).__name__,
            )
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "feedback could not be recorded: the database is "
                "unavailable; retry shortly",
            )
        log.info(
            "hooks.feedback_recorded",
            service_id=service.id,
            items=len(rows),
            overridden=sum(row.outcome == "overridden" for row in rows),
        )

        return json_body({})
