"""A running server serves renewed certificate files to new connections.

The files are laid out as the kubelet mounts a Secret: each name is a
symlink into `..data`, itself a symlink to a timestamped folder, and a
renewal swaps `..data` in one rename.
"""

import asyncio
import os
import shutil
import socket
import ssl
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.certs import ensure_certificates
from services.common.config import ConfigError, ServerConfig, TlsConfig
from services.common.server import server_credentials
from services.common.tls import CHECK_INTERVAL, CertificateReloader

FILES = ("tls.crt", "tls.key", "ca.crt")
# Maximum wait in seconds for a reload to show.
RELOAD_TIMEOUT = CHECK_INTERVAL + 5.0


def write_version(mount: Path, version: str, sources: dict[str, Path]):
    """Write one Secret version and point `..data` at it atomically."""
    folder = mount / f"..{version}"
    folder.mkdir()
    for name in FILES:
        shutil.copyfile(sources[name], folder / name)
    staged = mount / "..data_tmp"
    staged.symlink_to(folder.name)
    os.replace(staged, mount / "..data")
    for name in FILES:
        link = mount / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)


def component_files(certs: Path, component: str) -> dict[str, Path]:
    return {
        "tls.crt": certs / f"{component}.crt",
        "tls.key": certs / f"{component}.key",
        "ca.crt": certs / "ca.crt",
    }


def der(path: Path) -> bytes:
    certificate = x509.load_pem_x509_certificate(path.read_bytes())

    return certificate.public_bytes(serialization.Encoding.DER)


def served_certificate(port: int, client: Path) -> bytes:
    """Handshake as the edge of `client`'s set; return the server's DER."""
    context = ssl.create_default_context(cafile=str(client / "ca.crt"))
    context.load_cert_chain(client / "edge.crt", client / "edge.key")
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


async def health_status(port: int, client: Path) -> int:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(client / "ca.crt").read_bytes(),
        private_key=(client / "edge.key").read_bytes(),
        certificate_chain=(client / "edge.crt").read_bytes(),
    )
    async with grpc.aio.secure_channel(
        f"localhost:{port}", credentials
    ) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )

    return reply.status


async def served_after_reload(port: int, client: Path, expected: bytes):
    """Return the served DER once it is `expected`, or the last one seen."""
    deadline = time.monotonic() + RELOAD_TIMEOUT
    served = b""
    while time.monotonic() < deadline:
        try:
            served = await asyncio.to_thread(served_certificate, port, client)
        except ssl.SSLError:
            # The handshake that triggers the reload may still use the old
            # CA to check this client.
            served = b""
        if served == expected:
            break
        await asyncio.sleep(0.2)

    return served


class RunningServer:
    """A grpc.aio server with the services' credentials and health."""

    def __init__(self, mount: Path) -> None:
        self.config = ServerConfig(
            host="127.0.0.1",
            port=0,
            tls=TlsConfig(
                ca_file=mount / "ca.crt",
                cert_file=mount / "tls.crt",
                key_file=mount / "tls.key",
            ),
            allowed_peers=frozenset({"edge"}),
            shutdown_grace=0,
        )

    async def __aenter__(self) -> int:
        self.server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(
            health.aio.HealthServicer(), self.server
        )
        port = self.server.add_secure_port(
            "127.0.0.1:0", server_credentials(self.config)
        )
        await self.server.start()

        return port

    async def __aexit__(self, *exc_info) -> None:
        await self.server.stop(0)


@pytest.fixture
def sets(tmp_path) -> tuple[Path, Path]:
    """Two certificate sets, each with a CA of its own."""
    return (
        ensure_certificates(tmp_path / "first"),
        ensure_certificates(tmp_path / "second"),
    )


@pytest.fixture
def mount(tmp_path, sets) -> Path:
    folder = tmp_path / "mount"
    folder.mkdir()
    write_version(folder, "v1", component_files(sets[0], "auth"))

    return folder


class TestRenewal:
    def test_new_connections_get_new_files(self, mount, sets):
        """After the swap, handshakes and RPCs use the renewed files."""
        first, second = sets

        async def scenario():
            async with RunningServer(mount) as port:
                before = await asyncio.to_thread(
                    served_certificate, port, first
                )
                write_version(mount, "v2", component_files(second, "auth"))
                after = await served_after_reload(
                    port, second, der(second / "auth.crt")
                )
                status = await health_status(port, second)

            return before, after, status

        before, after, status = asyncio.run(scenario())

        assert der(first / "auth.crt") == before
        assert der(second / "auth.crt") == after
        assert health_pb2.HealthCheckResponse.SERVING == status

    def test_mismatched_key_keeps_old_files(self, mount, sets):
        """A certificate swapped in with another's key is not served."""
        first, second = sets
        broken = component_files(second, "auth") | {
            "tls.key": first / "auth.key"
        }

        async def scenario():
            async with RunningServer(mount) as port:
                write_version(mount, "v2", broken)
                await asyncio.sleep(CHECK_INTERVAL + 0.2)
                served = []
                for _ in range(2):
                    served.append(
                        await asyncio.to_thread(
                            served_certificate, port, first
                        )
                    )
                status = await health_status(port, first)

            return served, status

        served, status = asyncio.run(scenario())

        assert [der(first / "auth.crt")] * 2 == served
        assert health_pb2.HealthCheckResponse.SERVING == status


class TestReloader:
    def test_unchanged_files_return_nothing(self, mount):
        """Without a change the fetcher keeps the current configuration."""
        now = [0.0]
        reloader = CertificateReloader(
            TlsConfig(mount / "ca.crt", mount / "tls.crt", mount / "tls.key"),
            clock=lambda: now[0],
        )
        now[0] += CHECK_INTERVAL

        assert reloader.fetch() is None

    def test_checks_at_most_once_per_interval(self, mount, sets):
        """A change shows only after the check interval has passed."""
        now = [0.0]
        reloader = CertificateReloader(
            TlsConfig(mount / "ca.crt", mount / "tls.crt", mount / "tls.key"),
            clock=lambda: now[0],
        )
        write_version(mount, "v2", component_files(sets[1], "auth"))

        early = reloader.fetch()
        now[0] += CHECK_INTERVAL
        late = reloader.fetch()

        assert early is None
        assert late is not None

    def test_unusable_files_at_start_rejected(self, tmp_path, sets):
        """A key that is not the certificate's fails the settings."""
        first, second = sets
        tls = TlsConfig(
            first / "ca.crt", first / "auth.crt", second / "auth.key"
        )

        with pytest.raises(ConfigError, match="does not belong"):
            CertificateReloader(tls)
