"""The ClinicalReview RPC: validate, screen, then ask the model.

The request is PHI. It lives only in this call's memory: nothing of it is
logged, stored or cached, and the response echoes no demographics.
"""

from arxio.cds.v1 import cds_pb2, cds_pb2_grpc

from services.cds.knowledge_base import KnowledgeBase
from services.cds.model_review import skipped_review
from services.cds.model_reviewer import ModelReviewer
from services.cds.screening import screen
from services.cds.validation import validate_request
from services.common.errors import abort_invalid
from services.common.identity import caller_org_id


class ClinicalReviewServicer(
    cds_pb2_grpc.ClinicalDecisionSupportServiceServicer
):
    def __init__(
        self, knowledge_base: KnowledgeBase, model_reviewer: ModelReviewer
    ) -> None:
        self._knowledge_base = knowledge_base
        self._model_reviewer = model_reviewer

    async def ClinicalReview(self, request, context):
        violations = validate_request(request)
        if violations:
            await abort_invalid(context, violations)

        screening = screen(request, self._knowledge_base)
        # The response's findings and risk come from the screening alone.
        # The model adds a summary and recommendations marked MODEL after
        # the engine's own, and nothing it returns can change a finding.
        recommendations = list(screening.recommendations)
        wants_model = (
            not request.options.HasField("model_review")
            or request.options.model_review
        )
        if wants_model:
            # The org id comes from the auth decision: Envoy sets the
            # header, and the server's interceptor rejects every peer whose
            # certificate is not in ARXIO_ALLOWED_PEERS.
            (
                model_review,
                model_recommendations,
            ) = await self._model_reviewer.review(
                request,
                screening.findings,
                caller_org_id(context),
                context.time_remaining(),
            )
            recommendations += model_recommendations
        else:
            model_review = skipped_review()

        return cds_pb2.ClinicalReviewResponse(
            findings=screening.findings,
            not_screened=screening.not_screened,
            recommendations=recommendations,
            risk=screening.risk,
            model_review=model_review,
            knowledge_base_version=self._knowledge_base.version,
        )
