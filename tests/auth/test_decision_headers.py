"""Headers the auth decision rejects before they reach a gRPC server."""

import pytest

from services.auth.decision import _invalid_header


@pytest.mark.parametrize(
    "headers",
    [
        {"grpc-timeout": "29999m"},
        {"grpc-timeout": "1H"},
        {"grpc-trace-bin": "AAECAw"},
        {"grpc-trace-bin": "AAECAw==,AQI="},
        {"x-api-key": "arx_abc", "user-agent": "grpc-python/1.76"},
    ],
)
def test_valid_headers_pass(headers):
    assert _invalid_header(headers) is None


@pytest.mark.parametrize(
    ("headers", "name"),
    [
        ({"grpc-timeout": "zz"}, "grpc-timeout"),
        ({"grpc-timeout": "123456789S"}, "grpc-timeout"),
        ({"grpc-timeout": "10"}, "grpc-timeout"),
        ({"grpc-trace-bin": "not base64!"}, "grpc-trace-bin"),
        ({"x-note": "caf\u00e9"}, "x-note"),
        ({"X-Upper": "value"}, "X-Upper"),
    ],
)
def test_invalid_header_named(headers, name):
    found = _invalid_header(headers)

    assert found is not None
    assert name == found[0]
