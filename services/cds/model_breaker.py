"""A circuit breaker for model calls.

After `failure_threshold` consecutive failures (server down, timed out, or
a reply outside the schema) the breaker opens: reviews skip the model at
once for `cooldown` seconds. The first review after the cool-down is the
one trial call (half-open). Its success closes the breaker, and its failure
opens it for another cool-down. Log lines carry counts and the failure
reason, which never contains request or reply text.
"""

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger()


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True)
class Permit:
    """Permission for one model call; `trial` marks the half-open call."""

    trial: bool


class CircuitBreaker:
    """Track consecutive model failures; not thread-safe (one event loop)."""

    def __init__(
        self,
        failure_threshold: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(
                f"failure_threshold must be at least 1, got "
                f"{failure_threshold}"
            )
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_running = False

    @property
    def state(self) -> BreakerState:
        return self._state

    def rejection(self) -> str | None:
        """Return why a call may not go to the model now, or None.

        This only reads the state, so a review can check it before it
        waits for a slot and call `admit` once it has one.
        """
        if self._state is BreakerState.CLOSED:
            return None
        if self._state is BreakerState.HALF_OPEN:
            if self._trial_running:
                return (
                    "model review skipped: the circuit breaker is half-open "
                    "and a trial call to the model server is running"
                )
            return None
        remaining = self._opened_at + self.cooldown - self._clock()
        if remaining <= 0:
            return None

        return (
            "model review skipped: the circuit breaker is open after "
            f"{self._failures} consecutive model failures; the next trial "
            f"call is in {max(round(remaining), 1)} s"
        )

    def admit(self) -> Permit | None:
        """Return a permit for one model call, or None while calls skip.

        Once the cool-down has passed, the first caller gets the trial
        permit and the breaker turns half-open.
        """
        if self.rejection() is not None:
            return None
        if self._state is BreakerState.OPEN:
            self._state = BreakerState.HALF_OPEN
            log.info(
                "model circuit breaker half-open",
                cooldown_s=self.cooldown,
            )
        if self._state is BreakerState.HALF_OPEN:
            self._trial_running = True
            return Permit(trial=True)

        return Permit(trial=False)

    def record_success(self, permit: Permit) -> None:
        """Reset the failure count; a successful trial closes the breaker."""
        self._failures = 0
        if permit.trial:
            self._trial_running = False
        if self._state is not BreakerState.CLOSED:
            self._state = BreakerState.CLOSED
            log.info("model circuit breaker closed")

    def record_failure(self, permit: Permit, reason: str) -> None:
        """Count a failure; open the breaker at the threshold or on a trial.

        `reason` must be one of the model review's fixed reasons, which
        name fields and limits only.
        """
        self._failures += 1
        if permit.trial:
            self._trial_running = False
            self._open(reason)
        elif (
            self._state is BreakerState.CLOSED
            and self._failures >= self.failure_threshold
        ):
            self._open(reason)

    def record_abandoned(self, permit: Permit) -> None:
        """Forget a call that ended without an outcome, as on cancellation.

        An abandoned trial lets the next caller make the trial call.
        """
        if permit.trial:
            self._trial_running = False

    def _open(self, reason: str) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        log.warning(
            "model circuit breaker opened",
            consecutive_failures=self._failures,
            cooldown_s=self.cooldown,
            reason=reason,
        )
