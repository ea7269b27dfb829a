"""The rendered Envoy configuration, checked by Envoy itself."""

import subprocess
import sys
from pathlib import Path

from services.common import methods
from services.launcher.envoy_config import (
    SECURITY_HEADERS,
    UPSTREAMS,
    EdgeSettings,
    Upstream,
    render,
    render_text,
)
from services.launcher.stack import DESCRIPTOR, REPO_ROOT

ENVOY = Path(sys.executable).with_name("envoy")


def settings(certs: Path) -> EdgeSettings:
    return EdgeSettings(
        edge_port=18443,
        admin_port=19901,
        certs_dir=certs,
        descriptor=DESCRIPTOR,
        upstreams={
            name: (Upstream("127.0.0.1", 50051 + index),)
            for index, name in enumerate(UPSTREAMS)
        },
        access_log_path=certs.parent / "access.log",
    )


def filters(config: dict) -> list[str]:
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]

    return [entry["name"] for entry in manager["http_filters"]]


class TestRenderedConfig:
    def test_envoy_validates_config(self, tmp_path):
        """`envoy --mode validate` accepts the rendered configuration."""
        from services.common.certs import ensure_certificates

        certs = ensure_certificates(tmp_path / "certs")
        path = tmp_path / "envoy.yaml"
        path.write_text(render_text(settings(certs)))

        completed = subprocess.run(
            [str(ENVOY), "--mode", "validate", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

        assert 0 == completed.returncode, completed.stderr[-2000:]

    def test_filter_order(self):
        """Headers first, the body limit before ext_authz, router last."""
        names = filters(render(settings(REPO_ROOT / ".run" / "certs")))

        assert [
            "envoy.filters.http.header_mutation",
            "envoy.filters.http.buffer",
            "envoy.filters.http.cors",
            "envoy.filters.http.ext_authz",
            "envoy.filters.http.lua",
            "envoy.filters.http.grpc_json_transcoder",
            "envoy.filters.http.router",
        ] == names

    def test_every_rest_binding_routed(self):
        """Each REST binding in the protos has its own route."""
        config = render(settings(REPO_ROOT / ".run" / "certs"))
        listener = config["static_resources"]["listeners"][0]
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        routes = manager["route_config"]["virtual_hosts"][0]["routes"]
        route_names = {route["name"] for route in routes}

        for method in methods.public_methods():
            if method.http is not None:
                assert method.action in route_names

    def test_tls_13_only(self):
        """The listener accepts TLS 1.3 and nothing older."""
        config = render(settings(REPO_ROOT / ".run" / "certs"))
        listener = config["static_resources"]["listeners"][0]
        tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]
        params = tls["common_tls_context"]["tls_params"]

        assert "TLSv1_3" == params["tls_minimum_protocol_version"]
        assert "TLSv1_3" == params["tls_maximum_protocol_version"]

    def test_hsts_at_least_one_year(self):
        """HSTS lasts a year or more and covers subdomains."""
        value = SECURITY_HEADERS["strict-transport-security"]

        assert "includeSubDomains" in value
        assert int(value.split(";")[0].split("=")[1]) >= 31536000
