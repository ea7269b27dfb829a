"""Every line the edge's access-log format can produce fits the ingester's
line limit, whatever a client sends."""

import re
from pathlib import Path

from services.audit.ingest import MAX_LINE_BYTES
from services.launcher.envoy_config import (
    ACCESS_LOG_FORMAT,
    UPSTREAMS,
    EdgeSettings,
    Upstream,
    render,
)

# One Envoy command operator: %NAME%, %NAME(argument)% or either with :N,
# which cuts the value to N bytes.
OPERATOR = re.compile(r"%([A-Z_]+)(\([^)]*\))?(?::(\d+))?%")
# Operators whose values a request cannot make long, with their longest
# value in bytes; Envoy rejects a length on some of them.
FIXED_LENGTHS = {
    # 2026-12-04T09:00:00.000001Z
    "START_TIME": 27,
    "RESPONSE_CODE": 3,
    "GRPC_STATUS_NUMBER": 2,
    # Milliseconds as a 64-bit integer.
    "DURATION": 20,
    # An IPv4-mapped IPv6 address in full.
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": 45,
}
# JSON escapes a byte in at most 6 (\u00XX).
ESCAPED_BYTES_PER_BYTE = 6


def route_names() -> list[str]:
    config = render(
        EdgeSettings(
            edge_port=1,
            admin_port=2,
            certs_dir=Path("certs"),
            descriptor=Path("api_descriptor.pb"),
            upstreams={
                name: (Upstream("127.0.0.1", 3),) for name in UPSTREAMS
            },
        )
    )
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]

    return [route["name"] for route in routes if "name" in route]


def longest_value(template: str, longest_route: int) -> int:
    """Return the most bytes a format value renders to, escapes included."""
    total = len(OPERATOR.sub("", template))
    for name, _, length in OPERATOR.findall(template):
        if length:
            total += int(length) * ESCAPED_BYTES_PER_BYTE
        elif name == "ROUTE_NAME":
            total += longest_route
        else:
            total += FIXED_LENGTHS[name]

    return total


def test_request_values_are_cut():
    """Headers and metadata, which a request can make long, have a :N."""
    for key, template in ACCESS_LOG_FORMAT.items():
        for name, _, length in OPERATOR.findall(template):
            assert length or name in FIXED_LENGTHS or name == "ROUTE_NAME", (
                f"{key}: %{name}% has no length"
            )


def test_longest_line_fits_limit():
    longest_route = max(len(name) for name in route_names())
    # "key":value, with quotes around the value, braces and a newline.
    longest_line = 3 + sum(
        len(key) + 6 + longest_value(template, longest_route)
        for key, template in ACCESS_LOG_FORMAT.items()
    )

    assert longest_line < MAX_LINE_BYTES / 2
