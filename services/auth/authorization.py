"""Envoy's `envoy.service.auth.v3.Authorization` over the auth decision."""

import base64
import urllib.parse

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2
from sqlalchemy.exc import SQLAlchemyError

from services.auth.decision import (
    API_KEY_HEADER,
    AUTHORIZATION_HEADER,
    IDENTITY_HEADERS,
    AuthDecider,
    Decision,
    RequestFacts,
    denial_status,
    error_body,
)
from services.auth.quota import QuotaUnavailable
from services.common import metrics
from services.common.edge_replies import AUTH_UNAVAILABLE_MESSAGE
from services.common.logging import bind_rpc_fields

log = structlog.get_logger()

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=_OVERWRITE,
    )


def _metadata(decision: Decision) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    metadata.update(decision.metadata)
    if not decision.allowed:
        # The code of the denial's JSON body, which the access log records
        # for REST callers: Envoy derives no gRPC code from it.
        metadata["grpc_status"] = str(decision.code.value[0])

    return metadata


def _is_grpc(facts: RequestFacts) -> bool:
    return facts.headers.get("content-type", "").startswith("application/grpc")


def check_response(
    facts: RequestFacts, decision: Decision
) -> external_auth_pb2.CheckResponse:
    """Convert a decision to Envoy's CheckResponse."""
    if decision.allowed:
        removed = [API_KEY_HEADER, AUTHORIZATION_HEADER]
        removed += [
            name
            for name in IDENTITY_HEADERS
            if name not in decision.upstream_headers
        ]

        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=0),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[
                    _header(name, value)
                    for name, value in decision.upstream_headers.items()
                ],
                headers_to_remove=removed,
                response_headers_to_add=[
                    _header(name, value)
                    for name, value in decision.response_headers.items()
                ],
            ),
            dynamic_metadata=_metadata(decision),
        )

    headers = dict(decision.response_headers)
    if _is_grpc(facts):
        # Without grpc-status Envoy maps the HTTP status for gRPC callers,
        # and 429 would become UNAVAILABLE instead of RESOURCE_EXHAUSTED.
        headers["grpc-status"] = str(decision.code.value[0])
        headers["grpc-message"] = urllib.parse.quote(decision.message)
        # The details a gRPC client reads: field violations, request id.
        headers["grpc-status-details-bin"] = base64.b64encode(
            denial_status(decision, facts.request_id).SerializeToString()
        ).decode()
        headers["content-type"] = "application/grpc"
        body = ""
    else:
        headers["content-type"] = "application/json"
        body = error_body(decision, facts.request_id)

    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(
            code=decision.code.value[0], message=decision.message
        ),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.http_status),
            headers=[_header(name, value) for name, value in headers.items()],
            body=body,
        ),
        dynamic_metadata=_metadata(decision),
    )


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, decider: AuthDecider) -> None:
        self._decider = decider

    async def Check(self, request, context):
        http = request.attributes.request.http
        headers = {key.lower(): value for key, value in http.headers.items()}
        facts = RequestFacts(
            http_method=http.method,
            path=http.path,
            headers=headers,
            request_id=headers.get("x-request-id", ""),
            body=http.raw_body or http.body.encode(),
        )
        try:
            decision = await self._decider.decide(facts)
        except (SQLAlchemyError, QuotaUnavailable, OSError) as error:
            # Fail closed: no decision means no access.
            log.error(
                "auth.decision_failed",
                error=type(error).__name__,
                request_id=facts.request_id,
            )
            decision = Decision(
                False,
                grpc.StatusCode.UNAVAILABLE,
                AUTH_UNAVAILABLE_MESSAGE,
            )
        metrics.AUTH_DECISIONS.labels(decision.code.name).inc()
        # The server's one line for this RPC carries these fields.
        bind_rpc_fields(
            allowed=decision.allowed,
            decision=decision.code.name,
            request_id=facts.request_id,
            action=decision.metadata.get("action", ""),
            org_id=decision.metadata.get("org_id", ""),
            key_id=decision.metadata.get("key_id", ""),
        )

        return check_response(facts, decision)
