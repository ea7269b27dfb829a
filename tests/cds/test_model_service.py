"""The CDS service process: model health, settings and callers.

Each test starts `python -m services.cds` with mutual TLS on a free
127.0.0.1 port. The service calls the session's model runtime through the
fault-injecting proxy, and tests call the service with Envoy's client
certificate, as the edge does.
"""

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cds.model_presence import MODEL_HEALTH_NAME
from services.common.certs import ensure_certificates
from services.common.identity import ORG_ID_HEADER
from services.launcher.processes import free_port
from tests.cds.test_model_faults import review_request
from tests.cds.test_model_proxy import (
    CHAT_PATH,
    SHOW_PATH,
    Fault,
    body_rewrite,
)

pytest_plugins = ("tests.model_runtime.fixtures", "tests.cds.test_model_proxy")

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICE_NAME = "arxio.cds.v1.ClinicalDecisionSupportService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
START_TIMEOUT = 30.0
MODEL_TIMEOUT = 2.0
MISSING_MODEL = body_rewrite(404, b'{"error": "model not found"}')


class CdsProcess:
    """A running CDS service and mTLS channels to it."""

    def __init__(self, process, port: int, certs: Path, log: Path) -> None:
        self.process = process
        self.port = port
        self.certs = certs
        self.log_path = log

    def channel(self, component: str | None = "envoy") -> grpc.Channel:
        """Open a TLS channel with `component`'s certificate, or none."""
        key = cert = None
        if component is not None:
            key = (self.certs / f"{component}.key").read_bytes()
            cert = (self.certs / f"{component}.crt").read_bytes()
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(self.certs / "ca.crt").read_bytes(),
            private_key=key,
            certificate_chain=cert,
        )

        return grpc.secure_channel(f"127.0.0.1:{self.port}", credentials)

    def health(self, name: str) -> int:
        with self.channel() as channel:
            return (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
                .status
            )

    def wait_for_health(
        self, name: str, status: int, timeout: float = 10.0
    ) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"cds exited:\n{self.log_path.read_text()}")
            try:
                last = self.health(name)
            except grpc.RpcError as error:
                last = error.code()
            if last == status:
                return
            time.sleep(0.05)
        pytest.fail(f"health of {name!r} stayed {last} for {timeout:g} s")

    def log_entries(self) -> list[dict]:
        entries = []
        for line in self.log_path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue

        return entries


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    return ensure_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def start_cds(
    certs, proxy, model_runtime, tmp_path
) -> Iterator[Callable[..., CdsProcess]]:
    """Return a function that starts the service with extra settings."""
    started: list[CdsProcess] = []

    def start(**settings: str) -> CdsProcess:
        port = free_port()
        environment = os.environ | {
            "ARXIO_HOST": "127.0.0.1",
            "ARXIO_PORT": str(port),
            "ARXIO_TLS_CA": str(certs / "ca.crt"),
            "ARXIO_TLS_CERT": str(certs / "cds.crt"),
            "ARXIO_TLS_KEY": str(certs / "cds.key"),
            "ARXIO_SHUTDOWN_GRACE_SECONDS": "1",
            "OLLAMA_HOST": proxy.host,
            "ARXIO_MODEL": model_runtime.model,
            "ARXIO_MODEL_TIMEOUT_SECONDS": str(MODEL_TIMEOUT),
            "ARXIO_MODEL_CHECK_INTERVAL_SECONDS": "0.2",
            **settings,
        }
        log_path = tmp_path / f"cds-{len(started)}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "services.cds"],
                cwd=REPO_ROOT,
                env=environment,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        service = CdsProcess(process, port, certs, log_path)
        started.append(service)
        service.wait_for_health("", SERVING, START_TIMEOUT)

        return service

    yield start
    proxy.reset()
    for service in started:
        service.process.terminate()
        service.process.wait(15)


def review(
    channel: grpc.Channel,
    request: cds_pb2.ClinicalReviewRequest,
    org_id: str = "org-a",
) -> cds_pb2.ClinicalReviewResponse:
    stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)

    return stub.ClinicalReview(
        request, metadata=[(ORG_ID_HEADER, org_id)], timeout=30
    )


class TestModelHealth:
    def test_model_health_follows_presence(self, proxy, start_cds):
        """The model's name is NOT_SERVING while the server lacks it."""
        proxy.set_fault(SHOW_PATH, Fault.PASS, MISSING_MODEL)
        cds = start_cds()

        cds.wait_for_health(MODEL_HEALTH_NAME, NOT_SERVING)
        assert SERVING == cds.health("")
        assert SERVING == cds.health(SERVICE_NAME)

        proxy.set_fault(SHOW_PATH, Fault.PASS)
        cds.wait_for_health(MODEL_HEALTH_NAME, SERVING)
        assert proxy.received(SHOW_PATH)

        proxy.set_fault(SHOW_PATH, Fault.CUT_BEFORE_REPLY)
        cds.wait_for_health(MODEL_HEALTH_NAME, NOT_SERVING)
        assert SERVING == cds.health(SERVICE_NAME)

    def test_presence_changes_logged_once(
        self, proxy, start_cds, model_runtime
    ):
        """Each change of presence logs one line, with the reason."""
        proxy.set_fault(SHOW_PATH, Fault.PASS, MISSING_MODEL)
        cds = start_cds()
        cds.wait_for_health(MODEL_HEALTH_NAME, NOT_SERVING)
        # Several more checks run while the model stays missing.
        time.sleep(0.6)
        proxy.set_fault(SHOW_PATH, Fault.PASS)
        cds.wait_for_health(MODEL_HEALTH_NAME, SERVING)

        presence = [
            (entry["event"], entry.get("reason"))
            for entry in cds.log_entries()
            if entry["event"] in ("model not available", "model present")
        ]
        assert [
            (
                "model not available",
                f'model server has no model "{model_runtime.model}": pull '
                "it or set ARXIO_MODEL",
            ),
            ("model present", None),
        ] == presence
        assert len(proxy.received(SHOW_PATH)) >= 4

    def test_rules_only_review_without_model(self, kb, proxy, start_cds):
        """A review works while the model is missing."""
        proxy.set_fault(SHOW_PATH, Fault.PASS, MISSING_MODEL)
        cds = start_cds()
        cds.wait_for_health(MODEL_HEALTH_NAME, NOT_SERVING)

        with cds.channel() as channel:
            response = review(channel, review_request(model_review=False))

        assert response.findings
        assert cds_pb2.ModelReview.SKIPPED == response.model_review.status


class TestModelSettings:
    def test_settings_reach_model_request(self, proxy, start_cds):
        """Options and keep_alive from the environment are sent."""
        proxy.set_fault(CHAT_PATH, Fault.STALL)
        cds = start_cds(
            ARXIO_MODEL_OPTIONS='{"num_ctx": 2048, "temperature": 0.5}',
            ARXIO_MODEL_KEEP_ALIVE="10m",
        )

        with cds.channel() as channel:
            review(channel, review_request())

        sent = json.loads(proxy.received(CHAT_PATH)[0])
        assert {
            "num_ctx": 2048,
            "temperature": 0.5,
            "seed": 0,
            "num_predict": 320,
        } == sent["options"]
        assert "10m" == sent["keep_alive"]

    def test_stalled_model_within_deadline(self, proxy, start_cds):
        """A stalled model server costs no more than the deadline."""
        proxy.set_fault(CHAT_PATH, Fault.STALL)
        cds = start_cds()

        with cds.channel() as channel:
            started = time.monotonic()
            response = review(channel, review_request())
            elapsed = time.monotonic() - started

        assert elapsed < MODEL_TIMEOUT + 1.5
        assert response.findings
        assert cds_pb2.ModelReview.UNAVAILABLE == response.model_review.status
        assert (
            f"model server timed out after {MODEL_TIMEOUT:g} s"
            == response.model_review.reason
        )

    def test_invalid_setting_exits_with_code_2(self, certs, tmp_path):
        """An invalid model setting stops the service at start."""
        environment = os.environ | {
            "ARXIO_TLS_CA": str(certs / "ca.crt"),
            "ARXIO_TLS_CERT": str(certs / "cds.crt"),
            "ARXIO_TLS_KEY": str(certs / "cds.key"),
            "OLLAMA_HOST": "http://127.0.0.1:9",
            "ARXIO_MODEL_OPTIONS": '{"temprature": 0}',
        }

        completed = subprocess.run(
            [sys.executable, "-m", "services.cds"],
            cwd=REPO_ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

        assert 2 == completed.returncode
        assert "ARXIO_MODEL_OPTIONS has unknown options" in completed.stderr


class TestCallers:
    def test_other_peer_rejected_despite_org_header(self, start_cds):
        """Only the edge's certificate may send an org id."""
        cds = start_cds()

        with cds.channel("billing") as channel:
            with pytest.raises(grpc.RpcError) as raised:
                review(channel, review_request(model_review=False))

        assert grpc.StatusCode.PERMISSION_DENIED == raised.value.code()

    def test_client_without_certificate_rejected(self, start_cds):
        """A caller without a client certificate cannot connect."""
        cds = start_cds()

        with cds.channel(None) as channel:
            with pytest.raises(grpc.RpcError) as raised:
                review(channel, review_request(model_review=False))

        assert grpc.StatusCode.UNAVAILABLE == raised.value.code()
