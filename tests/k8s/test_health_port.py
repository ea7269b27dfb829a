"""The plaintext health port that Kubernetes' gRPC probes call.

The kubelet's gRPC probes cannot present a client certificate, so each
service also serves grpc.health.v1, and nothing else, on
ARXIO_HEALTH_PORT. These tests start real services on loopback.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cds.model_presence import MODEL_HEALTH_NAME
from services.common.certs import ensure_certificates
from services.launcher.processes import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
START_TIMEOUT = 60.0


def health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )

    return reply.status


def start_service(
    name: str, tmp_path: Path, environment: dict[str, str]
) -> tuple[subprocess.Popen, int]:
    """Start `python -m services.NAME` with a health port; wait for it."""
    certs = ensure_certificates(tmp_path / "certs")
    health_port = free_port()
    log = (tmp_path / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", f"services.{name}"],
        env={
            key: value
            for key, value in os.environ.items()
            if key not in ("DATABASE_URL", "OLLAMA_HOST")
        }
        | {
            "ARXIO_HOST": "127.0.0.1",
            "ARXIO_PORT": str(free_port()),
            "ARXIO_HEALTH_PORT": str(health_port),
            "ARXIO_TLS_CA": str(certs / "ca.crt"),
            "ARXIO_TLS_CERT": str(certs / f"{name}.crt"),
            "ARXIO_TLS_KEY": str(certs / f"{name}.key"),
            "ARXIO_SHUTDOWN_GRACE_SECONDS": "1",
        }
        | environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {process.returncode}: "
                + (tmp_path / f"{name}.log").read_text()[-2000:]
            )
        try:
            health(health_port, "liveness")
            return process, health_port
        except grpc.RpcError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{name} did not serve its health port in time")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def cds(tmp_path):
    # Nothing listens on this loopback port: the model is unavailable.
    process, port = start_service(
        "cds",
        tmp_path,
        {"OLLAMA_HOST": f"http://127.0.0.1:{free_port()}"},
    )
    yield port
    stop(process)


@pytest.fixture
def auth_without_database(tmp_path):
    # Nothing listens on this loopback port: PostgreSQL is unreachable.
    process, port = start_service(
        "auth",
        tmp_path,
        {
            "DATABASE_URL": f"postgresql://arxio_auth@127.0.0.1:{free_port()}"
            "/arxio",
            "ARXIO_OPERATOR_TOKEN_SHA256": "0" * 64,
        },
    )
    yield port
    stop(process)


class TestHealthPort:
    def test_liveness_without_database(self, auth_without_database):
        """Liveness is SERVING while readiness waits for PostgreSQL."""
        port = auth_without_database
        time.sleep(0.5)

        assert SERVING == health(port, "liveness")
        assert NOT_SERVING == health(port, "")

    def test_cds_ready_without_model(self, cds):
        """CDS is live and ready without Ollama; only its model name is not."""
        assert SERVING == health(cds, "liveness")
        assert SERVING == health(cds, "")
        assert NOT_SERVING == health(cds, MODEL_HEALTH_NAME)

    def test_serves_health_only(self, cds):
        """The plaintext port serves health checks and no other RPC."""
        with grpc.insecure_channel(f"127.0.0.1:{cds}") as channel:
            call = channel.unary_unary(
                "/arxio.cds.v1.ClinicalDecisionSupportService/"
                "ReviewMedications",
                request_serializer=lambda message: b"",
                response_deserializer=lambda data: data,
            )
            with pytest.raises(grpc.RpcError) as raised:
                call(b"", timeout=2)

        assert grpc.StatusCode.UNIMPLEMENTED == raised.value.code()
