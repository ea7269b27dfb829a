"""Guard the model review with a deadline, fair slots and a circuit breaker.

One deadline (ARXIO_MODEL_TIMEOUT_SECONDS, or less when the gRPC call's
own deadline is nearer) bounds the whole model part of a review: the wait
for a slot, the connection and the reply. Whatever the model server does,
`review` returns a ModelReview whose status and reason state why the model
part is missing, and the caller returns every deterministic finding with
it.
"""

import asyncio
from collections.abc import Sequence

import ollama
import structlog
from arxio.cds.v1 import cds_pb2

from services.cds.model_breaker import CircuitBreaker, Permit
from services.cds.model_config import ModelConfig
from services.cds.model_limiter import FairLimiter
from services.cds.model_review import run_model_review
from services.common import metrics

log = structlog.get_logger()

Status = cds_pb2.ModelReview.Status
ReviewResult = tuple[cds_pb2.ModelReview, list[cds_pb2.Recommendation]]

# Seconds kept back from the gRPC call's own deadline for sending the
# response, so that a short client deadline still gets the findings.
RESPONSE_RESERVE = 0.25


class ModelReviewer:
    """Run model reviews within the configured bounds.

    Model failures become a status and a reason. Only cancellation of the
    calling task raises.
    """

    def __init__(
        self,
        client: ollama.AsyncClient,
        config: ModelConfig,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self._client = client
        self._config = config
        self.limiter = FairLimiter(config.concurrency)
        self.breaker = breaker or CircuitBreaker(
            config.breaker_failures, config.breaker_cooldown
        )

    async def review(
        self,
        request: cds_pb2.ClinicalReviewRequest,
        findings: Sequence[cds_pb2.Finding],
        org_id: str,
        time_remaining: float | None = None,
    ) -> ReviewResult:
        """Review one request for `org_id` within the deadline.

        `time_remaining` is the gRPC call's remaining time in seconds, or
        None when the call has no deadline. Callers without an org id
        share the queue of the empty id.
        """
        budget = self._config.timeout
        if time_remaining is not None:
            budget = min(budget, time_remaining - RESPONSE_RESERVE)
        if budget <= 0:
            return self._skipped(
                "model review skipped: the request's deadline leaves no "
                "time for it",
                "deadline",
            )
        rejection = self.breaker.rejection()
        if rejection is not None:
            return self._skipped(rejection, "breaker_open")

        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        try:
            async with asyncio.timeout_at(deadline):
                await self.limiter.acquire(org_id)
        except TimeoutError:
            return self._skipped(
                "model review skipped: no model call slot became free "
                f"within the {round(budget, 1):g} s deadline (concurrency "
                f"limit {self.limiter.limit})",
                "no_slot",
            )
        try:
            return await self._call_model(
                request, findings, deadline - loop.time(), budget
            )
        finally:
            self.limiter.release(org_id)

    async def _call_model(
        self,
        request: cds_pb2.ClinicalReviewRequest,
        findings: Sequence[cds_pb2.Finding],
        remaining: float,
        budget: float,
    ) -> ReviewResult:
        if remaining <= 0:
            return self._skipped(
                "model review skipped: no time was left of the "
                f"{round(budget, 1):g} s deadline after the wait for a slot",
                "deadline",
            )
        # The breaker may have opened while this review waited for a slot.
        permit = self.breaker.admit()
        if permit is None:
            return self._skipped(
                self.breaker.rejection()
                or "model review skipped: the circuit breaker is open",
                "breaker_open",
            )

        result: ReviewResult | None = None
        try:
            result = await run_model_review(
                self._client,
                self._config.model,
                request,
                findings,
                remaining,
                options=self._config.options,
                keep_alive=self._config.keep_alive,
            )
        finally:
            if result is None:
                # Cancelled, say because the client went away.
                self.breaker.record_abandoned(permit)
        self._record(permit, result[0], remaining)

        return result

    def _record(
        self, permit: Permit, review: cds_pb2.ModelReview, allowed: float
    ) -> None:
        """Tell the breaker how the call went.

        A timeout counts against the model only when the call had the whole
        configured deadline: one client's short deadline, or a long wait for
        a slot, is no sign of the model's health and must not open the
        breaker for every organization.
        """
        if review.status == Status.OK:
            self.breaker.record_success(permit)
        elif "timed out" in review.reason and allowed < self._config.timeout:
            self.breaker.record_abandoned(permit)
        else:
            self.breaker.record_failure(permit, review.reason)

    def _skipped(self, reason: str, cause: str) -> ReviewResult:
        # The reason contains counts and limits only, never request text.
        # `cause` is the reason's fixed name in the metrics.
        metrics.MODEL_REVIEWS_SKIPPED.labels(cause).inc()
        log.info(
            "model review skipped",
            status="UNAVAILABLE",
            model=self._config.model,
            reason=reason,
        )
        review = cds_pb2.ModelReview(
            status=Status.UNAVAILABLE, model=self._config.model, reason=reason
        )

        return review, []
