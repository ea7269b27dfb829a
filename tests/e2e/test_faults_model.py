"""The model server stalled, then killed: reviews keep their deadline.

The suite runs the real model runtime. SIGSTOP stalls it (the kernel
still accepts connections, but nothing replies), then SIGKILL ends it
while stopped, and it starts again. Throughout, model reviews return
within the model deadline with every deterministic finding and the model
part UNAVAILABLE, while rules-only reviews and audit pages keep the
latency they had before the fault. The single-request version with no
model server at all is in test_fail_closed.py.
"""

import os
import signal
import time
import urllib.request

import pytest
from grpc_health.v1 import health_pb2

from services.cds.model_presence import MODEL_HEALTH_NAME
from tests.e2e.fault_load import (
    AUDIT_PAGE_PATH,
    REVIEW_PATH,
    RUN_ROOT,
    WITH_MODEL,
    HealthProbe,
    LoadClients,
    Recorder,
    has_interaction,
    latency_ms,
    missing_entries,
    rest_sender,
    review_sender,
    sample_sum,
    scrape,
    write_figures,
)
from tests.edge import EdgeClient
from tests.suite import Organization, own_stack

pytestmark = pytest.mark.e2e

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Seconds the model part of a review may take. Long enough for the real
# runtime to finish a short generation on a busy 2-core machine, where a
# full review took 55 s (8 tokens took 6.5 s) while other builds ran.
MODEL_TIMEOUT = 15.0
# Seconds a review may take beyond the model deadline: the screening and
# the response, on a loaded machine.
MARGIN = 2.0
# Seconds of load before the fault, while stalled and while killed.
STEADY = 4.0
STALLED = MODEL_TIMEOUT + 4.0
KILLED = 6.0
# Seconds the restarted runtime gets to reply to a review again.
RECOVERY_WAIT = 90.0
# The runtime generates at most 16 tokens, which cuts every reply off
# (model status INVALID). Recovery needs a reply from the runtime, not a
# complete review.
CDS_ENVIRONMENT = {
    "ARXIO_MODEL_CHECK_INTERVAL_SECONDS": "1",
    "ARXIO_MODEL_BREAKER_COOLDOWN_SECONDS": "3",
    "ARXIO_MODEL_OPTIONS": '{"num_predict": 16}',
}
# Model statuses of a review whose model call the runtime replied to.
ANSWERED = {"OK", "INVALID"}
# Rules-only reviews and audit pages during the fault may be this much
# slower than before it, at the median and at the maximum.
MEDIAN_SLACK = 2.0
MAX_LATENCY = 1.0


def model_ready(stack) -> bool:
    url = f"{stack.ollama_host}/api/version"
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def review_with_model(edge: EdgeClient, key: dict) -> dict:
    response = edge.request("POST", REVIEW_PATH, WITH_MODEL, key)
    assert 200 == response.status, response.body

    return response.json()


def recover(stack, edge: EdgeClient, key: dict) -> float | None:
    """Start the runtime again; return seconds until it replies to a review."""
    started = time.monotonic()
    stack.child("model").start()
    deadline = started + RECOVERY_WAIT
    while time.monotonic() < deadline:
        if model_ready(stack):
            review = review_with_model(edge, key)
            if review["modelReview"]["status"] in ANSWERED:
                return time.monotonic() - started
        time.sleep(0.5)

    return None


def test_stalled_and_killed_model():
    with own_stack(
        rules_only=False,
        model_dir=RUN_ROOT / "models",
        model_timeout=MODEL_TIMEOUT,
        service_environment={"cds": CDS_ENVIRONMENT},
    ) as stack:
        edge = EdgeClient(stack.edge_port, stack.certs_dir / "ca.crt")
        org = Organization(stack, "enterprise")
        key = {"x-api-key": org.api_key}
        model = stack.child("model")
        rules_senders = [
            review_sender(edge, key),
            rest_sender(edge, "audit page", "GET", AUDIT_PAGE_PATH, None, key),
        ]
        model_senders = [
            rest_sender(
                edge,
                "model review",
                "POST",
                REVIEW_PATH,
                WITH_MODEL,
                key,
                has_interaction,
            )
            for _ in range(3)
        ]
        cds_address = f"127.0.0.1:{stack.ports['cds']}"
        recorder = Recorder()
        with HealthProbe(
            cds_address, stack.certs_dir, MODEL_HEALTH_NAME, every=0.25
        ) as model_health:
            with LoadClients(recorder, rules_senders):
                time.sleep(STEADY)
                stalled = time.monotonic()
                os.kill(model.process.pid, signal.SIGSTOP)
                with LoadClients(recorder, model_senders):
                    time.sleep(STALLED)
                    model.kill()
                    time.sleep(KILLED)
                    ended = time.monotonic()
            recovered_after = recover(stack, edge, key)
        samples = scrape(stack.metrics_ports["cds"])
        outcomes = recorder.snapshot()
        baseline = recorder.started_between(0.0, stalled)
        during = [
            o
            for o in recorder.started_between(stalled, ended)
            if o.kind != "model review"
        ]
        model_reviews = recorder.started_between(
            stalled, ended, "model review"
        )
        missing = missing_entries(stack, recorder.request_ids())
        latency = {
            "before": latency_ms(baseline),
            "during": latency_ms(during),
            "model review": latency_ms(model_reviews),
        }
        write_figures(
            "model-stalled-killed",
            {
                "summary": f"model runtime stalled (SIGSTOP) for "
                f"{STALLED:g} s, then killed for {KILLED:g} s, under load",
                "requests_sent": len(outcomes),
                "requests_failed": sum(not o.ok for o in outcomes),
                "recovered_after_seconds": (
                    None
                    if recovered_after is None
                    else round(recovered_after, 2)
                ),
                "entries_lost": len(missing),
                "notes": (
                    f"{len(model_reviews)} model reviews during the fault, "
                    "all with their findings, the slowest in "
                    f"{latency['model review']['max_ms'] / 1000:.1f} s "
                    f"(deadline {MODEL_TIMEOUT:g} s); rules-only reviews "
                    f"and audit pages p50 {latency['before']['p50_ms']} ms "
                    f"before, {latency['during']['p50_ms']} ms during"
                ),
                "latency": latency,
            },
        )

        assert [] == [
            (o.kind, o.status, o.detail) for o in outcomes if not o.ok
        ]
        assert model_reviews, "no model review was sent during the fault"
        assert {"UNAVAILABLE"} == {o.detail for o in model_reviews}
        assert [] == [
            round(o.seconds, 2)
            for o in model_reviews
            if o.seconds > MODEL_TIMEOUT + MARGIN
        ]
        assert baseline, "no request before the fault"
        assert during, "no rules-only request during the fault"
        assert latency["during"]["p50_ms"] <= (
            latency["before"]["p50_ms"] * MEDIAN_SLACK + 20
        ), latency
        assert latency["during"]["max_ms"] <= MAX_LATENCY * 1000, latency
        assert sample_sum(
            samples, "arxio_model_calls_total", outcome="timeout"
        )
        assert sample_sum(
            samples, "arxio_model_reviews_skipped_total", cause="breaker_open"
        )
        assert model_health.first(NOT_SERVING, after=stalled) is not None
        assert recovered_after is not None, "the runtime answered no review"
        assert model_health.first(SERVING, after=ended) is not None
        assert set() == missing
