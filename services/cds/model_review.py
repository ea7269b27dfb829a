"""Ask the language model for a narrative review of one clinical request.

The prompt carries the deterministic findings so that the model comments on
them. Its reply only adds a summary and recommendations marked MODEL: it
cannot remove or change a finding. The prompt and the reply contain PHI, so
they stay in this call's memory and no log line, reason or exception message
includes them.
"""

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import ollama
import structlog
from arxio.cds.v1 import cds_pb2

from services.common import metrics

log = structlog.get_logger()

SUMMARY_MAX_CHARS = 240
RECOMMENDATION_MAX_CHARS = 160
MAX_RECOMMENDATIONS = 3
# Tokens the model may generate. The schema's length limits bound a valid
# reply to about 750 characters, which English text fits in about 200
# tokens, so the grammar closes the JSON before this limit in all but
# degenerate replies.
NUM_PREDICT = 320
# Ollama options of a review unless ARXIO_MODEL_OPTIONS overrides them:
# greedy decoding with a fixed seed, so that a review is repeatable.
DEFAULT_OPTIONS: dict[str, Any] = {
    "temperature": 0,
    "seed": 0,
    "num_predict": NUM_PREDICT,
}

# The output schema sent as Ollama's `format`. Without minLength a small
# model constrained by it tends to answer with empty strings, and without
# maxLength it may write until NUM_PREDICT cuts the JSON off. llama.cpp
# rejects grammars with a maxLength of 2000 or more. validate_reply checks
# every limit again, because another Ollama server may not enforce them.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "summary": {
            "type": "string",
            "minLength": 1,
            "maxLength": SUMMARY_MAX_CHARS,
        },
        "recommendations": {
            "type": "array",
            "items": {
                "type": "string",
                "minLength": 1,
                "maxLength": RECOMMENDATION_MAX_CHARS,
            },
            "maxItems": MAX_RECOMMENDATIONS,
        },
    },
    "required": ["summary", "recommendations"],
    "additionalProperties": False,
}

SYSTEM_PROMPT = (
    "You are a clinical pharmacist reviewing one patient's medications for "
    "the prescribing clinician. The screening findings come from a "
    "deterministic rules engine: explain what they mean for this patient "
    "and never contradict, drop or downgrade them. Add only cautions that "
    "the findings do not already cover. Reply with a JSON object: "
    '"summary" is a short narrative of the main medication risks, in at '
    'most two sentences, and "recommendations" lists at most '
    f"{MAX_RECOMMENDATIONS} short, specific actions for the clinician. "
    "Do not repeat the patient's details. Your review supports the "
    "clinician's decision and is not an order."
)

Status = cds_pb2.ModelReview.Status


def skipped_review() -> cds_pb2.ModelReview:
    """Return the review of a request that asked for rules only."""
    return cds_pb2.ModelReview(
        status=Status.SKIPPED, reason="options.modelReview is false"
    )


def _number(value: float) -> str:
    return f"{value:g}"


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def age_group(age_years: int) -> str:
    """Return the age band the model sees instead of the exact age."""
    if age_years < 18:
        return "child or adolescent (under 18)"
    if age_years >= 65:
        return "older adult (65 or over)"

    return "adult (18 to 64)"


def egfr_category(egfr: float) -> str:
    """Return the KDIGO GFR category of an eGFR in mL/min/1.73 m2."""
    categories = (
        (90, "G1, normal or high (90 or more)"),
        (60, "G2, mildly decreased (60 to 89)"),
        (45, "G3a, mildly to moderately decreased (45 to 59)"),
        (30, "G3b, moderately to severely decreased (30 to 44)"),
        (15, "G4, severely decreased (15 to 29)"),
    )
    for lower_bound, category in categories:
        if egfr >= lower_bound:
            return category

    return "G5, kidney failure (under 15)"


def _patient_lines(patient: cds_pb2.Patient) -> list[str]:
    """Describe the patient in bands, so the model cannot echo exact values.

    Weight is left out: the screening engine applies weight-based limits,
    and a band would add little to a narrative review.
    """
    lines = []
    if patient.HasField("age_years"):
        lines.append(f"- age group: {age_group(patient.age_years)}")
    if patient.sex != cds_pb2.Patient.SEX_UNSPECIFIED:
        sex = cds_pb2.Patient.Sex.Name(patient.sex).lower()
        lines.append(f"- sex: {sex}")
    if patient.HasField("egfr"):
        lines.append(f"- kidney function: {egfr_category(patient.egfr)}")
    if patient.HasField("pregnant"):
        lines.append(f"- pregnant: {_yes_no(patient.pregnant)}")
    if patient.HasField("lactating"):
        lines.append(f"- lactating: {_yes_no(patient.lactating)}")

    return lines


def _medication_line(medication: cds_pb2.Medication) -> str:
    name = medication.name or "unnamed medication"
    if medication.rxnorm:
        name += f" (RxNorm {medication.rxnorm})"
    parts = [name]
    if medication.HasField("dose") and medication.dose.value:
        dose = _number(medication.dose.value)
        parts.append(f"{dose} {medication.dose.unit}".strip())
    parts.extend(p for p in (medication.route, medication.frequency) if p)

    return ", ".join(parts)


def _condition_line(condition: cds_pb2.Condition) -> str:
    codes = [
        f"{system} {code}"
        for system, code in (
            ("ICD-10", condition.icd10),
            ("SNOMED CT", condition.snomed),
        )
        if code
    ]
    name = condition.name or "unnamed condition"

    return f"{name} ({', '.join(codes)})" if codes else name


def _allergy_line(allergy: cds_pb2.Allergy) -> str:
    details = [allergy.reaction] if allergy.reaction else []
    if allergy.severity != cds_pb2.Allergy.SEVERITY_UNSPECIFIED:
        severity = cds_pb2.Allergy.Severity.Name(allergy.severity).lower()
        details.append(severity)
    substance = allergy.substance or "unnamed substance"

    return f"{substance}: {', '.join(details)}" if details else substance


def _finding_line(finding: cds_pb2.Finding) -> str:
    severity = cds_pb2.Finding.Severity.Name(finding.severity)
    category = cds_pb2.Finding.Category.Name(finding.category)
    line = f"{severity} {category.lower().replace('_', ' ')}"
    if finding.subjects:
        line += f" ({', '.join(finding.subjects)})"
    if finding.summary:
        line += f": {finding.summary}"
    if finding.action:
        line += f" Recommended action: {finding.action}"

    return line


def _section(title: str, lines: Sequence[str], numbered: bool) -> str:
    if not lines:
        return f"{title}: none recorded"
    if numbered:
        lines = [f"{i}. {line}" for i, line in enumerate(lines, start=1)]

    return "\n".join([f"{title}:", *lines])


def build_messages(
    request: cds_pb2.ClinicalReviewRequest,
    findings: Sequence[cds_pb2.Finding],
) -> list[dict[str, str]]:
    """Build the chat messages for one request, in memory only."""
    sections = [
        _section("Patient", _patient_lines(request.patient), False),
        _section(
            "Medications",
            [_medication_line(m) for m in request.medications],
            True,
        ),
        _section(
            "Conditions",
            [_condition_line(c) for c in request.conditions],
            True,
        ),
        _section(
            "Allergies", [_allergy_line(a) for a in request.allergies], True
        ),
        _section(
            "Screening findings", [_finding_line(f) for f in findings], True
        ),
    ]
    if request.question.strip():
        sections.append(f"Clinical question: {request.question.strip()}")

    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "\n\n".join(sections)},
    ]


def validate_reply(reply: Any) -> str | None:
    """Return why a parsed model reply breaks the output schema, or None.

    The reason names fields and limits only, never the reply's text.
    """
    if not isinstance(reply, dict):
        return "model output is not a JSON object"
    unexpected = set(reply) - {"summary", "recommendations"}
    if unexpected:
        return f"model output has unexpected fields {sorted(unexpected)}"
    summary = reply.get("summary")
    if not isinstance(summary, str) or not summary.strip():
        return "model output has no summary"
    if len(summary.strip()) > SUMMARY_MAX_CHARS:
        return f"summary is longer than {SUMMARY_MAX_CHARS} characters"
    recommendations = reply.get("recommendations")
    if not isinstance(recommendations, list):
        return "recommendations is not a list"
    if len(recommendations) > MAX_RECOMMENDATIONS:
        return f"more than {MAX_RECOMMENDATIONS} recommendations"
    for index, text in enumerate(recommendations, start=1):
        if not isinstance(text, str) or not text.strip():
            return f"recommendation {index} is empty or not a string"
        if len(text.strip()) > RECOMMENDATION_MAX_CHARS:
            return (
                f"recommendation {index} is longer than "
                f"{RECOMMENDATION_MAX_CHARS} characters"
            )

    return None


async def run_model_review(
    client: ollama.AsyncClient,
    model: str,
    request: cds_pb2.ClinicalReviewRequest,
    findings: Sequence[cds_pb2.Finding],
    timeout: float,
    *,
    options: Mapping[str, Any] = DEFAULT_OPTIONS,
    keep_alive: str | float | None = None,
) -> tuple[cds_pb2.ModelReview, list[cds_pb2.Recommendation]]:
    """Ask the model to review a request and its findings; never raise.

    `timeout` bounds the whole call, the connection included. A model
    server that is down, slow or failing gives status UNAVAILABLE, and a
    reply outside SCHEMA gives INVALID, each with a reason.
    """
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            response = await client.chat(
                model=model,
                messages=build_messages(request, findings),
                format=SCHEMA,
                options=dict(options),
                keep_alive=keep_alive,
                stream=False,
            )
    except (TimeoutError, httpx.TimeoutException) as error:
        reason = f"model server timed out after {round(timeout, 1):g} s"
        return _failed(Status.UNAVAILABLE, model, reason, started, error)
    except ConnectionError as error:
        # The ollama client raises ConnectionError when it cannot connect.
        reason = "model server unreachable"
        return _failed(Status.UNAVAILABLE, model, reason, started, error)
    except httpx.TransportError as error:
        reason = "model server connection failed"
        return _failed(Status.UNAVAILABLE, model, reason, started, error)
    except ollama.ResponseError as error:
        reason = f"model server returned HTTP {error.status_code}"
        if error.status_code == 404:
            reason = f'model server has no model "{model}"'
        return _failed(Status.UNAVAILABLE, model, reason, started, error)
    except ValueError as error:
        # pydantic's ValidationError and JSONDecodeError are ValueErrors:
        # the response was not a chat response at all.
        reason = "model server sent a malformed response"
        return _failed(Status.UNAVAILABLE, model, reason, started, error)
    except Exception as error:
        # The response must carry the findings whatever the model client
        # raises, so an error the branches above miss gives UNAVAILABLE.
        reason = "model review failed unexpectedly"
        return _failed(Status.UNAVAILABLE, model, reason, started, error)

    served_model = response.model or model
    content = response.message.content or ""
    try:
        # strict=False reads control characters inside strings: the local
        # runtime's grammar lets a raw line feed into them, which strict
        # JSON rejects. The texts are flattened to one line below.
        reply = json.loads(content, strict=False)
    except json.JSONDecodeError:
        reason = "model output is not valid JSON"
        if response.done_reason == "length":
            limit = options.get("num_predict")
            reason = (
                f"model output was cut off at the limit of {limit} tokens"
                if limit
                else "model output was cut off at the server's token limit"
            )
        return _failed(Status.INVALID, served_model, reason, started)
    problem = validate_reply(reply)
    if problem is not None:
        return _failed(Status.INVALID, served_model, problem, started)

    # A small model often repeats itself; each text is kept once.
    texts = dict.fromkeys(_one_line(text) for text in reply["recommendations"])
    recommendations = [
        cds_pb2.Recommendation(text=text, origin=cds_pb2.Recommendation.MODEL)
        for text in texts
    ]
    metrics.observe_model_call("ok", time.perf_counter() - started)
    log.info(
        "model review finished",
        status="OK",
        model=served_model,
        recommendations=len(recommendations),
        duration_ms=_elapsed_ms(started),
    )
    review = cds_pb2.ModelReview(
        status=Status.OK,
        model=served_model,
        summary=_one_line(reply["summary"]),
    )

    return review, recommendations


def _one_line(text: str) -> str:
    """Return `text` with each run of whitespace, line feeds and other
    control characters included, as one space."""
    return " ".join(
        "".join(
            " " if ord(c) < 32 or ord(c) == 127 else c for c in text
        ).split()
    )


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


def _call_outcome(status: int, error: BaseException | None) -> str:
    """Name a failed call's outcome for the metrics, from a fixed set."""
    if status == Status.INVALID:
        return "invalid"
    if isinstance(error, TimeoutError | httpx.TimeoutException):
        return "timeout"
    if isinstance(error, ConnectionError | httpx.ConnectError):
        return "unreachable"

    return "error"


def _failed(
    status: int,
    model: str,
    reason: str,
    started: float,
    error: BaseException | None = None,
) -> tuple[cds_pb2.ModelReview, list[cds_pb2.Recommendation]]:
    metrics.observe_model_call(
        _call_outcome(status, error), time.perf_counter() - started
    )
    # Only the exception's type is logged: its message may quote the reply.
    log.warning(
        "model review failed",
        status=Status.Name(status),
        model=model,
        reason=reason,
        error=type(error).__name__ if error else None,
        duration_ms=_elapsed_ms(started),
    )

    return cds_pb2.ModelReview(status=status, model=model, reason=reason), []
