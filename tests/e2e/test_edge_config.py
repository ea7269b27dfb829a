"""The rendered edge configuration: valid for Envoy, limits in place."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.common.certs import ensure_certificates
from services.launcher import edge_guards
from services.launcher.envoy_config import (
    UPSTREAMS,
    EdgeSettings,
    Upstream,
    render,
)
from services.launcher.stack import DESCRIPTOR

ENVOY = Path(sys.executable).with_name("envoy")


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> EdgeSettings:
    folder = tmp_path_factory.mktemp("edge")

    return EdgeSettings(
        edge_port=8443,
        admin_port=9901,
        certs_dir=folder,
        descriptor=folder / "api_descriptor.pb",
        upstreams={name: (Upstream("127.0.0.1", 1),) for name in UPSTREAMS},
        cors_origins=("https://app.example",),
        max_connections=500,
        max_heap_bytes=256 * 1024 * 1024,
        access_log_path=folder / "access.log",
    )


def manager_of(config: dict) -> dict:
    listener = config["static_resources"]["listeners"][0]

    return listener["filter_chains"][0]["filters"][0]["typed_config"]


class TestLimits:
    def test_overload_manager_uses_settings(self, settings):
        overload = render(settings)["overload_manager"]
        monitors = {
            monitor["name"]: monitor["typed_config"]
            for monitor in overload["resource_monitors"]
        }
        actions = [action["name"] for action in overload["actions"]]

        heap = monitors["envoy.resource_monitors.fixed_heap"]
        assert 256 * 1024 * 1024 == heap["max_heap_size_bytes"]
        connections = monitors[
            "envoy.resource_monitors.global_downstream_max_connections"
        ]
        assert 500 == connections["max_active_downstream_connections"]
        for action in (
            "shrink_heap",
            "reduce_timeouts",
            "stop_accepting_requests",
            "stop_accepting_connections",
        ):
            assert f"envoy.overload_actions.{action}" in actions

    def test_http_limits_set(self, settings):
        manager = manager_of(render(settings))

        assert "10s" == manager["request_headers_timeout"]
        assert (
            100 == manager["common_http_protocol_options"]["max_headers_count"]
        )
        assert (
            100 == manager["http2_protocol_options"]["max_concurrent_streams"]
        )
        assert 32 == manager["max_request_headers_kb"]

    @pytest.mark.skipif(not ENVOY.exists(), reason="envoy is not installed")
    def test_envoy_accepts_config(self, settings, tmp_path):
        """`envoy --mode validate` accepts the rendered configuration."""
        ensure_certificates(settings.certs_dir)
        settings.descriptor.write_bytes(DESCRIPTOR.read_bytes())
        path = tmp_path / "envoy.yaml"
        path.write_text(yaml.safe_dump(render(settings)))

        completed = subprocess.run(
            [str(ENVOY), "--mode", "validate", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )

        output = completed.stdout + completed.stderr
        assert 0 == completed.returncode, output[-2000:]


class TestRoutes:
    def test_guards_come_before_api_routes(self, settings):
        routes = manager_of(render(settings))["route_config"]["virtual_hosts"][
            0
        ]["routes"]
        names = [route["name"] for route in routes]

        review = names.index("cds.clinical_review")
        assert (
            names.index("cds.clinical_review.content_type_rejected") < review
        )
        assert names.index("cds.clinical_review.query_rejected") < review
        assert "options" == names[-1]
        assert "api_description" == names[0]


class TestCorsOrigins:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("", ()),
            ("https://app.example", ("https://app.example",)),
            (
                " https://a.example , http://localhost:3000,",
                ("https://a.example", "http://localhost:3000"),
            ),
            ("https://[::1]:8443", ("https://[::1]:8443",)),
            ("https://a.example,https://a.example", ("https://a.example",)),
        ],
    )
    def test_valid_origins_parsed(self, text, expected):
        assert expected == edge_guards.parse_cors_origins(text)

    @pytest.mark.parametrize(
        "text",
        [
            "*",
            "app.example",
            "https://app.example/",
            "https://app.example/path",
            "https://App.example",
            "ftp://app.example",
            "https://user@app.example",
            "https://app.example:99999",
            "null",
        ],
    )
    def test_invalid_origin_rejected(self, text):
        with pytest.raises(ValueError, match="invalid CORS origin"):
            edge_guards.parse_cors_origins(text)
