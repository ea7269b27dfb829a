"""Headers the edge sets for the services: a client's copy never passes."""

import json
import time

import pytest

pytestmark = pytest.mark.e2e


def access_log_line(stack, request_id: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in stack.access_log_path.read_text().splitlines():
            if request_id in line:
                return json.loads(line)
        time.sleep(0.2)
    raise AssertionError(f"no access-log line for request {request_id}")


def test_spoofed_original_content_type_dropped(stack, edge, new_org):
    """With no Content-Type, the edge's copy is empty: the client's goes."""
    org = new_org()

    response = edge.request(
        "GET",
        "/v1/audit?pageSize=1",
        None,
        {
            "x-api-key": org.api_key,
            "x-arxio-original-content-type": "application/grpc",
        },
    )

    assert 200 == response.status, response.body
    line = access_log_line(stack, response.headers["x-request-id"])
    # The transcoder's own application/grpc is in request_content_type,
    # which the ingester reads only for requests no filter decoded.
    assert line["content_type"] is None
