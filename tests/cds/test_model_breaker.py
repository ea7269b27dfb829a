"""The circuit breaker of model calls."""

import pytest
from structlog.testing import capture_logs

from services.cds.model_breaker import BreakerState, CircuitBreaker

REASON = "model server unreachable"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def failed_calls(breaker: CircuitBreaker, count: int) -> None:
    for _ in range(count):
        permit = breaker.admit()
        assert permit is not None
        breaker.record_failure(permit, REASON)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breaker(clock) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=3, cooldown=30.0, clock=clock)


class TestCircuitBreaker:
    def test_threshold_below_one_rejected(self):
        """A threshold of 0 is a configuration error."""
        with pytest.raises(ValueError, match="at least 1"):
            CircuitBreaker(failure_threshold=0, cooldown=1.0)

    def test_stays_closed_below_threshold(self, breaker):
        """Fewer consecutive failures than the threshold keep it closed."""
        failed_calls(breaker, 2)

        assert BreakerState.CLOSED == breaker.state
        assert None is breaker.rejection()

    def test_success_resets_failure_count(self, breaker):
        """Failures must be consecutive to open the breaker."""
        failed_calls(breaker, 2)
        breaker.record_success(breaker.admit())
        failed_calls(breaker, 2)

        assert BreakerState.CLOSED == breaker.state

    def test_opens_at_threshold(self, breaker):
        """The third consecutive failure opens it, and calls skip."""
        with capture_logs() as logs:
            failed_calls(breaker, 3)

        assert BreakerState.OPEN == breaker.state
        assert None is breaker.admit()
        assert (
            "model review skipped: the circuit breaker is open after 3 "
            "consecutive model failures; the next trial call is in 30 s"
        ) == breaker.rejection()
        assert [
            {
                "event": "model circuit breaker opened",
                "log_level": "warning",
                "consecutive_failures": 3,
                "cooldown_s": 30.0,
                "reason": REASON,
            }
        ] == logs

    def test_rejection_counts_down(self, breaker, clock):
        """The reason gives the cool-down's remaining seconds."""
        failed_calls(breaker, 3)
        clock.now += 20.4

        assert breaker.rejection().endswith("next trial call is in 10 s")

    def test_one_trial_after_cooldown(self, breaker, clock):
        """After the cool-down one call is admitted and others skip."""
        failed_calls(breaker, 3)
        clock.now += 30

        with capture_logs() as logs:
            trial = breaker.admit()

        assert trial is not None
        assert trial.trial
        assert BreakerState.HALF_OPEN == breaker.state
        assert None is breaker.admit()
        assert "trial call to the model server is running" in (
            breaker.rejection()
        )
        assert ["model circuit breaker half-open"] == [
            entry["event"] for entry in logs
        ]

    def test_successful_trial_closes(self, breaker, clock):
        """A trial that succeeds closes the breaker and logs it."""
        failed_calls(breaker, 3)
        clock.now += 30
        trial = breaker.admit()

        with capture_logs() as logs:
            breaker.record_success(trial)

        assert BreakerState.CLOSED == breaker.state
        assert ["model circuit breaker closed"] == [
            entry["event"] for entry in logs
        ]
        permit = breaker.admit()
        assert permit is not None
        assert not permit.trial

    def test_failed_trial_reopens(self, breaker, clock):
        """A trial that fails opens the breaker for a new cool-down."""
        failed_calls(breaker, 3)
        clock.now += 30
        trial = breaker.admit()

        breaker.record_failure(trial, REASON)

        assert BreakerState.OPEN == breaker.state
        assert None is breaker.admit()
        clock.now += 29
        assert None is breaker.admit()
        clock.now += 1
        assert breaker.admit().trial

    def test_abandoned_trial_allows_another(self, breaker, clock):
        """A trial cancelled without an outcome lets the next call try."""
        failed_calls(breaker, 3)
        clock.now += 30
        trial = breaker.admit()

        breaker.record_abandoned(trial)

        assert BreakerState.HALF_OPEN == breaker.state
        assert breaker.admit().trial
