"""The CdsHooksService RPCs in process, with a fake gRPC context."""

import asyncio
import json

import grpc
import pytest
from arxio.cds.v1 import cds_pb2, hooks_pb2
from google.api import httpbody_pb2
from google.rpc import error_details_pb2, status_pb2

from services.cds.hooks.servicer import CdsHooksServicer, model_timeout
from services.cds.knowledge_base import load_knowledge_base
from tests.cds.hooks.helpers import hook_request

ORG_ID = "00000000-0000-4000-8000-000000000001"


class Aborted(Exception):
    def __init__(
        self, code: grpc.StatusCode, details: str, trailing_metadata=()
    ) -> None:
        super().__init__(details)
        self.code = code
        self.trailing_metadata = trailing_metadata or ()

    def violations(self) -> dict[str, str]:
        """Return the BadRequest field violations of the status details."""
        trailers = dict(self.trailing_metadata)
        status = status_pb2.Status.FromString(
            trailers["grpc-status-details-bin"]
        )
        bad_request = error_details_pb2.BadRequest()
        for detail in status.details:
            if detail.Unpack(bad_request):
                break

        return {
            violation.field: violation.description
            for violation in bad_request.field_violations
        }


class FakeContext:
    def __init__(self, **metadata: str) -> None:
        self.metadata = [("x-org-id", ORG_ID), *metadata.items()]
        self.initial_metadata = ()

    def invocation_metadata(self):
        return self.metadata

    def time_remaining(self):
        return 30.0

    async def send_initial_metadata(self, metadata) -> None:
        self.initial_metadata = metadata

    async def abort(self, code, details, trailing_metadata=None):
        raise Aborted(code, details, trailing_metadata)


class FakeReviewer:
    def __init__(self) -> None:
        self.budgets: list[float] = []

    async def review(self, request, findings, org_id, time_remaining):
        self.budgets.append(time_remaining)
        review = cds_pb2.ModelReview(
            status=cds_pb2.ModelReview.OK,
            model="test-model",
            summary="A generated narrative.",
        )

        return review, []


def _call(servicer, hook: str, context: FakeContext, document=None):
    request = hooks_pb2.CallHookServiceRequest(
        service_id=f"arxio-{hook}",
        body=httpbody_pb2.HttpBody(
            content_type="application/json",
            data=json.dumps(document or hook_request(hook)).encode(),
        ),
    )

    return asyncio.run(servicer.CallHookService(request, context))


@pytest.fixture
def reviewer():
    return FakeReviewer()


@pytest.fixture
def servicer(reviewer):
    return CdsHooksServicer(load_knowledge_base(), reviewer, None)


class TestCallHookService:
    def test_model_review_off_by_default(self, servicer, reviewer):
        """Without the organization's setting the model is not asked."""
        body = _call(servicer, "order-sign", FakeContext())

        assert [] == reviewer.budgets
        assert "application/json" == body.content_type

    def test_model_review_with_org_deadline(self, servicer, reviewer):
        """The organization's deadline bounds the model review."""
        context = FakeContext(**{"x-arxio-hooks-model-timeout-ms": "400"})

        body = _call(servicer, "order-sign", context)

        assert 1 == len(reviewer.budgets)
        assert 0.65 == pytest.approx(reviewer.budgets[0])
        cards = json.loads(body.data)["cards"]
        assert "model-review" == cards[-1]["source"]["topic"]["code"]

    def test_missing_prefetch_over_rest(self, servicer):
        """A REST call gets a JSON error and the 412 marker header."""
        document = hook_request("order-sign")
        del document["prefetch"]["patient"]
        context = FakeContext(
            **{"x-arxio-original-content-type": "application/json"}
        )

        body = _call(servicer, "order-sign", context, document)

        assert (("x-arxio-http-status", "412"),) == context.initial_metadata
        assert 9 == json.loads(body.data)["code"]

    def test_missing_prefetch_over_grpc(self, servicer):
        """A native gRPC call gets FAILED_PRECONDITION."""
        document = hook_request("order-sign")
        del document["prefetch"]["patient"]
        context = FakeContext(
            **{"x-arxio-original-content-type": "application/grpc"}
        )

        with pytest.raises(Aborted) as raised:
            _call(servicer, "order-sign", context, document)

        assert grpc.StatusCode.FAILED_PRECONDITION == raised.value.code

    def test_non_json_body_rejected(self, servicer):
        """A body that is not JSON is INVALID_ARGUMENT."""
        request = hooks_pb2.CallHookServiceRequest(
            service_id="arxio-order-sign",
            body=httpbody_pb2.HttpBody(
                content_type="application/json", data=b"{not json"
            ),
        )

        with pytest.raises(Aborted) as raised:
            asyncio.run(servicer.CallHookService(request, FakeContext()))

        assert grpc.StatusCode.INVALID_ARGUMENT == raised.value.code

    @pytest.mark.parametrize("depth", [65, 10_000])
    def test_deep_nesting_names_limit(self, servicer, depth):
        """Nesting past the limit is INVALID_ARGUMENT, not a RecursionError."""
        request = hooks_pb2.CallHookServiceRequest(
            service_id="arxio-order-sign",
            body=httpbody_pb2.HttpBody(
                content_type="application/json",
                data=b"[" * depth + b"]" * depth,
            ),
        )

        with pytest.raises(Aborted) as raised:
            asyncio.run(servicer.CallHookService(request, FakeContext()))

        assert grpc.StatusCode.INVALID_ARGUMENT == raised.value.code
        assert "64 levels" in raised.value.violations()["body"]

    def test_nesting_at_limit_parsed(self, servicer):
        """A request nested 64 levels deep is reviewed."""
        document = hook_request("order-sign")
        # The request object and its context are two levels.
        document["context"]["deep"] = json.loads("[" * 62 + "]" * 62)

        body = _call(servicer, "order-sign", FakeContext(), document)

        assert "cards" in json.loads(body.data)


class TestRecordHookFeedback:
    def test_without_database_unavailable(self, servicer):
        """Without DATABASE_URL feedback is UNAVAILABLE, not dropped."""
        request = hooks_pb2.RecordHookFeedbackRequest(
            service_id="arxio-order-sign",
            body=httpbody_pb2.HttpBody(
                content_type="application/json",
                data=json.dumps(
                    {
                        "feedback": [
                            {
                                "card": "0b6c5e1a-2f43-4d1e-9a57-1c2d3e4f5a6b",
                                "outcome": "overridden",
                                "outcomeTimestamp": "2026-11-02T09:15:00Z",
                            }
                        ]
                    }
                ).encode(),
            ),
        )

        with pytest.raises(Aborted) as raised:
            asyncio.run(servicer.RecordHookFeedback(request, FakeContext()))

        assert grpc.StatusCode.UNAVAILABLE == raised.value.code


class TestModelTimeout:
    @pytest.mark.parametrize(
        ("value", "seconds"),
        [("", 0.0), ("x", 0.0), ("-5", 0.0), ("250", 0.25)],
    )
    def test_header_values(self, value, seconds):
        """Absent, invalid or negative values turn the review off."""
        context = FakeContext(**{"x-arxio-hooks-model-timeout-ms": value})

        assert seconds == model_timeout(context)
