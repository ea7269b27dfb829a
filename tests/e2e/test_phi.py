"""Patient data never reaches a log line, the database, a run file or the
response.

Each test sends reviews whose every field carries a distinctive marker,
over REST and native gRPC, valid and invalid ones, and then searches every
log file, every table of every schema and every file under the suite's run
folder for the markers.
"""

import json
import time
from pathlib import Path

import grpc
import psycopg
import pytest
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc
from google.protobuf import json_format

from tests.e2e.test_audit import stored_rows
from tests.suite import Organization, run_cli

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"
# Numbers chosen so that their digits cannot come from anything else.
WEIGHT = 123.456789
EGFR = 87.654321
# Distinctive strings that can only come from a request.
MARKERS = {
    "medication": "zzphimarkerdrug",
    "rxnorm": "98765432123",
    "dose unit": "zzphimarkerunit",
    "route": "zzphimarkerroute",
    "frequency": "zzphimarkerfrequency",
    "condition": "zzphimarkercondition",
    "icd10": "ZZPHIMARKERICD",
    "snomed": "ZZPHIMARKERSNOMED",
    "allergy": "zzphimarkerallergen",
    "reaction": "zzphimarkerreaction",
    "question": "zzphimarkerquestion",
    "weight": str(WEIGHT),
    "egfr": str(EGFR),
}
# Markers only an invalid request carries.
INVALID_MARKERS = {
    "overlong name": "zzphimarkeroverlong",
    "unknown enum": "zzphimarkerenum",
    "malformed json": "zzphimarkermalformed",
    "grpc medication": "zzphimarkergrpcdrug",
}


def review_body(model_review: bool) -> dict:
    return {
        "patient": {
            "ageYears": 97,
            "sex": "FEMALE",
            "weightKg": WEIGHT,
            "egfr": EGFR,
            "pregnant": False,
            "lactating": False,
        },
        "medications": [
            {
                "name": "warfarin",
                "dose": {"value": 5, "unit": "mg"},
                "route": "oral",
                "frequency": "daily",
            },
            {"name": "ibuprofen"},
            {
                "name": MARKERS["medication"],
                "rxnorm": MARKERS["rxnorm"],
                "dose": {"value": 2.5, "unit": MARKERS["dose unit"]},
                "route": MARKERS["route"],
                "frequency": MARKERS["frequency"],
            },
        ],
        "conditions": [
            {
                "name": MARKERS["condition"],
                "icd10": MARKERS["icd10"],
                "snomed": MARKERS["snomed"],
            }
        ],
        "allergies": [
            {
                "substance": MARKERS["allergy"],
                "reaction": MARKERS["reaction"],
                "severity": "SEVERE",
            }
        ],
        "question": f"Is {MARKERS['question']} a concern?",
        "options": {"modelReview": model_review},
    }


def _invalid_requests(edge, key: dict) -> list[str]:
    """Send invalid reviews carrying markers; return their request ids."""
    overlong = {
        "medications": [{"name": INVALID_MARKERS["overlong name"] * 20}]
    }
    bad_enum = {
        "patient": {"sex": INVALID_MARKERS["unknown enum"]},
        "medications": [{"name": "warfarin"}],
    }
    malformed = (
        '{"medications": [{"name": "' + INVALID_MARKERS["malformed json"]
    ).encode()
    responses = [
        edge.request("POST", REVIEW_PATH, overlong, key),
        edge.request("POST", REVIEW_PATH, bad_enum, key),
        edge.request(
            "POST",
            REVIEW_PATH,
            malformed,
            key | {"content-type": "application/json"},
        ),
    ]
    for response in responses:
        assert 400 == response.status, response.body

    return [response.headers["x-request-id"] for response in responses]


def _grpc_review(edge, api_key: str) -> None:
    body = review_body(model_review=False)
    body["medications"].append({"name": INVALID_MARKERS["grpc medication"]})
    request = json_format.ParseDict(body, cds_pb2.ClinicalReviewRequest())
    with edge.channel() as channel:
        stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
        stub.ClinicalReview(
            request, metadata=[("x-api-key", api_key)], timeout=60
        )
        # The same request over the limit: rejected, with markers inside.
        request.medications[0].name = INVALID_MARKERS["overlong name"] * 20
        with pytest.raises(grpc.RpcError) as rejected:
            stub.ClinicalReview(
                request, metadata=[("x-api-key", api_key)], timeout=60
            )
    assert grpc.StatusCode.INVALID_ARGUMENT == rejected.value.code()


def _all_markers() -> dict[str, bytes]:
    return {
        field: marker.encode()
        for field, marker in (MARKERS | INVALID_MARKERS).items()
    }


def _files_with_markers(
    folder: Path, markers: dict[str, bytes] | None = None
) -> list[str]:
    found = []
    markers = _all_markers() if markers is None else markers
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        content = path.read_bytes()
        found += [
            f"{field} in {path.relative_to(folder)}"
            for field, marker in markers.items()
            if marker in content
        ]

    return found


def _table_dumps(database_url: str) -> dict[str, str]:
    """Return the text of every row of every table, by table name."""
    with psycopg.connect(database_url) as connection:
        tables = connection.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_type = 'BASE TABLE' AND table_schema NOT IN"
            " ('pg_catalog', 'information_schema')"
        ).fetchall()
        assert tables, "no table found: is the database set up?"

        return {
            f"{schema}.{table}": connection.execute(
                f'SELECT string_agg(t::text, \'\') FROM "{schema}"."{table}" t'
            ).fetchone()[0]
            or ""
            for schema, table in tables
        }


@pytest.fixture(scope="module")
def marked_traffic(stack, edge):
    """Send valid and invalid marked reviews; return the org's API key."""
    org = Organization(stack)
    key = {"x-api-key": org.api_key}
    request_ids = []
    for model_review in (True, False):
        response = edge.request(
            "POST", REVIEW_PATH, review_body(model_review), key
        )
        assert 200 == response.status, response.body
        request_ids.append(response.headers["x-request-id"])
    request_ids += _invalid_requests(edge, key)
    _grpc_review(edge, org.api_key)
    # Every request has its audit row once the last one is stored, so the
    # services have finished with them.
    stored_rows(stack, request_ids)

    return org.api_key


class TestNoPhiPersisted:
    def test_no_marker_in_any_run_file(self, stack, marked_traffic):
        """Logs, configs and the database files under the run folder."""
        logs = sorted((stack.run_dir / "logs").glob("*.log"))
        assert {"envoy.log", "cds.log", "auth.log", "audit.log"} <= {
            path.name for path in logs
        }

        assert [] == _files_with_markers(stack.run_dir)

    def test_search_reaches_database_files(self, stack, marked_traffic):
        """An organization's name, which is stored, is found on disk.

        This proves that the search above reads PostgreSQL's files, so a
        marker written to any table would be found there too.
        """
        if stack.settings.database_url:
            pytest.skip("the database is external, not under the run folder")
        name = f"zzstoredname{time.monotonic_ns()}"
        run_cli(stack, "orgs", "create", "--name", name, "--plan", "free")

        found = _files_with_markers(
            stack.run_dir / "postgres", {"stored name": name.encode()}
        )

        assert found, "the stored organization name is in no database file"

    def test_no_api_key_in_any_run_file(self, stack, marked_traffic):
        key = marked_traffic.encode()
        leaked = [
            str(path.relative_to(stack.run_dir))
            for path in stack.run_dir.rglob("*")
            if path.is_file()
            and not path.is_symlink()
            and key in path.read_bytes()
        ]

        assert [] == leaked

    def test_no_marker_in_any_table(self, stack, marked_traffic):
        markers = {f: m.decode() for f, m in _all_markers().items()}
        dumps = _table_dumps(stack.admin_database_url)
        found = [
            f"{field} in {table}"
            for table, dump in dumps.items()
            for field, marker in markers.items()
            if marker in dump
        ]

        assert [] == found

    def test_no_api_key_in_any_table(self, stack, marked_traffic):
        dumps = _table_dumps(stack.admin_database_url)
        assert dumps["auth.api_keys"], "no key stored at all"

        assert [] == [
            table for table, dump in dumps.items() if marked_traffic in dump
        ]


class TestResponses:
    def test_no_demographics_echoed(self, edge, new_org):
        """The response carries no weight, eGFR or question text."""
        org = new_org()

        response = edge.request(
            "POST",
            REVIEW_PATH,
            review_body(model_review=False),
            {"x-api-key": org.api_key},
        )

        assert 200 == response.status
        text = response.body.decode()
        assert MARKERS["weight"] not in text
        assert MARKERS["egfr"] not in text
        assert MARKERS["question"] not in text
        assert "patient" not in json.loads(text)

    def test_unrecognized_drug_reported_by_name(self, edge, new_org):
        """An unknown medication is reported back as not screened."""
        org = new_org()

        review = edge.request(
            "POST",
            REVIEW_PATH,
            review_body(model_review=False),
            {"x-api-key": org.api_key},
        ).json()

        subjects = [item["subject"] for item in review["notScreened"]]
        assert MARKERS["medication"] in subjects
