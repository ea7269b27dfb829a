"""Order the findings, and derive the recommendations and risk level."""

from arxio.cds.v1 import cds_pb2

from services.cds.screening.findings import FindingRecord

Finding = cds_pb2.Finding
Category = Finding.Category
Risk = cds_pb2.Risk
# Read once, because each attribute read of a protobuf enum is a lookup.
DRUG_INTERACTION = Category.DRUG_INTERACTION
DRUG_ALLERGY = Category.DRUG_ALLERGY
DRUG_CONDITION = Category.DRUG_CONDITION
DUPLICATE_THERAPY = Category.DUPLICATE_THERAPY
RULES = cds_pb2.Recommendation.Origin.RULES

RISK_LEVEL_OF_SEVERITY = {
    Finding.Severity.CONTRAINDICATED: Risk.Level.CRITICAL,
    Finding.Severity.MAJOR: Risk.Level.HIGH,
    Finding.Severity.MODERATE: Risk.Level.MODERATE,
}
"""Risk level for the most severe finding. Lower severities give LOW."""


def finding_order(finding: FindingRecord) -> tuple:
    """Sort key: most severe first, then a stable order of the rest."""
    return (
        -finding.severity,
        finding.category,
        finding.rule_id,
        tuple(finding.subjects),
        finding.summary,
    )


def _recommendation_text(finding: FindingRecord) -> str:
    subjects = finding.subjects
    if finding.category == DRUG_INTERACTION:
        return f"{subjects[0]} with {subjects[1]}: {finding.action}"
    if finding.category == DRUG_ALLERGY:
        return (
            f"{subjects[0]} (recorded allergy to {subjects[1]}): "
            f"{finding.action}"
        )
    if finding.category == DRUG_CONDITION:
        return f"{subjects[0]} ({subjects[1]}): {finding.action}"
    if finding.category == DUPLICATE_THERAPY:
        return f"{', '.join(subjects)}: {finding.action}"

    return f"{subjects[0]}: {finding.action}"


def recommendations(
    findings: list[FindingRecord], unrecognized: list[str]
) -> list[cds_pb2.Recommendation]:
    """Return one recommendation per finding's action, then per unknown."""
    texts = [_recommendation_text(finding) for finding in findings]
    texts += [
        f"Review {subject} by hand: the screening engine did not fully "
        "recognize it."
        for subject in unrecognized
    ]

    return [
        cds_pb2.Recommendation(text=text, origin=RULES)
        for text in dict.fromkeys(texts)
    ]


def risk(
    findings: list[FindingRecord], unrecognized_count: int
) -> cds_pb2.Risk:
    """Rate the risk by the most severe finding and list what drove it.

    `findings` must be sorted with `finding_order`.
    """
    factors = []
    level = Risk.Level.LOW
    if findings:
        top = findings[0].severity
        level = RISK_LEVEL_OF_SEVERITY.get(top, Risk.Level.LOW)
        factors = [f.summary for f in findings if f.severity == top]
    if unrecognized_count:
        factors.append(
            f"{unrecognized_count} medication(s) not fully recognized, so "
            "the risk may be underestimated"
        )

    return Risk(level=level, factors=list(dict.fromkeys(factors)))
