"""Turn the edge's JSON access-log lines into audit rows.

The edge writes one JSON object per request (see `ACCESS_LOG_FORMAT` in
services/launcher/envoy_config.py). A row contains ids, the route and the
outcome: never a header value other than the ones listed there, never a
query string and never a body, so no PHI and no key reaches it.
"""

import datetime
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from services.common import methods
from services.common.errors import HTTP_STATUS_OF_CODE

# Action of requests that matched no API method.
UNROUTED_ACTION = "edge.unrouted"
# Prefix of the request id an entry gets when the edge made none.
UNASSIGNED_REQUEST_ID_PREFIX = "unassigned-"
# Endpoint of requests that matched no API method.
UNROUTED_ENDPOINT = "(unrouted)"
MAX_ENDPOINT_LENGTH = 2048
MAX_REQUEST_ID_LENGTH = 200


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


def audit_row(line: Mapping) -> AuditRow:
    """Build the row of one access-log line, or raise InvalidLogLine."""
    request_id = _text(line, "request_id")
    if not request_id:
        # Envoy rejected the request before it made an id (a malformed or
        # oversized header, for example): the entry gets one of its own,
        # marked as such, so that no request goes unrecorded.
        request_id = f"{UNASSIGNED_REQUEST_ID_PREFIX}{uuid.uuid4()}"
    http_method = _text(line, "method")
    path = _text(line, "path").split("?", 1)[0]
    method = methods.find_method(http_method, path)
    # The route, never the raw path: a path segment may carry whatever a
    # client typed, patient data included.
    if method is None:
        endpoint = UNROUTED_ENDPOINT
    elif path == method.grpc_path or method.http is None:
        endpoint = method.grpc_path
    else:
        endpoint = method.http.template
    action = _text(line, "action") or (
        method.action if method else UNROUTED_ACTION
    )
    resource_type = _text(line, "resource_type") or (
        method.resource_type if method else ""
    )
    status_code = _integer(line, "status") or 0
    grpc_status = _integer(line, "grpc_status")
    if not _text(line, "content_type").startswith("application/grpc"):
        # A REST client got an HTTP status only: Envoy's number here is
        # derived from it, not sent by a service.
        grpc_status = None
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
        request_id=request_id[:MAX_REQUEST_ID_LENGTH],
        client_address=_text(line, "client"),
    )
