"""The rendered Envoy configuration, checked by Envoy itself."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.common import methods, server, strict_body
from services.launcher import edge_guards, envoy_config
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
        """Headers first, ext_authz before the buffer filter, so that the
        auth decision rejects a body over the limit, router last."""
        names = filters(render(settings(REPO_ROOT / ".run" / "certs")))

        assert [
            "envoy.filters.http.header_mutation",
            "envoy.filters.http.header_to_metadata",
            "envoy.filters.http.cors",
            "envoy.filters.http.ext_authz",
            "envoy.filters.http.buffer",
            "envoy.filters.http.lua",
            "envoy.filters.http.grpc_json_transcoder",
            "envoy.filters.http.router",
        ] == names

    def test_auth_decision_gets_limit_plus_one(self):
        """ext_authz sends one byte over the body limit, and the routes
        let it buffer that much."""
        config = render(settings(REPO_ROOT / ".run" / "certs"))
        listener = config["static_resources"]["listeners"][0]
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        [authz] = [
            entry["typed_config"]
            for entry in manager["http_filters"]
            if entry["name"] == "envoy.filters.http.ext_authz"
        ]
        body = authz["with_request_body"]
        virtual_host = manager["route_config"]["virtual_hosts"][0]

        assert envoy_config.MAX_REQUEST_BYTES + 1 == body["max_request_bytes"]
        assert body["allow_partial_message"] is True
        assert (
            body["max_request_bytes"]
            == virtual_host["request_body_buffer_limit"]
        )

    def test_no_buffer_room_without_auth(self):
        """Without ext_authz the buffer filter alone sets the limit."""
        config = render(
            dataclasses.replace(
                settings(REPO_ROOT / ".run" / "certs"), authorization=False
            )
        )
        listener = config["static_resources"]["listeners"][0]
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        virtual_host = manager["route_config"]["virtual_hosts"][0]

        assert "request_body_buffer_limit" not in virtual_host

    def test_audit_fields_never_read_copied_headers(self):
        """The access log and the local reply mappers never read the
        x-arxio-original-* headers, which a client can send on a request
        that Envoy rejects before header_mutation removes them."""
        config = render(settings(REPO_ROOT / ".run" / "certs"))
        listener = config["static_resources"]["listeners"][0]
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        logged = str(envoy_config.ACCESS_LOG_FORMAT).lower()
        mappers = str(manager["local_reply_config"]).lower()

        for name in (
            envoy_config.ORIGINAL_METHOD_HEADER,
            envoy_config.ORIGINAL_CONTENT_TYPE_HEADER,
        ):
            assert name not in logged
            assert name not in mappers

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


def routes_of(config: dict) -> list[dict]:
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]

    return manager["route_config"]["virtual_hosts"][0]["routes"]


class TestServiceLimits:
    def test_metadata_limit_above_edge_header_limit(self):
        """A service takes all the headers the edge admits, with the edge's
        and the auth decision's own added."""
        template = envoy_config.TEMPLATE.read_text()
        edge_kib = int(
            re.search(r"max_request_headers_kb: (\d+)", template)[1]
        )

        assert server.MAX_METADATA_BYTES >= (
            edge_kib * 1024
            + envoy_config.MAX_ORIGINAL_CONTENT_TYPE_LENGTH
            + 16 * 1024
        )

    def test_message_limit_fits_largest_body(self):
        largest = max(
            envoy_config.CDS_HOOKS_MAX_REQUEST_BYTES,
            envoy_config.WEBHOOK_MAX_REQUEST_BYTES,
            envoy_config.MAX_REQUEST_BYTES,
        )

        assert largest < server.MAX_RECEIVE_MESSAGE_BYTES < 4 * 1024 * 1024

    def test_decompressed_limit_is_body_limit(self):
        config = render(settings(REPO_ROOT / ".run" / "certs"))
        listener = config["static_resources"]["listeners"][0]
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        virtual_host = manager["route_config"]["virtual_hosts"][0]
        # The edge buffers one byte over the limit, so that the auth
        # decision can tell a body over the limit from one at it.
        edge_limit = virtual_host["request_body_buffer_limit"] - 1

        assert edge_limit == strict_body.MAX_MESSAGE_BYTES

    def test_list_limit_covers_service_limits(self):
        from services.auth.admin import MAX_ALLOWLIST_RANGES
        from services.cds.validation import MAX_ITEMS

        assert MAX_ITEMS <= strict_body.MAX_REPEATED_ITEMS
        assert MAX_ALLOWLIST_RANGES <= strict_body.MAX_REPEATED_ITEMS


class TestConnectionLimit:
    @pytest.mark.parametrize(
        ("open_files", "expected"),
        [(20_000, 18_976), (1_048_576, 25_000), (1_024, 512), (1, 1)],
    )
    def test_sized_from_open_files(self, open_files, expected):
        assert expected == edge_guards.connection_limit(open_files)

    def test_open_file_limit_raised_to_hard(self):
        """The launcher raises its soft limit, which Envoy inherits."""
        script = (
            "import resource\n"
            "from services.launcher.processes import raise_open_file_limit\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
            "print(raise_open_file_limit(), hard)\n"
        )
        completed = subprocess.run(
            [sys.executable, "-c", script],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        raised, hard = completed.stdout.split()

        assert hard == raised


class TestGuardRoutes:
    @staticmethod
    def repeated_guard(path: str) -> dict | None:
        for route in routes_of(render(settings(REPO_ROOT / ".run" / "certs"))):
            if (
                route["name"]
                != "audit.list_audit_events.repeated_query_rejected"
            ):
                continue
            [matcher] = [
                header
                for header in route["match"]["headers"]
                if header["name"] == ":path"
            ]
            regex = matcher["string_match"]["safe_regex"]["regex"]
            if re.fullmatch(regex, path):
                return route

        return None

    @pytest.mark.parametrize(
        "path",
        [
            "/v1/audit?pageSize=1&pageSize=2",
            "/v1/audit?page_size=1&pageSize=2",
            "/v1/audit?a=1&pageSize=1&b=2&pageSize=3&c",
            "/v1/audit?pageSize&pageSize",
        ],
    )
    def test_repeated_parameter_matched(self, path):
        assert self.repeated_guard(path) is not None

    @pytest.mark.parametrize(
        "path",
        [
            "/v1/audit?pageSize=1&pageToken=2",
            "/v1/audit?xpageSize=1&pageSize=2",
            "/v1/audit?pageSize=1&action=pageSize",
            "/v1/audit",
        ],
    )
    def test_distinct_parameters_pass(self, path):
        assert self.repeated_guard(path) is None

    def test_methods_without_body_check_for_one(self):
        """Every JSON route of a method without a body runs the Lua check."""
        config = render(settings(REPO_ROOT / ".run" / "certs"))
        by_name = {route["name"]: route for route in routes_of(config)}

        for method in methods.public_methods():
            if method.http is None or method.http.body:
                continue
            route = by_name[method.action]
            lua = route["typed_per_filter_config"]["envoy.filters.http.lua"]
            source = lua["source_code"]["inline_string"]
            assert "takes no request body" in source, method.action


class TestCorsReplies:
    def test_local_replies_get_cors_for_allowed_origin(self):
        edge = dataclasses.replace(
            settings(REPO_ROOT / ".run" / "certs"),
            cors_origins=("https://a.example", "https://b.example"),
        )
        listener = render(edge)["static_resources"]["listeners"][0]
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        mappers = manager["local_reply_config"]["mappers"]

        with_cors = [
            mapper
            for mapper in mappers
            if any(
                header["header"]["key"] == "access-control-allow-origin"
                for header in mapper["headers_to_add"]
            )
        ]
        assert len(mappers) == 2 * len(with_cors) - 1
        for mapper in mappers:
            keys = [
                header["header"]["key"] for header in mapper["headers_to_add"]
            ]
            assert "vary" in keys
