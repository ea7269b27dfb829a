"""What every response of the edge must satisfy, whatever the request.

No 5xx, the security headers and a request id on every response, every
error a `google.rpc.Status` JSON body whose details carry that request id,
and never a 200 with an empty body. A gRPC-style reply (HTTP 200 with
grpc-status) counts as an error only when grpc-status is not 0, and one
without grpc-status must carry a message. No error
repeats a value of the request (`echo_problems`).
"""

import json
import urllib.parse
from collections.abc import Mapping

SECURITY_HEADERS = {
    "strict-transport-security": "max-age=31536000; includeSubDomains",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "x-xss-protection": "0",
    "cache-control": "no-store",
}
# Headers that reveal the edge's internals and must never reach a client.
INTERNAL_HEADERS = ("x-envoy-upstream-service-time", "server")
REQUEST_INFO_TYPE = "type.googleapis.com/google.rpc.RequestInfo"


def error_shape_problems(body: bytes, request_id: str) -> list[str]:
    """Return how an error body differs from the google.rpc.Status shape."""
    try:
        error = json.loads(body)
    except ValueError:
        return [f"error body is not JSON: {body[:120]!r}"]
    if not isinstance(error, dict):
        return ["error body is not a JSON object"]
    problems = []
    if not isinstance(error.get("code"), int) or error["code"] == 0:
        problems.append(f"code is not a non-zero integer: {error.get('code')}")
    if not isinstance(error.get("message"), str):
        problems.append("message is not a string")
    details = error.get("details")
    if not isinstance(details, list):
        return [*problems, "details is not a list"]
    request_ids = [
        detail.get("requestId")
        for detail in details
        if isinstance(detail, dict)
        and detail.get("@type") == REQUEST_INFO_TYPE
    ]
    if request_ids != [request_id]:
        problems.append(
            f"details carry request ids {request_ids}, not [{request_id!r}]"
        )

    return problems


def response_problems(
    method: str, status: int, headers: Mapping[str, str], body: bytes
) -> list[str]:
    """Return every way one response breaks the edge's promises.

    `headers` must have lower-case names.
    """
    problems = []
    if status >= 500:
        problems.append(f"status {status}")
    for name, value in SECURITY_HEADERS.items():
        if headers.get(name) != value:
            problems.append(f"{name} is {headers.get(name)!r}")
    for name in INTERNAL_HEADERS:
        if name in headers:
            problems.append(f"internal header {name} is present")
    request_id = headers.get("x-request-id", "")
    if not request_id:
        problems.append("x-request-id is missing")
    content_type = headers.get("content-type", "")
    if content_type.startswith("application/grpc"):
        # A success carries its message, and its grpc-status in trailers,
        # which an HTTP/1.1 client may not see.
        if status == 200 and headers.get("grpc-status") in (None, "0"):
            if not body:
                problems.append("gRPC reply without an error status")
        return problems
    if method == "HEAD":
        return problems
    if status >= 400:
        if not content_type.startswith("application/json"):
            problems.append(f"error content type is {content_type!r}")
        problems += error_shape_problems(body, request_id)
    elif status == 200 and not body:
        problems.append("200 with an empty body")

    return problems


def echo_problems(
    marker: str, status: int, headers: Mapping[str, str], body: bytes
) -> list[str]:
    """Return a problem when an error response repeats `marker`.

    A request plants the marker in body and query values, where it stands
    for patient data that no error message may quote. `headers` must have
    lower-case names.
    """
    grpc_status = headers.get("grpc-status")
    if status < 400 and grpc_status in (None, "0"):
        return []
    texts = [
        body.decode("utf-8", "replace"),
        urllib.parse.unquote(headers.get("grpc-message", "")),
    ]
    if any(marker in text for text in texts):
        return [f"the error repeats the request's value {marker}"]

    return []
