"""The ClinicalReview RPC: validate, screen, then ask the model.

The request is PHI. It lives only in this call's memory: nothing of it is
logged, stored or cached, and the response echoes no demographics.
"""

import ollama
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc

from services.cds.knowledge_base import KnowledgeBase
from services.cds.model_review import run_model_review, skipped_review
from services.cds.screening import screen
from services.cds.validation import validate_request
from services.common.errors import abort_invalid


class ClinicalReviewServicer(
    cds_pb2_grpc.ClinicalDecisionSupportServiceServicer
):
    def __init__(
        self,
        knowledge_base: KnowledgeBase,
        model_client: ollama.AsyncClient,
        model: str,
        model_timeout: float,
    ) -> None:
        self._knowledge_base = knowledge_base
        self._model_client = model_client
        self._model = model
        self._model_timeout = model_timeout

    async def ClinicalReview(self, request, context):
        violations = validate_request(request)
        if violations:
            await abort_invalid(context, violations)

        screening = screen(request, self._knowledge_base)
        recommendations = list(screening.recommendations)
        wants_model = (
            not request.options.HasField("model_review")
            or request.options.model_review
        )
        if wants_model:
            model_review, model_recommendations = await run_model_review(
                self._model_client,
                self._model,
                request,
                screening.findings,
                self._model_timeout,
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
