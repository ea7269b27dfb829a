"""The soak's checks on model reviews and on child processes."""

import os
import sys

from bench.soak import (
    NOT_RUNNING,
    model_review_problem,
    stopped_processes,
    verdict_text,
)
from services.launcher.processes import ChildProcess


def review(model_status: str, reason: str = "") -> dict:
    return {
        "findings": [{"category": "DRUG_INTERACTION"}],
        "modelReview": {"status": model_status, "reason": reason},
    }


def test_model_review_ok_passes():
    assert model_review_problem(review("OK")) is None


def test_model_review_timeout_fails():
    problem = model_review_problem(
        review("UNAVAILABLE", "model server timed out after 30 s")
    )

    assert problem is not None
    assert "UNAVAILABLE" in problem
    assert "timed out" in problem


def test_model_review_invalid_fails():
    assert model_review_problem(review("INVALID")) is not None


def test_model_review_without_interaction_fails():
    reply = review("OK")
    reply["findings"] = []

    assert "DRUG_INTERACTION" in model_review_problem(reply)


def child(name: str, code: str) -> ChildProcess:
    process = ChildProcess(
        name, [sys.executable, "-c", code], dict(os.environ)
    )
    process.start()

    return process


def test_stopped_processes_names_ended_child():
    ended = child("cds", "pass")
    running = child("auth", "import time; time.sleep(60)")
    try:
        ended.process.wait(30)

        assert stopped_processes([ended, running]) == ["cds"]
    finally:
        running.stop()


def test_verdict_names_stopped_processes():
    failures = {"requests failed": 0, NOT_RUNNING: 2}

    verdict = verdict_text(failures, ["cds", "model-runtime"])

    assert verdict == f"failed: {NOT_RUNNING} (cds, model-runtime)"


def test_verdict_lists_failed_checks():
    failures = {"requests failed": 3, "entries lost": 0, NOT_RUNNING: 0}

    assert verdict_text(failures, []) == "failed: requests failed"


def test_verdict_passes_without_failures():
    failures = {"requests failed": 0, NOT_RUNNING: 0}

    assert verdict_text(failures, []) == "passed"
