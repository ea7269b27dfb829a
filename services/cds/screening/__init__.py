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
from services.cds.screening.findings import to_message
from services.cds.screening.inputs import (
    ScreenedMedications,
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


def screen(
    request: cds_pb2.ClinicalReviewRequest, kb: KnowledgeBase
) -> ScreeningResult:
    """Screen the medications against every module of the knowledge base.

    Items and checks that could not be screened are listed, never dropped.
    """
    gaps: list[cds_pb2.NotScreened] = []
    screened, unrecognized = resolve_medications(request.medications, kb, gaps)
    medications = ScreenedMedications(screened)
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
    # Equal records are equal findings, so the first of each is kept.
    findings = list(dict.fromkeys(findings))
    findings.sort(key=outcome.finding_order)
    # NotScreened has no fields but these two, so equal keys are equal
    # messages.
    unique_gaps: dict[tuple[str, str], cds_pb2.NotScreened] = {}
    for gap in [*gaps, *missing_patient_inputs(medications, patient, kb)]:
        unique_gaps.setdefault((gap.subject, gap.reason), gap)

    return ScreeningResult(
        findings=[to_message(finding) for finding in findings],
        not_screened=list(unique_gaps.values()),
        recommendations=outcome.recommendations(findings, unrecognized),
        risk=outcome.risk(findings, len(unrecognized)),
    )
