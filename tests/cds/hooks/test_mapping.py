"""Mapping of FHIR R4 resources to a clinical review request."""

import datetime

import pytest
from arxio.cds.v1 import cds_pb2

from services.cds.hooks import fhir
from services.cds.hooks.discovery import SERVICES
from services.cds.hooks.hook_request import MissingPrefetch, map_hook_request
from services.cds.hooks.mapping import (
    InvalidFhir,
    age_in_years,
    map_allergy,
    map_condition,
    map_medication,
    map_patient,
)
from services.cds.knowledge_base import load_knowledge_base
from tests.cds.hooks.helpers import (
    PATIENT_IDENTIFIERS,
    bundle,
    hook_request,
    medication_request,
    observation,
)

TODAY = datetime.date(2026, 12, 1)


@pytest.fixture(scope="module")
def kb():
    return load_knowledge_base()


def _map(document, hook="order-sign", kb=None):
    service = SERVICES[f"arxio-{hook}"]

    return map_hook_request(service, document, kb, TODAY)


class TestPatient:
    def test_age_and_sex_only(self):
        """A Patient gives age in years and sex, nothing else."""
        patient = map_patient(
            {
                "resourceType": "Patient",
                "id": "p1",
                "name": [{"family": "Doe"}],
                "gender": "male",
                "birthDate": "1950-12-02",
            },
            "prefetch.patient",
            TODAY,
        )

        assert 75 == patient.age_years
        assert cds_pb2.Patient.MALE == patient.sex
        assert "Doe" not in str(patient)

    @pytest.mark.parametrize(
        ("birth_date", "age"),
        [("1950", 75), ("1950-12", 75), ("1951-01", 75), ("2026-11-30", 0)],
    )
    def test_partial_birth_dates_give_youngest_age(self, birth_date, age):
        """A year or month alone gives the youngest age it allows."""
        assert age == age_in_years(birth_date, TODAY)

    @pytest.mark.parametrize(
        ("patient", "path"),
        [
            ({"gender": "f"}, "prefetch.patient.gender"),
            ({"birthDate": "1950-13-01"}, "prefetch.patient.birthDate"),
            ({"birthDate": "2030-01-01"}, "prefetch.patient.birthDate"),
            ({"birthDate": 1950}, "prefetch.patient.birthDate"),
        ],
    )
    def test_invalid_patient_names_element(self, patient, path):
        """Invalid FHIR values are rejected with the element's path."""
        with pytest.raises(InvalidFhir) as raised:
            map_patient(
                {"resourceType": "Patient", **patient},
                "prefetch.patient",
                TODAY,
            )

        assert [path] == [v.field for v in raised.value.violations]

    def test_null_patient_gives_no_demographics(self):
        """A null prefetch value means the EHR has no data."""
        assert cds_pb2.Patient() == map_patient(None, "p", TODAY)


class TestMedication:
    def test_rxnorm_dose_route_frequency(self):
        """Coding, dose, route and timing map to the review's fields."""
        resource = fhir.MedicationRequest.model_validate(
            medication_request(
                "m1",
                "warfarin 5 MG oral tablet",
                "11289",
                dosageInstruction=[
                    {
                        "route": {"text": "oral"},
                        "timing": {
                            "repeat": {
                                "frequency": 2,
                                "period": 1,
                                "periodUnit": "d",
                            }
                        },
                        "doseAndRate": [
                            {"doseQuantity": {"value": 5, "unit": "mg"}}
                        ],
                    }
                ],
            )
        )

        medication = map_medication(resource, "m")

        assert "warfarin 5 MG oral tablet" == medication.name
        assert "11289" == medication.rxnorm
        assert 5.0 == medication.dose.value
        assert "mg" == medication.dose.unit
        assert "oral" == medication.route
        assert "2 times daily" == medication.frequency

    def test_interval_timing_reads_as_hours(self):
        """Every 8 hours becomes a frequency the dose check reads."""
        resource = fhir.MedicationRequest.model_validate(
            medication_request(
                "m1",
                "ibuprofen",
                dosageInstruction=[
                    {
                        "timing": {
                            "repeat": {
                                "frequency": 1,
                                "period": 8,
                                "periodUnit": "h",
                            }
                        },
                        "asNeededBoolean": True,
                    }
                ],
            )
        )

        assert (
            "every 8 hours as needed"
            == map_medication(resource, "m").frequency
        )

    def test_contained_medication_gives_code(self):
        """A `#id` reference reads the contained Medication's code."""
        raw = medication_request("m1", "x")
        del raw["medicationCodeableConcept"]
        raw["medicationReference"] = {"reference": "#med"}
        raw["contained"] = [
            {
                "resourceType": "Medication",
                "id": "med",
                "code": {"text": "aspirin 81 mg"},
            }
        ]

        medication = map_medication(
            fhir.MedicationRequest.model_validate(raw), "m"
        )

        assert "aspirin 81 mg" == medication.name

    def test_both_medication_choices_rejected(self):
        """medication[x] must be given exactly once."""
        raw = medication_request("m1", "x")
        raw["medicationReference"] = {"reference": "Medication/1"}

        with pytest.raises(Exception, match="exactly one"):
            fhir.MedicationRequest.model_validate(raw)

    def test_non_numeric_rxnorm_rejected(self):
        """An RxNorm code must be a numeric RXCUI."""
        resource = fhir.MedicationRequest.model_validate(
            medication_request("m1", "x", "abc")
        )

        with pytest.raises(InvalidFhir):
            map_medication(resource, "m")

    def test_string_dose_rejected(self):
        """FHIR decimals are JSON numbers; a string is invalid."""
        raw = medication_request(
            "m1",
            "x",
            dosageInstruction=[
                {"doseAndRate": [{"doseQuantity": {"value": "5"}}]}
            ],
        )

        with pytest.raises(Exception, match="valid"):
            fhir.MedicationRequest.model_validate(raw)


class TestConditionAndAllergy:
    def test_condition_codes(self):
        """ICD-10 and SNOMED CT codings map to their fields."""
        condition = map_condition(
            fhir.Condition.model_validate(
                {
                    "resourceType": "Condition",
                    "code": {
                        "coding": [
                            {
                                "system": "http://hl7.org/fhir/sid/icd-10-cm",
                                "code": "I50.9",
                            },
                            {
                                "system": "http://snomed.info/sct",
                                "code": "84114007",
                            },
                        ]
                    },
                }
            )
        )

        assert "I50.9" == condition.icd10
        assert "84114007" == condition.snomed

    @pytest.mark.parametrize(
        ("clinical", "verification"),
        [("resolved", "confirmed"), ("active", "entered-in-error")],
    )
    def test_ended_or_refuted_condition_skipped(self, clinical, verification):
        """Resolved and entered-in-error conditions are not screened."""
        raw = {
            "resourceType": "Condition",
            "clinicalStatus": {"coding": [{"code": clinical}]},
            "verificationStatus": {"coding": [{"code": verification}]},
            "code": {"text": "asthma"},
        }

        assert map_condition(fhir.Condition.model_validate(raw)) is None

    def test_allergy_severity_and_reaction(self, kb):
        """Reaction severity and manifestation map to the allergy."""
        allergy = map_allergy(
            fhir.AllergyIntolerance.model_validate(
                {
                    "resourceType": "AllergyIntolerance",
                    "code": {"text": "penicillin"},
                    "reaction": [
                        {
                            "manifestation": [{"text": "hives"}],
                            "severity": "mild",
                        },
                        {
                            "manifestation": [{"text": "wheeze"}],
                            "severity": "severe",
                        },
                    ],
                }
            ),
            kb,
        )

        assert "penicillin" == allergy.substance
        assert "hives, wheeze" == allergy.reaction
        assert cds_pb2.Allergy.SEVERE == allergy.severity

    def test_high_criticality_without_severity_is_severe(self, kb):
        """criticality high replaces a missing reaction severity."""
        allergy = map_allergy(
            fhir.AllergyIntolerance.model_validate(
                {
                    "resourceType": "AllergyIntolerance",
                    "code": {"text": "penicillin"},
                    "criticality": "high",
                }
            ),
            kb,
        )

        assert cds_pb2.Allergy.SEVERE == allergy.severity

    def test_coded_allergy_with_local_text(self, kb):
        """An RxNorm coding screens when the text is a local name."""
        allergy = map_allergy(
            fhir.AllergyIntolerance.model_validate(
                {
                    "resourceType": "AllergyIntolerance",
                    "code": {
                        "text": "Pharmacy item 4471",
                        "coding": [
                            {
                                "system": "http://www.nlm.nih.gov/research"
                                "/umls/rxnorm",
                                "code": "11289",
                            }
                        ],
                    },
                }
            ),
            kb,
        )

        assert "warfarin" == allergy.substance


class TestHookRequest:
    def test_example_maps_all_facts(self, kb):
        """The order-sign example gives drafts, active orders and labs."""
        mapped = _map(hook_request("order-sign"), kb=kb)
        request = mapped.request

        assert ["aspirin", "metformin", "warfarin 5 MG oral tablet"] == [
            m.name for m in request.medications
        ]
        assert [True, True, False] == [o.draft for o in mapped.origins]
        assert "MedicationRequest/draft-aspirin" == mapped.origins[0].reference
        assert 28.0 == request.patient.egfr
        assert 61.0 == request.patient.weight_kg
        assert 73 == request.patient.age_years
        assert not request.patient.HasField("pregnant")
        assert ["atrial fibrillation"] == [c.name for c in request.conditions]
        assert ["penicillin"] == [a.substance for a in request.allergies]

    def test_no_identifier_reaches_review(self, kb):
        """Names, MRNs, ids and birth dates stay out of the review."""
        text = str(_map(hook_request("order-sign"), kb=kb).request)

        for identifier in PATIENT_IDENTIFIERS:
            assert identifier not in text

    def test_missing_prefetch_key(self, kb):
        """An absent key raises MissingPrefetch naming it."""
        document = hook_request("order-sign")
        del document["prefetch"]["egfr"]

        with pytest.raises(MissingPrefetch) as raised:
            _map(document, kb=kb)

        assert ["egfr"] == raised.value.keys

    def test_no_prefetch_at_all(self, kb):
        """A request without prefetch lacks every required key."""
        document = hook_request("patient-view")
        del document["prefetch"]

        with pytest.raises(MissingPrefetch) as raised:
            _map(document, "patient-view", kb)

        assert "patient" in raised.value.keys

    def test_null_keys_are_no_data(self, kb):
        """null means the EHR has no data, which is not a 412."""
        document = hook_request("patient-view")
        for key in document["prefetch"]:
            document["prefetch"][key] = None

        mapped = _map(document, "patient-view", kb)

        assert 0 == len(mapped.request.medications)

    def test_wrong_hook_rejected(self, kb):
        """A service handles its own hook only."""
        document = hook_request("patient-view")

        with pytest.raises(InvalidFhir):
            _map(document, "order-sign", kb)

    def test_order_select_marks_selected(self, kb):
        """Only the listed selections are the new orders."""
        mapped = _map(hook_request("order-select"), "order-select", kb)

        assert [True, False, False] == [o.selected for o in mapped.origins]

    def test_order_select_needs_selections(self, kb):
        """order-select without selections is invalid."""
        document = hook_request("order-select")
        del document["context"]["selections"]

        with pytest.raises(InvalidFhir):
            _map(document, "order-select", kb)

    def test_ended_orders_skipped(self, kb):
        """Stopped and completed medications are not current."""
        document = hook_request("patient-view")
        document["prefetch"]["medications"] = bundle(
            medication_request("a", "aspirin", status="stopped"),
            medication_request("b", "ibuprofen", status="completed"),
            medication_request("c", "lisinopril"),
        )

        mapped = _map(document, "patient-view", kb)

        assert ["lisinopril"] == [m.name for m in mapped.request.medications]

    def test_latest_observation_wins(self, kb):
        """Of several eGFR results the newest one is used."""
        document = hook_request("patient-view")
        document["prefetch"]["egfr"] = bundle(
            observation(
                "33914-3",
                effectiveDateTime="2026-01-01",
                valueQuantity={"value": 25},
            ),
            observation(
                "98979-8",
                effectiveDateTime="2026-06-01T10:00:00Z",
                valueQuantity={"value": 55},
            ),
        )

        mapped = _map(document, "patient-view", kb)

        assert 55.0 == mapped.request.patient.egfr

    def test_weight_in_pounds(self, kb):
        """A weight in [lb_av] is converted to kilograms."""
        document = hook_request("patient-view")
        document["prefetch"]["weight"] = bundle(
            observation(
                "29463-7",
                valueQuantity={"value": 100, "code": "[lb_av]"},
            )
        )

        mapped = _map(document, "patient-view", kb)

        assert 45.359 == pytest.approx(mapped.request.patient.weight_kg, 1e-3)

    @pytest.mark.parametrize(
        ("system", "code", "pregnant"),
        [
            ("http://loinc.org", "LA15173-0", True),
            ("http://snomed.info/sct", "60001007", False),
        ],
    )
    def test_pregnancy_status(self, kb, system, code, pregnant):
        """Coded pregnancy status values map to the review."""
        document = hook_request("patient-view")
        document["prefetch"]["pregnancy"] = bundle(
            observation(
                "82810-3",
                valueCodeableConcept={
                    "coding": [{"system": system, "code": code}]
                },
            )
        )

        mapped = _map(document, "patient-view", kb)

        assert pregnant == mapped.request.patient.pregnant

    def test_extra_elements_accepted(self, kb):
        """Valid FHIR elements the mapping does not read are allowed."""
        document = hook_request("order-sign")
        resource = document["prefetch"]["medications"]["entry"][0]["resource"]
        resource["meta"] = {"lastUpdated": "2026-11-01T00:00:00Z"}
        resource["extension"] = [
            {"url": "https://x.example", "valueString": "y"}
        ]
        document["extension"] = {"org.example.flag": True}

        assert 3 == len(_map(document, kb=kb).request.medications)

    def test_invalid_resource_names_path(self, kb):
        """An invalid element of a prefetched resource is named by path."""
        document = hook_request("order-sign")
        resource = document["prefetch"]["medications"]["entry"][0]["resource"]
        resource["status"] = "taking"

        with pytest.raises(InvalidFhir) as raised:
            _map(document, kb=kb)

        assert ["prefetch.medications.entry[0].resource.status"] == [
            v.field for v in raised.value.violations
        ]

    def test_out_of_range_egfr_names_prefetch_key(self, kb):
        """The review's own limits point back to the FHIR source."""
        document = hook_request("patient-view")
        document["prefetch"]["egfr"] = bundle(
            observation("33914-3", valueQuantity={"value": 900})
        )

        with pytest.raises(InvalidFhir) as raised:
            _map(document, "patient-view", kb)

        assert ["prefetch.egfr"] == [v.field for v in raised.value.violations]

    def test_too_many_medications(self, kb):
        """More than 100 current medications are rejected, not cut."""
        document = hook_request("patient-view")
        document["prefetch"]["medications"] = bundle(
            *[medication_request(f"m{i}", "aspirin") for i in range(101)]
        )

        with pytest.raises(InvalidFhir, match="medications"):
            _map(document, "patient-view", kb)
