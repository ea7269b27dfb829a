"""Score the screening engine against the clinical evaluation cases.

Each case is a made-up patient with the findings a pharmacist would
expect. The score is the share of expected findings the engine raises
(sensitivity) and the count of MAJOR or CONTRAINDICATED findings that no
case expected (false alarms), per category and overall.

    python -m services.cds.evaluate [--cases FILE] [--format json]
        [--update-doc FILE]

The command exits with status 1 when a target is missed and 2 when the
case file is invalid.
"""

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arxio.cds.v1 import cds_pb2
from google.protobuf import json_format

from services.cds.knowledge_base import KnowledgeBase, load_knowledge_base
from services.cds.screening import screen
from services.common.markdown import replace_section

Finding = cds_pb2.Finding
Category = Finding.Category
Severity = Finding.Severity

DEFAULT_CASES = (
    Path(__file__).resolve().parents[2] / "tests" / "evaluation" / "cases.json"
)
SECTION_HEADING = "## Evaluation scores"

# Case categories as a clinician names them, and the finding category the
# engine reports each one under. Lactation cautions share PREGNANCY.
CATEGORIES = {
    "interaction": Category.DRUG_INTERACTION,
    "allergy": Category.DRUG_ALLERGY,
    "condition": Category.DRUG_CONDITION,
    "duplicate": Category.DUPLICATE_THERAPY,
    "dose": Category.DOSE,
    "age": Category.AGE,
    "pregnancy": Category.PREGNANCY,
    "lactation": Category.PREGNANCY,
    "renal": Category.RENAL,
}
MIN_SEVERITIES = ("INFO", "MINOR", "MODERATE", "MAJOR", "CONTRAINDICATED")

# Targets: every expected MAJOR or CONTRAINDICATED finding raised, at
# least 95% of all expected findings raised, and at most one false alarm
# per 20 cases.
MIN_SENSITIVITY = 0.95
CASES_PER_FALSE_ALARM = 20


class CaseError(ValueError):
    """The case file is malformed; the message names the case and field."""


@dataclass(frozen=True)
class ExpectedFinding:
    """A finding a case expects, or accepts when `min_severity` is None.

    Names are matched case-insensitively against the finding's subjects,
    which are the request's names as given.
    """

    category: str
    medications: tuple[str, ...]
    min_severity: int | None
    allergy: str | None = None
    condition: str | None = None
    reason: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        extra = (name for name in (self.allergy, self.condition) if name)

        return (*self.medications, *extra)

    def matches(self, finding: cds_pb2.Finding) -> bool:
        """Return whether the finding is about this, at any severity."""
        if finding.category != CATEGORIES[self.category]:
            return False
        subjects = {subject.casefold() for subject in finding.subjects}

        return all(name.casefold() in subjects for name in self.names)

    def describe(self) -> str:
        text = f"{self.category}: {' with '.join(self.names)}"
        if self.min_severity is not None:
            text += f", {Severity.Name(self.min_severity)} or above"

        return text


@dataclass(frozen=True)
class Case:
    id: str
    summary: str
    request: cds_pb2.ClinicalReviewRequest
    expected: tuple[ExpectedFinding, ...]
    acceptable: tuple[ExpectedFinding, ...] = ()


@dataclass(frozen=True)
class Miss:
    """An expected finding the engine did not raise at its severity."""

    expected: ExpectedFinding
    # Severity of a matching finding below the minimum, if one was raised.
    raised_severity: int | None
    # The engine's not-screened reports for the named items, as
    # "subject: reason".
    not_screened: tuple[str, ...]

    def describe(self) -> str:
        if self.raised_severity is not None:
            outcome = f"raised as {Severity.Name(self.raised_severity)}"
        else:
            outcome = "not raised"
        text = f"{self.expected.describe()}: {outcome}"
        if self.not_screened:
            text += f" (not screened: {'; '.join(self.not_screened)})"

        return text


@dataclass
class CaseResult:
    case: Case
    found: list[ExpectedFinding] = field(default_factory=list)
    missed: list[Miss] = field(default_factory=list)
    false_alarms: list[cds_pb2.Finding] = field(default_factory=list)


# --- Reading the case file --------------------------------------------


def _fail(case_id: str, message: str) -> CaseError:
    return CaseError(f"case {case_id!r}: {message}")


def _text(raw: dict[str, Any], key: str, case_id: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _fail(case_id, f"{key!r} must be a non-empty string")

    return value


def _parse_finding(
    raw: Any,
    case_id: str,
    request: cds_pb2.ClinicalReviewRequest,
    expected: bool,
) -> ExpectedFinding:
    where = "expected" if expected else "acceptable"
    if not isinstance(raw, dict):
        raise _fail(case_id, f"each {where} finding must be an object")
    allowed = {"category", "medications", "allergy", "condition", "reason"}
    if expected:
        allowed.add("minSeverity")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _fail(
            case_id,
            f"unknown field(s) {unknown} in an {where} finding; allowed "
            f"fields are {sorted(allowed)}",
        )

    category = raw.get("category")
    if category not in CATEGORIES:
        raise _fail(
            case_id,
            f"category {category!r} is not one of {sorted(CATEGORIES)}",
        )
    medications = raw.get("medications")
    if (
        not isinstance(medications, list)
        or not medications
        or not all(isinstance(name, str) for name in medications)
    ):
        raise _fail(case_id, "'medications' must list at least one name")
    _check_named(
        case_id,
        "medication",
        medications,
        [m.name for m in request.medications],
    )
    allergy = raw.get("allergy")
    if allergy is not None:
        _check_named(
            case_id,
            "allergy",
            [allergy],
            [a.substance for a in request.allergies],
        )
    condition = raw.get("condition")
    if condition is not None:
        _check_named(
            case_id,
            "condition",
            [condition],
            [c.name for c in request.conditions],
        )

    min_severity = None
    if expected:
        severity = raw.get("minSeverity")
        if severity not in MIN_SEVERITIES:
            raise _fail(
                case_id,
                f"minSeverity {severity!r} is not one of "
                f"{list(MIN_SEVERITIES)}",
            )
        min_severity = Severity.Value(severity)

    return ExpectedFinding(
        category=category,
        medications=tuple(medications),
        min_severity=min_severity,
        allergy=allergy,
        condition=condition,
        reason=_text(raw, "reason", case_id),
    )


def _check_named(
    case_id: str, kind: str, names: Iterable[Any], known: Sequence[str]
) -> None:
    """Reject a name that the case's request does not contain."""
    folded = {name.casefold() for name in known}
    for name in names:
        if not isinstance(name, str) or name.casefold() not in folded:
            raise _fail(
                case_id,
                f"{kind} {name!r} is not in the request; name it exactly "
                f"as the request does, one of {list(known)}",
            )


def parse_case(raw: Any) -> Case:
    """Build a case from its JSON object, or raise CaseError."""
    if not isinstance(raw, dict):
        raise CaseError("each case must be a JSON object")
    case_id = _text(raw, "id", "?")
    unknown = sorted(
        set(raw) - {"id", "summary", "request", "expected", "acceptable"}
    )
    if unknown:
        raise _fail(case_id, f"unknown field(s) {unknown}")
    if not isinstance(raw.get("request"), dict):
        raise _fail(
            case_id,
            "'request' must be an object: the review request in the JSON "
            "form the REST API takes",
        )
    try:
        request = json_format.ParseDict(
            raw["request"], cds_pb2.ClinicalReviewRequest()
        )
    except json_format.ParseError as error:
        raise _fail(case_id, f"invalid request: {error}") from None

    findings = {}
    for key in ("expected", "acceptable"):
        items = raw.get(key, [])
        if not isinstance(items, list):
            raise _fail(case_id, f"{key!r} must be a list")
        findings[key] = tuple(
            _parse_finding(item, case_id, request, key == "expected")
            for item in items
        )
    if "expected" not in raw:
        raise _fail(
            case_id,
            "'expected' is missing. Use [] when no finding is expected.",
        )

    return Case(
        id=case_id,
        summary=_text(raw, "summary", case_id),
        request=request,
        expected=findings["expected"],
        acceptable=findings["acceptable"],
    )


def load_cases(path: Path) -> list[Case]:
    """Read and validate a case file; raise CaseError naming the problem."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CaseError(f"{path}: failed to read the cases: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise CaseError(f"{path}: expected an object with a 'cases' list")

    cases = [parse_case(raw) for raw in data["cases"]]
    seen: set[str] = set()
    for case in cases:
        if case.id in seen:
            raise _fail(case.id, "duplicate id. Give each case its own id.")
        seen.add(case.id)

    return cases


# --- Scoring ----------------------------------------------------------


def score_case(
    case: Case,
    findings: Sequence[cds_pb2.Finding],
    not_screened: Sequence[cds_pb2.NotScreened] = (),
) -> CaseResult:
    """Compare the engine's findings for a case with what it expects.

    An expected finding is found when a finding of its category names all
    its subjects at its minimum severity or above. A MAJOR or
    CONTRAINDICATED finding that matches no expected or acceptable finding
    of the case, at any severity, is a false alarm.
    """
    result = CaseResult(case)
    for expected in case.expected:
        matching = [f.severity for f in findings if expected.matches(f)]
        assert expected.min_severity is not None
        if any(severity >= expected.min_severity for severity in matching):
            result.found.append(expected)
            continue
        names = {name.casefold() for name in expected.names}
        result.missed.append(
            Miss(
                expected=expected,
                raised_severity=max(matching, default=None),
                not_screened=tuple(
                    f"{gap.subject}: {gap.reason}"
                    for gap in not_screened
                    if gap.subject.casefold() in names
                ),
            )
        )

    allowed = (*case.expected, *case.acceptable)
    result.false_alarms = [
        finding
        for finding in findings
        if finding.severity >= Severity.MAJOR
        and not any(item.matches(finding) for item in allowed)
    ]

    return result


def evaluate_case(case: Case, kb: KnowledgeBase) -> CaseResult:
    """Screen a case's request and score the findings."""
    screening = screen(case.request, kb)

    return score_case(case, screening.findings, screening.not_screened)


def false_alarm_category(case: Case, finding: cds_pb2.Finding) -> str:
    """Name the case category a false alarm counts under.

    The engine reports lactation under PREGNANCY, so a PREGNANCY finding
    for a lactating patient who is not pregnant counts as lactation.
    """
    patient = case.request.patient
    if (
        finding.category == Category.PREGNANCY
        and patient.lactating
        and not patient.pregnant
    ):
        return "lactation"
    for name, category in CATEGORIES.items():
        if category == finding.category:
            return name

    return Category.Name(finding.category).lower()


@dataclass
class CategoryScore:
    category: str
    expected: int = 0
    found: int = 0
    critical_expected: int = 0
    critical_found: int = 0
    false_alarms: int = 0

    @property
    def sensitivity(self) -> float | None:
        return self.found / self.expected if self.expected else None

    def add(self, other: "CategoryScore") -> None:
        self.expected += other.expected
        self.found += other.found
        self.critical_expected += other.critical_expected
        self.critical_found += other.critical_found
        self.false_alarms += other.false_alarms


@dataclass(frozen=True)
class Target:
    description: str
    result: str
    met: bool


@dataclass
class Evaluation:
    knowledge_base_version: str
    results: list[CaseResult]
    categories: list[CategoryScore]
    overall: CategoryScore
    targets: list[Target]

    @property
    def passed(self) -> bool:
        return all(target.met for target in self.targets)


def _is_critical(expected: ExpectedFinding) -> bool:
    return (expected.min_severity or 0) >= Severity.MAJOR


def summarize(
    results: Sequence[CaseResult], knowledge_base_version: str
) -> Evaluation:
    """Total the case results per category and check the targets."""
    scores = {name: CategoryScore(name) for name in CATEGORIES}
    for result in results:
        for expected in result.case.expected:
            score = scores[expected.category]
            score.expected += 1
            score.critical_expected += _is_critical(expected)
        for expected in result.found:
            score = scores[expected.category]
            score.found += 1
            score.critical_found += _is_critical(expected)
        for finding in result.false_alarms:
            name = false_alarm_category(result.case, finding)
            scores.setdefault(name, CategoryScore(name)).false_alarms += 1

    overall = CategoryScore("all")
    for score in scores.values():
        overall.add(score)

    return Evaluation(
        knowledge_base_version=knowledge_base_version,
        results=list(results),
        categories=list(scores.values()),
        overall=overall,
        targets=_targets(overall, len(results)),
    )


def _targets(overall: CategoryScore, case_count: int) -> list[Target]:
    sensitivity = overall.sensitivity
    allowed_false_alarms = case_count // CASES_PER_FALSE_ALARM

    return [
        Target(
            "Every expected MAJOR or CONTRAINDICATED finding raised",
            f"{overall.critical_found} of {overall.critical_expected}",
            overall.critical_found == overall.critical_expected,
        ),
        Target(
            f"At least {MIN_SENSITIVITY:.0%} of expected findings raised",
            _percent(sensitivity),
            sensitivity is None or sensitivity >= MIN_SENSITIVITY,
        ),
        Target(
            f"At most one false alarm per {CASES_PER_FALSE_ALARM} cases "
            f"({allowed_false_alarms} in {case_count})",
            f"{overall.false_alarms} in {case_count} cases",
            overall.false_alarms <= allowed_false_alarms,
        ),
    ]


def evaluate(cases: Sequence[Case], kb: KnowledgeBase) -> Evaluation:
    """Screen and score every case against the knowledge base."""
    return summarize([evaluate_case(case, kb) for case in cases], kb.version)


# --- Reports ----------------------------------------------------------


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _finding_text(finding: cds_pb2.Finding) -> str:
    return (
        f"{Severity.Name(finding.severity)} "
        f"{Category.Name(finding.category)} `{finding.rule_id}`: "
        f"{finding.summary}"
    )


def render_markdown(evaluation: Evaluation) -> str:
    """Render the scores as a Markdown section of the clinical docs."""
    results = evaluation.results
    safe = sum(
        1 for r in results if not any(map(_is_critical, r.case.expected))
    )
    overall = evaluation.overall
    lines = [
        SECTION_HEADING,
        "",
        f"Knowledge base {evaluation.knowledge_base_version}: "
        f"{len(results)} cases, {safe} of them with no MAJOR or "
        f"CONTRAINDICATED finding expected, and {overall.expected} "
        "expected findings. Generated by `python -m services.cds.evaluate`.",
        "",
        "| Target | Result | Met |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| {t.description} | {t.result} | {'yes' if t.met else 'no'} |"
        for t in evaluation.targets
    ]
    lines += [
        "",
        "| Category | Expected | Found | Sensitivity | MAJOR or above "
        "expected | MAJOR or above found | False alarms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for score in [*evaluation.categories, overall]:
        lines.append(
            f"| {score.category} | {score.expected} | {score.found} | "
            f"{_percent(score.sensitivity)} | {score.critical_expected} | "
            f"{score.critical_found} | {score.false_alarms} |"
        )

    misses = [(r.case.id, m) for r in results for m in r.missed]
    lines += ["", f"### Missed findings ({len(misses)})", ""]
    lines += [f"- `{case_id}`: {miss.describe()}" for case_id, miss in misses]
    if not misses:
        lines.append("None.")
    alarms = [(r.case.id, f) for r in results for f in r.false_alarms]
    lines += ["", f"### False alarms ({len(alarms)})", ""]
    lines += [f"- `{case_id}`: {_finding_text(f)}" for case_id, f in alarms]
    if not alarms:
        lines.append("None.")

    return "\n".join(lines) + "\n"


def _score_json(score: CategoryScore) -> dict[str, Any]:
    return {
        "category": score.category,
        "expected": score.expected,
        "found": score.found,
        "sensitivity": score.sensitivity,
        "majorOrAboveExpected": score.critical_expected,
        "majorOrAboveFound": score.critical_found,
        "falseAlarms": score.false_alarms,
    }


def render_json(evaluation: Evaluation) -> str:
    """Render the scores and every case's misses and false alarms."""
    report = {
        "knowledgeBaseVersion": evaluation.knowledge_base_version,
        "passed": evaluation.passed,
        "targets": [
            {"target": t.description, "result": t.result, "met": t.met}
            for t in evaluation.targets
        ],
        "categories": [_score_json(s) for s in evaluation.categories],
        "overall": _score_json(evaluation.overall),
        "cases": [
            {
                "id": result.case.id,
                "found": [e.describe() for e in result.found],
                "missed": [m.describe() for m in result.missed],
                "falseAlarms": [
                    json_format.MessageToDict(f) for f in result.false_alarms
                ],
            }
            for result in evaluation.results
        ],
    }

    return json.dumps(report, indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.cds.evaluate",
        description="Score the screening engine against the clinical "
        "evaluation cases. Exits 1 when a target is missed.",
    )
    parser.add_argument(
        "--cases",
        type=Path,
        default=DEFAULT_CASES,
        help="case file to score (default: %(default)s)",
    )
    parser.add_argument(
        "--format",
        choices=("markdown", "json"),
        default="markdown",
        help="report format on standard output (default: %(default)s)",
    )
    parser.add_argument(
        "--update-doc",
        type=Path,
        metavar="FILE",
        help=f"also write the Markdown report into FILE, replacing its "
        f"{SECTION_HEADING!r} section",
    )
    args = parser.parse_args(argv)

    try:
        cases = load_cases(args.cases)
    except CaseError as error:
        sys.stderr.write(f"invalid case file {args.cases}: {error}\n")
        return 2
    evaluation = evaluate(cases, load_knowledge_base())

    markdown = render_markdown(evaluation)
    if args.update_doc is not None:
        document = ""
        if args.update_doc.exists():
            document = args.update_doc.read_text(encoding="utf-8")
        args.update_doc.write_text(
            replace_section(document, SECTION_HEADING, markdown),
            encoding="utf-8",
        )
    if args.format == "json":
        sys.stdout.write(render_json(evaluation))
    else:
        sys.stdout.write(markdown)
    for target in evaluation.targets:
        if not target.met:
            sys.stderr.write(
                f"target missed: {target.description}: {target.result}\n"
            )

    return 0 if evaluation.passed else 1


if __name__ == "__main__":
    sys.exit(main())
