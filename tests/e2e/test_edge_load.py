"""The edge sheds a flood instead of falling over.

Each test starts its own Envoy, rendered by the suite's code with small
limits, in front of the running services: a connection limit of 20, a
2-second request headers timeout, a heap maximum that is already
exceeded. Every flood is bounded in count and time.
"""

import json
import socket
import ssl
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.edge_instance import EdgeInstance
from tests.fuzz.checks import response_problems

pytestmark = pytest.mark.e2e

MAX_CONNECTIONS = 20
FLOOD_CONNECTIONS = 60
SLOW_CLIENTS = 30
HEADERS_TIMEOUT_SECONDS = 2


def tls_context(edge_instance_ca) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(edge_instance_ca))
    context.set_alpn_protocols(["http/1.1"])

    return context


def open_tls(port: int, context: ssl.SSLContext, timeout: float):
    """Return a TLS connection to the edge, or None if it was refused."""
    raw = socket.create_connection(("127.0.0.1", port), timeout)
    try:
        tls = context.wrap_socket(raw, server_hostname="localhost")
        # A connection over the limit is closed right after accept; the
        # client sees that on its first read.
        tls.sendall(
            b"GET /v1/openapi.json HTTP/1.1\r\nhost: localhost\r\n\r\n"
        )
        if not tls.recv(12).startswith(b"HTTP/1.1 200"):
            tls.close()
            return None
    except (OSError, ssl.SSLError):
        raw.close()
        return None

    return tls


def read_reply(tls) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while chunk := tls.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()

    return int(lines[0].split()[1]), headers, body


def healthy_request(port: int, context: ssl.SSLContext) -> int:
    with socket.create_connection(("127.0.0.1", port), 5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(
                b"GET /v1/openapi.json HTTP/1.1\r\nhost: localhost\r\n"
                b"connection: close\r\n\r\n"
            )
            return read_reply(tls)[0]


@pytest.fixture
def small_edge(stack, tmp_path):
    def shorten_headers_timeout(config: dict) -> None:
        listener = config["static_resources"]["listeners"][0]
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        manager["request_headers_timeout"] = f"{HEADERS_TIMEOUT_SECONDS}s"

    instance = EdgeInstance(
        stack,
        tmp_path,
        shorten_headers_timeout,
        max_connections=MAX_CONNECTIONS,
    ).start()
    yield instance
    instance.stop()


class TestConnectionFlood:
    def test_connections_over_limit_shed(self, stack, small_edge):
        """Connections past the limit are closed; the edge stays up."""
        context = tls_context(stack.certs_dir / "ca.crt")
        opened = []
        refused = 0
        started = time.monotonic()
        for _ in range(FLOOD_CONNECTIONS):
            connection = open_tls(small_edge.port, context, timeout=5)
            if connection is None:
                refused += 1
            else:
                opened.append(connection)
        elapsed = time.monotonic() - started
        overflow = sum(
            value
            for name, value in small_edge.stats("listener.").items()
            if name.endswith("downstream_global_cx_overflow")
        )
        for connection in opened:
            connection.close()

        assert len(opened) <= MAX_CONNECTIONS
        assert refused >= FLOOD_CONNECTIONS - MAX_CONNECTIONS
        assert overflow >= refused
        assert elapsed < 30
        assert small_edge.running()
        time.sleep(0.5)
        assert 200 == healthy_request(small_edge.port, context)


class TestSlowHeaders:
    def test_slow_clients_timed_out(self, stack, small_edge):
        """Clients that never finish their headers get 408 and are closed.

        While they hang, other clients are served.
        """
        context = tls_context(stack.certs_dir / "ca.crt")
        slow = []
        for _ in range(SLOW_CLIENTS // 2):
            raw = socket.create_connection(("127.0.0.1", small_edge.port), 5)
            tls = context.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(b"GET /v1/openapi.json HTTP/1.1\r\nhost: local")
            slow.append(tls)

        assert 200 == healthy_request(small_edge.port, context)
        started = time.monotonic()
        replies = []
        for tls in slow:
            tls.settimeout(HEADERS_TIMEOUT_SECONDS + 5)
            replies.append(read_reply(tls))
            tls.close()
        waited = time.monotonic() - started

        assert waited < HEADERS_TIMEOUT_SECONDS + 5
        for status, headers, body in replies:
            assert 408 == status
            assert [] == response_problems("GET", status, headers, body)
        assert "timeout" in json.loads(replies[0][2])["message"]
        assert small_edge.running()


class TestOverloadManager:
    def test_heap_pressure_sheds_requests(self, stack, tmp_path):
        """Over the heap maximum new requests get a safe JSON 503."""

        def keep_requests_action_only(config: dict) -> None:
            actions = config["overload_manager"]["actions"]
            config["overload_manager"]["actions"] = [
                action
                for action in actions
                if not action["name"].endswith("stop_accepting_connections")
            ]

        # A heap maximum of 1 MB: Envoy's heap is always larger.
        instance = EdgeInstance(
            stack, tmp_path, keep_requests_action_only, max_heap_bytes=10**6
        ).start()
        try:
            gauge = "overload.envoy.overload_actions.stop_accepting_requests"
            wait_for_stat(instance, f"{gauge}.active", 1)
            context = tls_context(stack.certs_dir / "ca.crt")
            with socket.create_connection(("127.0.0.1", instance.port)) as raw:
                with context.wrap_socket(
                    raw, server_hostname="localhost"
                ) as tls:
                    tls.sendall(
                        b"GET /v1/billing/usage HTTP/1.1\r\n"
                        b"host: localhost\r\nconnection: close\r\n\r\n"
                    )
                    status, headers, body = read_reply(tls)
        finally:
            instance.stop()

        assert 503 == status
        # Only the 5xx rule may break: the rest of the reply is safe.
        assert ["status 503"] == response_problems(
            "GET", status, headers, body
        )

    def test_heap_pressure_stops_connections(self, stack, tmp_path):
        """At the last threshold Envoy accepts no new connection."""
        instance = EdgeInstance(stack, tmp_path, max_heap_bytes=10**6).start()
        try:
            gauge = (
                "overload.envoy.overload_actions.stop_accepting_connections"
            )
            wait_for_stat(instance, f"{gauge}.active", 1)
            context = tls_context(stack.certs_dir / "ca.crt")
            connection = open_tls(instance.port, context, timeout=2)

            assert connection is None
            assert instance.running()
        finally:
            instance.stop()


def wait_for_stat(instance: EdgeInstance, name: str, value: int) -> None:
    deadline = time.monotonic() + 10
    while instance.stats(name).get(name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.2)


class TestOpenFileLimit:
    def test_connection_limit_below_open_files(self, stack):
        """Envoy can open a descriptor for every connection it admits."""
        envoy = stack.child("envoy").process
        limits = Path(f"/proc/{envoy.pid}/limits").read_text()
        line = next(
            text for text in limits.splitlines() if "Max open files" in text
        )
        soft, hard = (int(value) for value in line.split()[3:5])
        config = yaml.safe_load((stack.run_dir / "envoy.yaml").read_text())
        monitors = config["overload_manager"]["resource_monitors"]
        [connections] = [
            monitor["typed_config"]["max_active_downstream_connections"]
            for monitor in monitors
            if "max_active_downstream_connections" in monitor["typed_config"]
        ]

        assert soft == hard
        assert connections < soft
