"""The soak's checks on model reviews, child processes, memory and its
options."""

import os
import sys

import pytest

from bench.soak import (
    EDGE_SAMPLES,
    NOT_RUNNING,
    POSTGRES_TOTAL,
    growth,
    judged,
    late_backends,
    model_review_problem,
    parse_arguments,
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


def test_arguments_default_to_fifteen_minutes():
    args = parse_arguments([])

    assert 15.0 == args.minutes
    assert 5.0 == args.warm_up_minutes


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rate", "0"], "--rate must be a number above 0"),
        (["--rate", "-5"], "--rate must be a number above 0"),
        (["--model-every", "0"], "--model-every must be a number above 0"),
        (["--sample-seconds", "-1"], "--sample-seconds must be a number"),
        (["--minutes", "nan"], "--minutes must be a number above 0"),
        (["--warm-up-minutes", "-1"], "--warm-up-minutes must be a number"),
        (["--minutes", "5"], "must be shorter than --minutes"),
        # 3 s after the warm-up: both ends of the comparison would be the
        # same samples.
        (
            ["--minutes", "1", "--warm-up-minutes", "0.95"],
            "contain too few memory samples",
        ),
    ],
)
def test_invalid_arguments_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(argv)

    assert 2 == exit_info.value.code
    assert message in capsys.readouterr().err


def test_short_run_with_frequent_samples_accepted():
    args = parse_arguments(
        ["--minutes", "1", "--warm-up-minutes", "0.5", "--sample-seconds", "2"]
    )

    assert 2.0 == args.sample_seconds


SERVICE = "cds"
BACKEND = "postgres 101 (backend of arxio_audit)"
LATE_BACKEND = "postgres 102 (backend of arxio_audit)"
CHECKPOINTER = "postgres 100 (checkpointer)"
# Samples in the warm-up of these tests.
WARM_UP = 4


def memory_samples(count: int, **series) -> list[dict[str, int]]:
    """Return `count` samples of the processes named by the keywords.

    Each keyword's function maps a sample's index to KiB, or to None
    while the process is not running.
    """
    samples = []
    for index in range(count):
        sample = {}
        for name, kib in series.items():
            value = kib(index)
            if value is not None:
                sample[name] = value
        samples.append(sample)

    return samples


def test_judged_covers_backends_and_total():
    assert judged(SERVICE)
    assert judged(BACKEND)
    assert judged(POSTGRES_TOTAL)
    assert not judged(CHECKPOINTER)


def test_growth_flags_backend_hidden_in_total():
    samples = memory_samples(
        20,
        backend=lambda i: 4000 if i < WARM_UP + EDGE_SAMPLES else 6000,
        checkpointer=lambda i: 300,
        big=lambda i: 200_000,
    )
    for sample in samples:
        sample[BACKEND] = sample.pop("backend")
        sample[CHECKPOINTER] = sample.pop("checkpointer")
        sample["postgres 103 (backend of arxio_auth)"] = sample.pop("big")

    memory = growth(samples, WARM_UP)

    assert 0.5 == memory[BACKEND]["growth"]
    assert memory[POSTGRES_TOTAL]["growth"] < 0.02


def test_late_backend_gets_own_warm_up():
    opened = 6
    samples = memory_samples(
        30,
        late=lambda i: None if i < opened else 1000 + 100 * min(i, 10),
    )
    for sample in samples:
        if "late" in sample:
            sample[LATE_BACKEND] = sample.pop("late")

    memory = growth(samples, WARM_UP)

    assert opened + WARM_UP == memory[LATE_BACKEND]["baseline_sample"]
    assert 0.0 == memory[LATE_BACKEND]["growth"]
    assert [] == late_backends(samples, memory)


def test_backend_opened_near_end_not_judged():
    samples = memory_samples(
        12, late=lambda i: None if i < 8 else 1000, service=lambda i: 5000
    )
    for sample in samples:
        if "late" in sample:
            sample[LATE_BACKEND] = sample.pop("late")

    memory = growth(samples, WARM_UP)

    assert LATE_BACKEND not in memory
    assert [LATE_BACKEND] == late_backends(samples, memory)
    assert "service" in memory


def test_unreadable_memory_has_no_growth():
    samples = memory_samples(12, service=lambda i: 0)

    memory = growth(samples, WARM_UP)

    assert memory["service"]["growth"] is None
