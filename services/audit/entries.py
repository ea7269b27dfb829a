"""Turn the edge's JSON access-log lines into audit rows.

The edge writes one JSON object per request (see `ACCESS_LOG_FORMAT` in
services/launcher/envoy_config.py). A row contains ids, the route's
endpoint template and the outcome: never the request's path, a header
value other than the ones listed there, a query string or a body, so no
PHI and no key reaches it.
"""

import datetime
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from google.rpc import code_pb2

from services.common import methods
from services.common.edge_replies import LOCAL_REPLY_CODES
from services.common.errors import HTTP_STATUS_OF_CODE

# Action of requests that matched no API method.
UNROUTED_ACTION = "edge.unrouted"
# Prefix of the request id an entry gets when the edge made none.
UNASSIGNED_REQUEST_ID_PREFIX = "unassigned-"
# Prefix of the request id an entry gets in place of an id that the edge
# did not generate, or that an entry already has. Nothing of that id is
# kept.
REPLACED_REQUEST_ID_PREFIX = "replaced-"
# The form of the ids that Envoy's UUID request id extension generates and
# that the local reply mappers' %UNIQUE_ID% gives: a UUID in lowercase hex.
# The version digit is not checked, because Envoy may overwrite it with a
# tracing decision (the extension's pack_trace_reason).
EDGE_REQUEST_ID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
)
# Endpoint of requests that matched no API method.
UNROUTED_ENDPOINT = "(unrouted)"
# Action of an entry whose access-log line was too long to parse.
UNREADABLE_ACTION = "edge.unreadable_log_line"
MAX_ENDPOINT_LENGTH = 2048


class InvalidLogLine(ValueError):
    """An access-log line that does not describe a request."""


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


def _text(line: Mapping, name: str) -> str:
    """Return a field as text; Envoy writes "-" or null for unset values."""
    value = line.get(name)
    if value is None or value == "-":
        return ""

    return str(value)


def _integer(line: Mapping, name: str) -> int | None:
    text = _text(line, name)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidLogLine(f"{name} {text[:32]!r} is not a number") from None


def _time(line: Mapping) -> datetime.datetime:
    text = _text(line, "time")
    try:
        return datetime.datetime.strptime(
            text, "%Y-%m-%dT%H:%M:%S.%fZ"
        ).replace(tzinfo=datetime.UTC)
    except ValueError:
        raise InvalidLogLine(f"time {text[:40]!r} is not RFC 3339") from None


def _route_of_path(
    http_method: str, path: str
) -> tuple[methods.Method, str] | None:
    """Find the RPC and endpoint of a line that names the request's path.

    The edge logged the path, without its query string, before it logged
    route names, so a file written by an older edge contains such lines.
    """
    path = path.split("?", 1)[0]
    method = methods.find_method(http_method, path)
    if method is None:
        return None
    if path == method.grpc_path or method.http is None:
        return method, method.grpc_path

    return method, method.http.template


def unassigned_request_id() -> str:
    return f"{UNASSIGNED_REQUEST_ID_PREFIX}{uuid.uuid4()}"


def replaced_request_id() -> str:
    return f"{REPLACED_REQUEST_ID_PREFIX}{uuid.uuid4()}"


def _request_id(line: Mapping) -> str:
    """Return the edge's id of a line's request, or a fresh one.

    The edge logs its own id as `request_id` only once it has replaced a
    client's X-Request-ID. A request that Envoy rejected before that has
    only `reply_request_id`: the fresh id its local reply got. A line with
    neither (the client left before a reply) gets an id of its own, so
    that no request goes unrecorded. An id of another form is not the
    edge's, such as a client's id in a line of an edge older than
    `reply_request_id`, and is replaced.
    """
    request_id = _text(line, "request_id")
    if not request_id and "reply_request_id" in line:
        request_id = _text(line, "reply_request_id")
    if not request_id:
        return unassigned_request_id()
    # NOTE: a client-sent id in the UUID form passes in lines of an older
    # edge, which logged the client's id for requests it rejected early.
    # The ingester still never stores an id twice.
    if not EDGE_REQUEST_ID.fullmatch(request_id):
        return replaced_request_id()

    return request_id


def _rest_grpc_status(line: Mapping, status_code: int) -> int | None:
    """Return the code of the JSON error a REST caller got, or OK.

    Returns None for a line of an edge that did not record the service's
    code, and for a request that got no response.
    """
    if "service_grpc_status" not in line or status_code == 0:
        return None
    for name in ("service_grpc_status", "auth_grpc_status"):
        code = _integer(line, name)
        if code is not None:
            return code
    if status_code < 400:
        return code_pb2.OK

    # The edge's own reply, whose code the local reply mappers set.
    return LOCAL_REPLY_CODES.get(status_code, code_pb2.UNKNOWN)


def _method_and_content_type(line: Mapping) -> tuple[str, str]:
    """Return the HTTP method and content type that the edge recorded.

    The edge records both once its filter chain has removed a client's
    x-arxio-original-* headers and copied the real values. A request that
    Envoy rejected before its filter chain ran has only its own :method
    and Content-Type, which no filter has changed.
    """
    method = _text(line, "method")
    if method or "request_method" not in line:
        # NOTE: in a line of an edge older than `request_method`, these
        # values of a request rejected that early were the client's copies.
        return method, _text(line, "content_type")

    return _text(line, "request_method"), _text(line, "request_content_type")


def audit_row(line: Mapping) -> AuditRow:
    """Build the row of one access-log line, or raise InvalidLogLine."""
    request_id = _request_id(line)
    http_method, content_type = _method_and_content_type(line)
    # The route, never the raw path: a path segment may carry whatever a
    # client typed, patient data included.
    if "route" in line:
        found = methods.find_route(_text(line, "route"))
    else:
        found = _route_of_path(http_method, _text(line, "path"))
    method, endpoint = found if found else (None, UNROUTED_ENDPOINT)
    action = _text(line, "action") or (
        method.action if method else UNROUTED_ACTION
    )
    resource_type = _text(line, "resource_type") or (
        method.resource_type if method else ""
    )
    status_code = _integer(line, "status") or 0
    grpc_status = _integer(line, "grpc_status")
    if not content_type.startswith("application/grpc"):
        # Envoy's number for a REST request is derived from the HTTP
        # status, not the code of the JSON error the client got.
        grpc_status = _rest_grpc_status(line, status_code)
    elif grpc_status is not None:
        # gRPC returns HTTP 200 even on errors: grpc-status decides.
        status_code = HTTP_STATUS_OF_CODE.get(grpc_status, 500)

    return AuditRow(
        event_id=uuid.uuid4(),
        time=_time(line),
        org_id=_text(line, "org_id") or None,
        key_id=_text(line, "key_id") or None,
        action=action,
        resource_type=resource_type,
        method=http_method,
        endpoint=endpoint[:MAX_ENDPOINT_LENGTH],
        status_code=status_code,
        grpc_status=grpc_status,
        response_time_ms=_integer(line, "duration_ms") or 0,
        request_id=request_id,
        client_address=_text(line, "client"),
    )


def unreadable_line_row(read_time: datetime.datetime) -> AuditRow:
    """Build the row of an access-log line too long to parse.

    It records only that the edge logged a request, at `read_time`, when
    the ingester read the line: the line's own fields are unknown.
    """
    return AuditRow(
        event_id=uuid.uuid4(),
        time=read_time,
        org_id=None,
        key_id=None,
        action=UNREADABLE_ACTION,
        resource_type="",
        method="",
        endpoint=UNROUTED_ENDPOINT,
        status_code=0,
        grpc_status=None,
        response_time_ms=0,
        request_id=unassigned_request_id(),
        client_address="",
    )
