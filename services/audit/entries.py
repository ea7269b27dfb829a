"""Turn Envoy's HTTP access-log entries into audit rows.

A row holds ids, the route and the outcome, never a header value other than
the ones listed here, and never a body, so no PHI and no key reaches it.
"""

import datetime
import uuid
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2

from services.common import methods
from services.common.errors import HTTP_STATUS_OF_CODE

EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
# Action of requests that matched no API method.
UNROUTED_ACTION = "edge.unrouted"


@dataclass(frozen=True)
class AuditRow:
    event_id: uuid.UUID
    time: datetime.datetime
    org_id: str | None
    key_id: str | None
    action: str
    resource_type: str
    method: str
    endpoint: str
    status_code: int
    grpc_status: int | None
    response_time_ms: int
    request_id: str
    client_address: str


def _grpc_status(entry: accesslog_pb2.HTTPAccessLogEntry) -> int | None:
    response = entry.response
    for source in (response.response_trailers, response.response_headers):
        value = source.get("grpc-status")
        if value is not None and value.isdigit():
            return int(value)

    return None


def _duration_ms(common: accesslog_pb2.AccessLogCommon) -> int:
    if common.HasField("duration"):
        return common.duration.ToMilliseconds()

    return common.time_to_last_downstream_tx_byte.ToMilliseconds()


def audit_row(entry: accesslog_pb2.HTTPAccessLogEntry) -> AuditRow | None:
    """Build the row of one entry; None for an entry with no request id."""
    common = entry.common_properties
    request = entry.request
    if not request.request_id:
        return None
    # The edge records the method before transcoding; see envoy_config.py.
    http_method = request.request_headers.get(
        "x-arxio-original-method"
    ) or base_pb2.RequestMethod.Name(request.request_method)
    endpoint = (request.original_path or request.path).split("?", 1)[0]
    authz = common.metadata.filter_metadata.get(EXT_AUTHZ_NAMESPACE)
    decided = dict(authz.fields) if authz is not None else {}

    def decided_text(name: str) -> str:
        value = decided.get(name)
        return value.string_value if value is not None else ""

    method = methods.find_method(http_method, endpoint)
    action = decided_text("action") or (
        method.action if method else UNROUTED_ACTION
    )
    resource_type = decided_text("resource_type") or (
        method.resource_type if method else ""
    )
    status_code = entry.response.response_code.value
    grpc_status = _grpc_status(entry)
    is_grpc = request.request_headers.get("content-type", "").startswith(
        "application/grpc"
    )
    if is_grpc and grpc_status is not None:
        # gRPC answers HTTP 200 even on errors: the outcome is grpc-status.
        status_code = HTTP_STATUS_OF_CODE.get(grpc_status, 500)

    return AuditRow(
        event_id=uuid.uuid4(),
        time=common.start_time.ToDatetime(datetime.UTC),
        org_id=decided_text("org_id") or None,
        key_id=decided_text("key_id") or None,
        action=action,
        resource_type=resource_type,
        method=http_method,
        endpoint=endpoint[:2048],
        status_code=status_code,
        grpc_status=grpc_status,
        response_time_ms=_duration_ms(common),
        request_id=request.request_id[:200],
        client_address=common.downstream_remote_address.socket_address.address,
    )
