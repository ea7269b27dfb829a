"""Build requests and pick findings for the screening-engine tests."""

import pytest
from arxio.cds.v1 import cds_pb2

from services.cds.knowledge_base import load_knowledge_base

KB = load_knowledge_base()
Finding = cds_pb2.Finding
Sex = cds_pb2.Patient.Sex
# Patient facts that leave no patient check without its input, for tests
# of other checks.
COMPLETE = {"sex": Sex.MALE, "age_years": 40, "egfr": 90}


def request_of(
    *medications, allergies=(), conditions=(), **patient
) -> cds_pb2.ClinicalReviewRequest:
    """Build a request; medications are names or Medication messages."""
    return cds_pb2.ClinicalReviewRequest(
        patient=cds_pb2.Patient(**patient),
        medications=[
            item
            if isinstance(item, cds_pb2.Medication)
            else cds_pb2.Medication(name=item)
            for item in medications
        ],
        allergies=[cds_pb2.Allergy(substance=name) for name in allergies],
        conditions=[
            item
            if isinstance(item, cds_pb2.Condition)
            else cds_pb2.Condition(name=item)
            for item in conditions
        ],
    )


def by_rule(result, rule_id: str) -> list[cds_pb2.Finding]:
    return [f for f in result.findings if f.rule_id == rule_id]


def drug_name(drug_id: str) -> str:
    return KB.drugs[drug_id].name


def rule_params(rules) -> list:
    return [pytest.param(rule, id=rule.id) for rule in rules]
