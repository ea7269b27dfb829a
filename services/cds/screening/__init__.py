"""Screen a clinical review request against the knowledge base.

Screening is pure and deterministic, so the same request and knowledge
base always give the same findings in the same order. The request is PHI,
so this package logs, stores and caches nothing of it.
"""

from dataclasses import dataclass

from arxio.cds.v1 import cds_pb2

from services.cds.knowledge_base import KnowledgeBase
from services.cds.screening import outcome
from services.cds.screening.allergies import allergy_findings
from services.cds.screening.conditions import condition_findings
from services.cds.screening.doses import dose_findings
from services.cds.screening.duplicates import duplicate_findings
from services.cds.screening.inputs import (
    resolve_allergies,
    resolve_conditions,
    resolve_medications,
)
from services.cds.screening.interactions import interaction_findings
from services.cds.screening.patient import (
    missing_patient_inputs,
    patient_findings,
)

__all__ = ["ScreeningResult", "screen"]


@dataclass
class ScreeningResult:
    findings: list[cds_pb2.Finding]
    not_screened: list[cds_pb2.NotScreened]
    recommendations: list[cds_pb2.Recommendation]
    risk: cds_pb2.Risk


def _unique(messages: list) -> list:
    """Drop repeated messages, keeping the first of each in order."""
    seen: dict[bytes, object] = {}
    for message in messages:
        seen.setdefault(message.SerializeToString(deterministic=True), message)

    return list(seen.values())


def screen(
    request: cds_pb2.ClinicalReviewRequest, kb: KnowledgeBase
) -> ScreeningResult:
    """Screen the medications against every module of the knowledge base.

    Items and checks that could not be screened are listed, never dropped.
    """
    gaps: list[cds_pb2.NotScreened] = []
    medications, unrecognized = resolve_medications(
        request.medications, kb, gaps
    )
    allergies = resolve_allergies(request.allergies, kb, gaps)
    conditions = resolve_conditions(request.conditions, kb, gaps)
    patient = request.patient

    findings = [
        *interaction_findings(medications, kb),
        *allergy_findings(medications, allergies, kb),
        *condition_findings(medications, conditions, patient, kb),
        *duplicate_findings(medications, kb),
        *patient_findings(medications, patient, kb),
        *dose_findings(medications, patient, kb, gaps),
    ]
    # A medication or allergy listed twice would repeat its findings.
    findings = _unique(findings)
    findings.sort(key=outcome.finding_order)
    gaps = _unique([*gaps, *missing_patient_inputs(medications, patient, kb)])

    return ScreeningResult(
        findings=findings,
        not_screened=gaps,
        recommendations=outcome.recommendations(findings, unrecognized),
        risk=outcome.risk(findings, len(unrecognized)),
    )
