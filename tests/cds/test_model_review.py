"""The model review: prompt building, reply checks and failure handling.

Reviews run against the real model runtime, a port nothing listens on, or
a small local HTTP server that sends fixed Ollama chat responses.
"""

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import ollama
import pytest
from arxio.cds.v1 import cds_pb2
from structlog.testing import capture_logs

from services.cds.model_review import (
    MAX_RECOMMENDATIONS,
    NUM_PREDICT,
    RECOMMENDATION_MAX_CHARS,
    SCHEMA,
    SUMMARY_MAX_CHARS,
    age_group,
    build_messages,
    egfr_category,
    run_model_review,
    skipped_review,
    validate_reply,
)

pytest_plugins = ("tests.model_runtime.fixtures",)

Status = cds_pb2.ModelReview.Status
Finding = cds_pb2.Finding
Patient = cds_pb2.Patient

# A made-up drug and condition, so that any log line holding request or
# reply text shows up in a substring search.
MARKER_DRUG = "Zorblaxin"
MARKER_REPLY = "Quendrel"


def simvastatin_request() -> cds_pb2.ClinicalReviewRequest:
    return cds_pb2.ClinicalReviewRequest(
        patient=Patient(age_years=64, sex=Patient.MALE),
        medications=[
            cds_pb2.Medication(
                name="simvastatin", dose=cds_pb2.Dose(value=40, unit="mg")
            ),
            cds_pb2.Medication(
                name="clarithromycin", dose=cds_pb2.Dose(value=500, unit="mg")
            ),
        ],
    )


def simvastatin_findings() -> list[cds_pb2.Finding]:
    return [
        Finding(
            category=Finding.DRUG_INTERACTION,
            severity=Finding.CONTRAINDICATED,
            subjects=["simvastatin", "clarithromycin"],
            summary="Clarithromycin raises simvastatin levels and the risk "
            "of rhabdomyolysis.",
            action="Pause simvastatin during the antibiotic course.",
        )
    ]


def full_request() -> cds_pb2.ClinicalReviewRequest:
    return cds_pb2.ClinicalReviewRequest(
        patient=Patient(
            age_years=72,
            sex=Patient.FEMALE,
            weight_kg=61.5,
            egfr=28,
            pregnant=False,
        ),
        medications=[
            cds_pb2.Medication(
                name=MARKER_DRUG,
                rxnorm="999999",
                dose=cds_pb2.Dose(value=40, unit="mg"),
                route="oral",
                frequency="daily",
            )
        ],
        conditions=[
            cds_pb2.Condition(name="atrial fibrillation", icd10="I48.91")
        ],
        allergies=[
            cds_pb2.Allergy(
                substance="penicillin",
                reaction="hives",
                severity=cds_pb2.Allergy.MODERATE,
            )
        ],
        question="Is this regimen safe for her?",
    )


def free_port() -> int:
    """Return a 127.0.0.1 port that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))

        return probe.getsockname()[1]


class FakeOllama:
    """A local HTTP server that answers /api/chat with a fixed response."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b""
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                fake.requests.append(json.loads(self.rfile.read(length)))
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(fake.body)))
                self.end_headers()
                self.wfile.write(fake.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever)

    def reply_with(self, content: str, done_reason: str = "stop") -> None:
        """Send a well-formed chat response whose message is `content`."""
        self.status = 200
        self.body = json.dumps(
            {
                "model": "fake:1b",
                "created_at": "2026-01-01T00:00:00Z",
                "message": {"role": "assistant", "content": content},
                "done": True,
                "done_reason": done_reason,
            }
        ).encode()

    def __enter__(self) -> "FakeOllama":
        self._thread.start()

        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@pytest.fixture
def fake_ollama() -> Iterator[FakeOllama]:
    with FakeOllama() as fake:
        yield fake


def review_with(
    host: str,
    request: cds_pb2.ClinicalReviewRequest,
    findings: list[cds_pb2.Finding],
    timeout: float = 30.0,
    model: str = "gemma3:270m",
    **kwargs: Any,
) -> tuple[cds_pb2.ModelReview, list[cds_pb2.Recommendation]]:
    async def review():
        client = ollama.AsyncClient(host=host)
        try:
            return await run_model_review(
                client, model, request, findings, timeout, **kwargs
            )
        finally:
            await client.close()

    return asyncio.run(review())


class TestBuildMessages:
    def test_system_then_user_message(self):
        """The prompt is a system message and one user message."""
        messages = build_messages(full_request(), [])

        assert ["system", "user"] == [m["role"] for m in messages]
        assert "JSON" in messages[0]["content"]

    def test_user_message_lists_request(self):
        """Demographics, medication, condition, allergy and question."""
        user = build_messages(full_request(), [])[1]["content"]

        assert "- age group: older adult (65 or over)" in user
        assert "- sex: female" in user
        assert "- kidney function: G4, severely decreased (15 to 29)" in user
        assert "- pregnant: no" in user
        assert "lactating" not in user
        assert "1. Zorblaxin (RxNorm 999999), 40 mg, oral, daily" in user
        assert "1. atrial fibrillation (ICD-10 I48.91)" in user
        assert "1. penicillin: hives, moderate" in user
        assert "Clinical question: Is this regimen safe for her?" in user

    def test_exact_demographics_left_out(self):
        """The model sees bands, so it cannot echo the exact values."""
        user = build_messages(full_request(), [])[1]["content"]

        assert "72" not in user
        assert "61.5" not in user
        assert "28" not in user

    @pytest.mark.parametrize(
        ("egfr", "category"),
        [
            (120, "G1"),
            (90, "G1"),
            (89.9, "G2"),
            (60, "G2"),
            (59, "G3a"),
            (45, "G3a"),
            (44, "G3b"),
            (30, "G3b"),
            (29, "G4"),
            (15, "G4"),
            (14.9, "G5"),
            (0, "G5"),
        ],
    )
    def test_egfr_category_bounds(self, egfr, category):
        """KDIGO categories start at 90, 60, 45, 30 and 15."""
        assert egfr_category(egfr).startswith(category + ",")

    @pytest.mark.parametrize(
        ("age", "group"),
        [(0, "child"), (17, "child"), (18, "adult"), (64, "adult")]
        + [(65, "older adult"), (101, "older adult")],
    )
    def test_age_group_bounds(self, age, group):
        """Under 18 is a child, 65 and over an older adult."""
        assert age_group(age).startswith(group)

    def test_user_message_includes_findings(self):
        """Each finding appears with severity, subjects and action."""
        user = build_messages(simvastatin_request(), simvastatin_findings())[
            1
        ]["content"]

        assert (
            "1. CONTRAINDICATED drug interaction (simvastatin, "
            "clarithromycin): Clarithromycin raises simvastatin levels and "
            "the risk of rhabdomyolysis. Recommended action: Pause "
            "simvastatin during the antibiotic course."
        ) in user

    def test_empty_sections_say_none(self):
        """Sections without items say so instead of disappearing."""
        user = build_messages(cds_pb2.ClinicalReviewRequest(), [])[1][
            "content"
        ]

        assert "Patient: none recorded" in user
        assert "Medications: none recorded" in user
        assert "Allergies: none recorded" in user
        assert "Screening findings: none recorded" in user
        assert "Clinical question" not in user


class TestValidateReply:
    def test_valid_reply_passes(self):
        """A summary and the maximum of recommendations pass."""
        reply = {
            "summary": "x" * SUMMARY_MAX_CHARS,
            "recommendations": ["y" * RECOMMENDATION_MAX_CHARS]
            * MAX_RECOMMENDATIONS,
        }

        assert None is validate_reply(reply)

    @pytest.mark.parametrize(
        ("reply", "reason"),
        [
            (["a"], "model output is not a JSON object"),
            ({"recommendations": []}, "model output has no summary"),
            (
                {"summary": "  ", "recommendations": []},
                "model output has no summary",
            ),
            (
                {
                    "summary": "x" * (SUMMARY_MAX_CHARS + 1),
                    "recommendations": [],
                },
                f"summary is longer than {SUMMARY_MAX_CHARS} characters",
            ),
            ({"summary": "ok"}, "recommendations is not a list"),
            (
                {"summary": "ok", "recommendations": "Stop it."},
                "recommendations is not a list",
            ),
            (
                {
                    "summary": "ok",
                    "recommendations": ["a"] * (MAX_RECOMMENDATIONS + 1),
                },
                f"more than {MAX_RECOMMENDATIONS} recommendations",
            ),
            (
                {"summary": "ok", "recommendations": ["a", ""]},
                "recommendation 2 is empty or not a string",
            ),
            (
                {"summary": "ok", "recommendations": [3]},
                "recommendation 1 is empty or not a string",
            ),
            (
                {
                    "summary": "ok",
                    "recommendations": ["x" * (RECOMMENDATION_MAX_CHARS + 1)],
                },
                "recommendation 1 is longer than "
                f"{RECOMMENDATION_MAX_CHARS} characters",
            ),
            (
                {"summary": "ok", "recommendations": [], "risk": "low"},
                "model output has unexpected fields ['risk']",
            ),
        ],
    )
    def test_invalid_reply_gives_reason(self, reply, reason):
        """Each way out of the schema has its own reason."""
        assert reason == validate_reply(reply)


class TestSkippedReview:
    def test_skipped_review_says_why(self):
        """A rules-only request gets SKIPPED with the option named."""
        review = skipped_review()

        assert Status.SKIPPED == review.status
        assert "options.modelReview is false" == review.reason
        assert "" == review.summary


@pytest.fixture(scope="module")
def real_review(model_runtime):
    """Run one review against the real model, capturing its logs."""
    with capture_logs() as logs:
        review, recommendations = review_with(
            model_runtime.host,
            simvastatin_request(),
            simvastatin_findings(),
            timeout=120,
        )

    return review, recommendations, logs


class TestRealModelReview:
    # NOTE: the packaged model is a 270M base model, so the review's text
    # is not clinically meaningful. The schema's length limits make the
    # grammar close the JSON within NUM_PREDICT tokens for ordinary text.

    def test_review_is_ok(self, real_review, model_runtime):
        """The real model's reply fits the schema and gives OK."""
        review, _, _ = real_review

        assert Status.OK == review.status, review.reason
        assert review.summary.strip()
        assert model_runtime.model == review.model
        assert "" == review.reason

    def test_recommendations_marked_model(self, real_review):
        """Every recommendation the model adds has origin MODEL."""
        _, recommendations, _ = real_review

        assert recommendations
        for recommendation in recommendations:
            assert cds_pb2.Recommendation.MODEL == recommendation.origin
            assert recommendation.text.strip()

    def test_logs_outcome_without_text(self, real_review):
        """The log has the outcome, but no prompt or reply text."""
        review, recommendations, logs = real_review

        assert [("model review finished", "OK")] == [
            (entry["event"], entry["status"]) for entry in logs
        ]
        assert logs[0]["duration_ms"] > 0
        logged = repr(logs)
        for text in ("simvastatin", "clarithromycin", "rhabdomyolysis"):
            assert text not in logged
        assert review.summary not in logged
        for recommendation in recommendations:
            assert repr(recommendation.text) not in logged

    def test_timeout_gives_unavailable(self, model_runtime):
        """A timeout shorter than any generation gives UNAVAILABLE."""
        review, recommendations = review_with(
            model_runtime.host,
            simvastatin_request(),
            simvastatin_findings(),
            timeout=0.2,
        )

        assert Status.UNAVAILABLE == review.status
        assert "model server timed out after 0.2 s" == review.reason
        assert [] == recommendations

    def test_unknown_model_gives_unavailable(self, model_runtime):
        """A model name the server lacks gives UNAVAILABLE, not a raise."""
        review, _ = review_with(
            model_runtime.host,
            simvastatin_request(),
            [],
            model="missing:1b",
        )

        assert Status.UNAVAILABLE == review.status
        assert 'model server has no model "missing:1b"' == review.reason


class TestUnavailableServer:
    def test_unreachable_gives_unavailable(self):
        """A port nothing listens on gives UNAVAILABLE."""
        review, recommendations = review_with(
            f"http://127.0.0.1:{free_port()}", full_request(), [], timeout=5
        )

        assert Status.UNAVAILABLE == review.status
        assert "model server unreachable" == review.reason
        assert "gemma3:270m" == review.model
        assert [] == recommendations

    def test_http_error_gives_unavailable(self, fake_ollama):
        """A 500 from the model server gives UNAVAILABLE with the code."""
        fake_ollama.status = 500
        fake_ollama.body = b'{"error": "out of memory"}'

        review, _ = review_with(fake_ollama.host, full_request(), [])

        assert Status.UNAVAILABLE == review.status
        assert "model server returned HTTP 500" == review.reason

    def test_malformed_response_gives_unavailable(self, fake_ollama):
        """A 200 that is not a chat response gives UNAVAILABLE."""
        fake_ollama.body = b"<html>proxy error</html>"

        review, _ = review_with(fake_ollama.host, full_request(), [])

        assert Status.UNAVAILABLE == review.status
        assert "model server sent a malformed response" == review.reason


class TestControlCharacters:
    def test_line_feed_in_string_accepted(self, fake_ollama):
        """A raw line feed inside a JSON string, which the local runtime's
        grammar lets through, gives OK with the text on one line."""
        fake_ollama.reply_with(
            '{"summary": "Bleeding\nrisk.", "recommendations": '
            '["Check\n\tthe INR.", "Check the INR."]}',
            "stop",
        )

        review, recommendations = review_with(
            fake_ollama.host, full_request(), []
        )

        assert Status.OK == review.status
        assert "Bleeding risk." == review.summary
        assert ["Check the INR."] == [r.text for r in recommendations]


class TestInvalidOutput:
    @pytest.mark.parametrize(
        ("content", "done_reason", "reason"),
        [
            (
                f"{MARKER_REPLY} is fine.",
                "stop",
                "model output is not valid JSON",
            ),
            (
                '{"summary": "' + MARKER_REPLY,
                "length",
                f"model output was cut off at the limit of {NUM_PREDICT} "
                "tokens",
            ),
            (
                json.dumps({"summary": "", "recommendations": []}),
                "stop",
                "model output has no summary",
            ),
            (
                json.dumps({"summary": MARKER_REPLY, "recommendations": [""]}),
                "stop",
                "recommendation 1 is empty or not a string",
            ),
        ],
    )
    def test_output_outside_schema_invalid(
        self, fake_ollama, content, done_reason, reason
    ):
        """Output that is not JSON or breaks the schema gives INVALID."""
        fake_ollama.reply_with(content, done_reason)

        review, recommendations = review_with(
            fake_ollama.host, full_request(), []
        )

        assert Status.INVALID == review.status
        assert reason == review.reason
        assert "fake:1b" == review.model
        assert "" == review.summary
        assert [] == recommendations

    def test_invalid_output_logs_no_text(self, fake_ollama):
        """Neither the request nor the bad reply reaches the log."""
        fake_ollama.reply_with(f"{MARKER_REPLY} with {MARKER_DRUG}")

        with capture_logs() as logs:
            review, _ = review_with(fake_ollama.host, full_request(), [])

        assert Status.INVALID == review.status
        assert ["model review failed"] == [e["event"] for e in logs]
        assert "INVALID" == logs[0]["status"]
        assert MARKER_DRUG not in repr(logs)
        assert MARKER_REPLY not in repr(logs)
        assert MARKER_REPLY not in review.reason

    def test_repeated_recommendations_kept_once(self, fake_ollama):
        """A recommendation the model repeats appears once."""
        fake_ollama.reply_with(
            json.dumps(
                {"summary": "Fine.", "recommendations": ["Check.", " Check."]}
            )
        )

        _, recommendations = review_with(fake_ollama.host, full_request(), [])

        assert ["Check."] == [r.text for r in recommendations]

    def test_request_sends_schema_and_prompt(self, fake_ollama):
        """The chat request carries the schema, greedy options, findings."""
        fake_ollama.reply_with(
            json.dumps({"summary": "Fine.", "recommendations": ["Check."]})
        )

        review, recommendations = review_with(
            fake_ollama.host, full_request(), simvastatin_findings()
        )

        assert Status.OK == review.status
        assert ["Check."] == [r.text for r in recommendations]
        sent = fake_ollama.requests[0]
        assert SCHEMA == sent["format"]
        assert False is sent["stream"]
        assert 0 == sent["options"]["temperature"]
        assert NUM_PREDICT == sent["options"]["num_predict"]
        assert MARKER_DRUG in sent["messages"][1]["content"]
        assert "rhabdomyolysis" in sent["messages"][1]["content"]
