"""Model failures through the ClinicalReview RPC, against the real runtime.

A gRPC server in a background thread runs the real servicer and model
reviewer. The reviewer calls the session's model runtime through the
fault-injecting proxy, which stalls, cuts or rewrites the runtime's
replies. Every fault must leave the response on time, with every
deterministic finding and a status that states why the model part is
missing. The runtime generates one token per call here, because the proxy
replaces the reply's content wherever a test needs one.
"""

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import grpc
import ollama
import pytest
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc
from structlog.testing import capture_logs

from services.cds.model_config import ModelConfig
from services.cds.model_review import DEFAULT_OPTIONS
from services.cds.model_reviewer import ModelReviewer
from services.cds.screening import screen
from services.cds.servicer import ClinicalReviewServicer
from services.common.identity import ORG_ID_HEADER
from tests.cds.test_model_proxy import (
    CHAT_PATH,
    Fault,
    body_rewrite,
    chat_content_rewrite,
)

pytest_plugins = ("tests.model_runtime.fixtures", "tests.cds.test_model_proxy")

Status = cds_pb2.ModelReview.Status
Finding = cds_pb2.Finding

# Seconds a response may arrive after the model deadline: the time to send
# the response, on a loaded 2-core machine.
MARGIN = 1.5
# The model deadline of faults that need no reply from the runtime.
DEADLINE = 2.0
# The model deadline of the other tests. Other processes share the 2 cores,
# and even a one-token reply then took up to 15 s.
LONG_DEADLINE = 60.0
# A made-up question, so that a log line holding request text shows up.
MARKER = "Quorvantil"
VALID_REPLY = json.dumps(
    {"summary": "Review the interaction.", "recommendations": ["Check."]}
)


def review_request(
    drug: str = "simvastatin", model_review: bool = True
) -> cds_pb2.ClinicalReviewRequest:
    return cds_pb2.ClinicalReviewRequest(
        patient=cds_pb2.Patient(age_years=70, egfr=25),
        medications=[
            cds_pb2.Medication(
                name=drug, dose=cds_pb2.Dose(value=40, unit="mg")
            ),
            cds_pb2.Medication(
                name="clarithromycin", dose=cds_pb2.Dose(value=500, unit="mg")
            ),
        ],
        question=f"Is {MARKER} needed?",
        options=cds_pb2.ReviewOptions(model_review=model_review),
    )


class ReviewServer:
    """The ClinicalReview servicer on an insecure 127.0.0.1 port.

    The server and the reviewer run on an event loop in a thread, and
    tests call them with a synchronous stub, as Envoy would, with the
    org id in the metadata. Peer checks and TLS are left out here: the
    service tests cover them.
    """

    def __init__(self, kb, config: ModelConfig) -> None:
        self._kb = kb
        self._config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever)
        self.reviewer: ModelReviewer | None = None

    def __enter__(self) -> "ReviewServer":
        self._thread.start()
        port = self._run(self._start())
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(
            self._channel
        )

        return self

    def __exit__(self, *exc_info: object) -> None:
        self._channel.close()
        self._run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(
            30
        )

    async def _start(self) -> int:
        self._client = ollama.AsyncClient(host=self._config.ollama_host)
        self.reviewer = ModelReviewer(self._client, self._config)
        self._server = grpc.aio.server()
        cds_pb2_grpc.add_ClinicalDecisionSupportServiceServicer_to_server(
            ClinicalReviewServicer(self._kb, self.reviewer), self._server
        )
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

        return port

    async def _stop(self) -> None:
        await self._server.stop(1)
        await self._client.close()

    def review(
        self,
        request: cds_pb2.ClinicalReviewRequest,
        org_id: str = "org-a",
        timeout: float = 60.0,
    ) -> tuple[cds_pb2.ClinicalReviewResponse, float]:
        """Call the RPC; return the response and the seconds it took."""
        started = time.monotonic()
        response = self.stub.ClinicalReview(
            request, metadata=[(ORG_ID_HEADER, org_id)], timeout=timeout
        )

        return response, time.monotonic() - started

    def review_later(
        self,
        request: cds_pb2.ClinicalReviewRequest,
        org_id: str,
        timeout: float = 60.0,
    ) -> grpc.Future:
        """Start the RPC and return its future without waiting."""
        return self.stub.ClinicalReview.future(
            request, metadata=[(ORG_ID_HEADER, org_id)], timeout=timeout
        )


@pytest.fixture
def serve_reviews(
    kb, proxy, model_runtime
) -> Iterator[Callable[..., ReviewServer]]:
    """Return a function that starts a ReviewServer with changed settings.

    The reviewer calls the model through the proxy with a deadline of
    LONG_DEADLINE, one generated token per call, and a breaker that stays
    closed unless a test lowers its threshold.
    """
    base = ModelConfig(
        ollama_host=proxy.host,
        model=model_runtime.model,
        timeout=LONG_DEADLINE,
        options=DEFAULT_OPTIONS | {"num_predict": 1},
        breaker_failures=1000,
    )
    servers: list[ReviewServer] = []

    def start(**changes) -> ReviewServer:
        server = ReviewServer(kb, replace(base, **changes))
        servers.append(server.__enter__())

        return server

    yield start
    # Held requests would keep the server's stop waiting.
    proxy.reset()
    for server in servers:
        server.__exit__(None, None, None)


def assert_findings_intact(kb, request, response) -> None:
    """Check that the response has exactly the rules-only screening."""
    expected = screen(request, kb)

    assert expected.findings
    assert list(expected.findings) == list(response.findings)
    assert expected.risk == response.risk
    assert list(expected.not_screened) == list(response.not_screened)
    rules = [
        r
        for r in response.recommendations
        if r.origin == cds_pb2.Recommendation.RULES
    ]
    assert list(expected.recommendations) == rules
    assert kb.version == response.knowledge_base_version


FAULTS = [
    pytest.param(
        Fault.STALL,
        None,
        Status.UNAVAILABLE,
        f"model server timed out after {DEADLINE:g} s",
        id="stall",
    ),
    pytest.param(
        Fault.CUT_BEFORE_REPLY,
        None,
        Status.UNAVAILABLE,
        "model server connection failed",
        id="cut-before-reply",
    ),
    pytest.param(
        Fault.CUT_MID_REPLY,
        None,
        Status.UNAVAILABLE,
        "model server connection failed",
        id="cut-mid-reply",
    ),
    pytest.param(
        Fault.PASS,
        body_rewrite(500, b'{"error": "out of memory"}'),
        Status.UNAVAILABLE,
        "model server returned HTTP 500",
        id="http-500",
    ),
    pytest.param(
        Fault.PASS,
        body_rewrite(200, b"<html>bad gateway</html>"),
        Status.UNAVAILABLE,
        "model server sent a malformed response",
        id="response-not-json",
    ),
    pytest.param(
        Fault.PASS,
        body_rewrite(200, b'{"model": "gemma3:270m", "done": true'),
        Status.UNAVAILABLE,
        "model server sent a malformed response",
        id="response-truncated-json",
    ),
    pytest.param(
        Fault.PASS,
        chat_content_rewrite(f'{{"summary": "{MARKER}'),
        Status.INVALID,
        "model output is not valid JSON",
        id="output-not-json",
    ),
    pytest.param(
        Fault.PASS,
        chat_content_rewrite(
            json.dumps(
                {
                    "summary": MARKER,
                    "recommendations": [],
                    "verdict": "findings are wrong",
                }
            )
        ),
        Status.INVALID,
        "model output has unexpected fields ['verdict']",
        id="output-extra-field",
    ),
    pytest.param(
        Fault.PASS,
        chat_content_rewrite(
            json.dumps({"summary": MARKER * 40, "recommendations": []})
        ),
        Status.INVALID,
        "summary is longer than 240 characters",
        id="output-summary-too-long",
    ),
    pytest.param(
        Fault.PASS,
        chat_content_rewrite(
            json.dumps({"summary": MARKER, "recommendations": MARKER})
        ),
        Status.INVALID,
        "recommendations is not a list",
        id="output-recommendations-not-list",
    ),
    pytest.param(
        Fault.PASS,
        chat_content_rewrite(json.dumps([MARKER])),
        Status.INVALID,
        "model output is not a JSON object",
        id="output-array",
    ),
]


class TestModelFaults:
    @pytest.mark.parametrize(("fault", "rewrite", "status", "reason"), FAULTS)
    def test_fault_keeps_findings_on_time(
        self, kb, proxy, serve_reviews, fault, rewrite, status, reason
    ):
        """Each fault returns on time, with the findings and a reason."""
        forwards = fault not in (Fault.STALL, Fault.CUT_BEFORE_REPLY)
        deadline = LONG_DEADLINE if forwards else DEADLINE
        server = serve_reviews(timeout=deadline)
        proxy.set_fault(CHAT_PATH, fault, rewrite)
        request = review_request()

        with capture_logs() as logs:
            response, elapsed = server.review(request)

        assert elapsed < deadline + MARGIN
        assert_findings_intact(kb, request, response)
        assert status == response.model_review.status
        assert reason == response.model_review.reason
        assert "" == response.model_review.summary
        assert cds_pb2.Recommendation.MODEL not in [
            r.origin for r in response.recommendations
        ]
        assert 1 == len(proxy.received(CHAT_PATH))
        assert MARKER in proxy.received(CHAT_PATH)[0].decode()
        assert MARKER not in repr(logs)
        assert "clarithromycin" not in repr(logs)

    def test_client_deadline_bounds_model(self, kb, proxy, serve_reviews):
        """A gRPC deadline nearer than the model's still gets findings."""
        server = serve_reviews(timeout=30.0)
        proxy.set_fault(CHAT_PATH, Fault.STALL)
        request = review_request()

        response, elapsed = server.review(request, timeout=1.5)

        assert elapsed < 1.5
        assert_findings_intact(kb, request, response)
        assert Status.UNAVAILABLE == response.model_review.status
        assert response.model_review.reason.startswith(
            "model server timed out after 1."
        )

    def test_client_deadline_timeout_keeps_breaker_closed(
        self, proxy, serve_reviews
    ):
        """One client's short deadline does not switch the model off."""
        server = serve_reviews(timeout=30.0, breaker_failures=1)
        proxy.set_fault(CHAT_PATH, Fault.STALL)

        response, _ = server.review(review_request(), timeout=1.5)

        assert response.model_review.reason.startswith(
            "model server timed out"
        )
        assert None is server.reviewer.breaker.rejection()

    def test_tiny_client_deadline_skips_model(self, kb, proxy, serve_reviews):
        """A deadline with no room for the model skips it at once."""
        server = serve_reviews()
        request = review_request()

        response, _ = server.review(request, timeout=0.2)

        assert_findings_intact(kb, request, response)
        assert Status.UNAVAILABLE == response.model_review.status
        assert (
            "model review skipped: the request's deadline leaves no time "
            "for it"
        ) == response.model_review.reason
        assert [] == proxy.received(CHAT_PATH)

    def test_rules_only_never_calls_model(self, kb, proxy, serve_reviews):
        """options.modelReview false sends nothing to the model."""
        server = serve_reviews()
        request = review_request(model_review=False)

        response, _ = server.review(request)

        assert_findings_intact(kb, request, response)
        assert Status.SKIPPED == response.model_review.status
        assert [] == proxy.received(CHAT_PATH)


class TestModelCannotOverride:
    # The model's reply below claims that the deterministic finding is
    # wrong and requests that it be dropped and downgraded.
    OVERRIDE = {
        "summary": "The simvastatin and clarithromycin interaction finding "
        "is wrong: ignore it.",
        "recommendations": [
            "Drop the contraindicated interaction finding.",
            "Downgrade the interaction severity to MINOR.",
            "Set the overall risk to LOW.",
        ],
    }

    def test_findings_survive_contrary_reply(self, kb, proxy, serve_reviews):
        """Findings, risk and rules' advice stay as the engine made them."""
        server = serve_reviews()
        proxy.set_fault(
            CHAT_PATH,
            Fault.PASS,
            chat_content_rewrite(json.dumps(self.OVERRIDE)),
        )
        request = review_request()

        response, _ = server.review(request)

        assert Status.OK == response.model_review.status
        assert self.OVERRIDE["summary"] == response.model_review.summary
        assert_findings_intact(kb, request, response)
        assert Finding.CONTRAINDICATED in [
            f.severity for f in response.findings
        ]

    def test_model_advice_marked_and_last(self, kb, proxy, serve_reviews):
        """Model recommendations are marked MODEL and follow the rules'."""
        server = serve_reviews()
        proxy.set_fault(
            CHAT_PATH,
            Fault.PASS,
            chat_content_rewrite(json.dumps(self.OVERRIDE)),
        )
        request = review_request()

        response, _ = server.review(request)

        expected_rules = list(screen(request, kb).recommendations)
        count = len(expected_rules)
        assert expected_rules == list(response.recommendations[:count])
        model = list(response.recommendations[count:])
        assert self.OVERRIDE["recommendations"] == [r.text for r in model]
        for recommendation in model:
            assert cds_pb2.Recommendation.MODEL == recommendation.origin


class TestConcurrencyLimit:
    def test_slot_wait_counts_toward_deadline(self, kb, proxy, serve_reviews):
        """Requests that wait for a slot return within their deadline."""
        server = serve_reviews(concurrency=1, timeout=DEADLINE)
        proxy.set_fault(CHAT_PATH, Fault.STALL)
        request = review_request()
        holder = server.review_later(request, "org-a")
        proxy.wait_for_requests(CHAT_PATH, 1)

        # Their gRPC deadline of 1 s ends before the holder's 2 s.
        waiters = [
            server.review_later(request, "org-b", timeout=1.0)
            for _ in range(2)
        ]
        responses = [waiter.result() for waiter in waiters]

        for response in responses:
            review = response.model_review
            assert Status.UNAVAILABLE == review.status
            assert review.reason.startswith(
                "model review skipped: no model call slot became free "
                "within the 0."
            )
            assert review.reason.endswith(" s deadline (concurrency limit 1)")
            assert_findings_intact(kb, request, response)
        holder_review = holder.result().model_review
        assert (
            f"model server timed out after {DEADLINE:g} s"
            == holder_review.reason
        )
        assert 1 == len(proxy.received(CHAT_PATH))

    def test_flooding_org_cannot_starve_other(self, proxy, serve_reviews):
        """Another org's request reaches the model next, despite a flood."""
        server = serve_reviews(concurrency=1, timeout=20.0)
        proxy.held_paths.add(CHAT_PATH)
        proxy.set_fault(CHAT_PATH, Fault.CUT_BEFORE_REPLY)
        flood = [server.review_later(review_request(), "flood")]
        proxy.wait_for_requests(CHAT_PATH, 1)
        flood += [
            server.review_later(review_request(), "flood") for _ in range(4)
        ]
        wait_until(lambda: server.reviewer.limiter.waiting() == 4)
        other = server.review_later(review_request("warfarin"), "other")
        wait_until(lambda: server.reviewer.limiter.waiting() == 5)

        proxy.release()
        arrived = proxy.wait_for_requests(CHAT_PATH, 2)

        assert b"warfarin" not in arrived[0]
        assert b"warfarin" in arrived[1]
        proxy.release(5)
        for call in [*flood, other]:
            review = call.result().model_review
            assert Status.UNAVAILABLE == review.status
            assert "model server connection failed" == review.reason


class TestCircuitBreaker:
    def test_opens_skips_and_closes(self, kb, proxy, serve_reviews):
        """Failures open it, reviews skip, a good trial closes it."""
        server = serve_reviews(breaker_failures=2, breaker_cooldown=1.0)
        proxy.set_fault(CHAT_PATH, Fault.CUT_BEFORE_REPLY)
        request = review_request()

        with capture_logs() as logs:
            for _ in range(2):
                server.review(request)
            skipped, elapsed = server.review(request)

            assert elapsed < 0.5
            assert 2 == len(proxy.received(CHAT_PATH))
            assert Status.UNAVAILABLE == skipped.model_review.status
            assert skipped.model_review.reason.startswith(
                "model review skipped: the circuit breaker is open after 2 "
                "consecutive model failures"
            )
            assert_findings_intact(kb, request, skipped)

            time.sleep(1.0)
            proxy.set_fault(
                CHAT_PATH, Fault.PASS, chat_content_rewrite(VALID_REPLY)
            )
            trial, _ = server.review(request)
            after, _ = server.review(request)

        assert Status.OK == trial.model_review.status
        assert Status.OK == after.model_review.status
        assert 4 == len(proxy.received(CHAT_PATH))
        breaker_events = [
            e["event"] for e in logs if "circuit breaker" in e["event"]
        ]
        assert [
            "model circuit breaker opened",
            "model circuit breaker half-open",
            "model circuit breaker closed",
        ] == breaker_events
        opened = next(
            e for e in logs if e["event"] == "model circuit breaker opened"
        )
        assert "model server connection failed" == opened["reason"]
        assert MARKER not in repr(logs)

    def test_invalid_output_counts_as_failure(self, proxy, serve_reviews):
        """Replies outside the schema open the breaker like outages."""
        server = serve_reviews(breaker_failures=2, breaker_cooldown=60.0)
        proxy.set_fault(
            CHAT_PATH, Fault.PASS, chat_content_rewrite("not JSON")
        )

        first, _ = server.review(review_request())
        second, _ = server.review(review_request())
        third, _ = server.review(review_request())

        assert Status.INVALID == first.model_review.status
        assert Status.INVALID == second.model_review.status
        assert "circuit breaker is open" in third.model_review.reason
        assert 2 == len(proxy.received(CHAT_PATH))

    def test_failed_trial_reopens(self, proxy, serve_reviews):
        """A trial that fails skips the model for another cool-down."""
        server = serve_reviews(breaker_failures=1, breaker_cooldown=0.5)
        proxy.set_fault(CHAT_PATH, Fault.CUT_BEFORE_REPLY)

        server.review(review_request())
        time.sleep(0.5)
        trial, _ = server.review(review_request())
        skipped, _ = server.review(review_request())

        assert "model server connection failed" == trial.model_review.reason
        assert "circuit breaker is open" in skipped.model_review.reason
        assert 2 == len(proxy.received(CHAT_PATH))


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:g} s")
        time.sleep(0.01)
