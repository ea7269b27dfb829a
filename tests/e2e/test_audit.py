"""The audit trail: one row per request, scoped to its organization."""

import base64
import json
import time

import grpc
import psycopg
import pytest
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"
RULES_ONLY = {
    "medications": [{"name": "lisinopril"}],
    "options": {"modelReview": False},
}
# Envoy flushes its access log every 0.5 s; allow for a slow machine.
AUDIT_WAIT = 20.0


def stored_rows(stack, request_ids: list[str]) -> dict[str, tuple]:
    """Wait until every request id has a row; return the rows by id."""
    deadline = time.monotonic() + AUDIT_WAIT
    with psycopg.connect(stack.admin_database_url) as connection:
        while True:
            rows = connection.execute(
                "SELECT request_id, org_id::text, key_id, action,"
                " status_code, grpc_status, method, endpoint"
                " FROM audit.events WHERE request_id = ANY(%s)",
                (request_ids,),
            ).fetchall()
            found = {row[0]: row for row in rows}
            if len(found) == len(set(request_ids)):
                return found
            if time.monotonic() > deadline:
                missing = set(request_ids) - set(found)
                raise AssertionError(f"no audit row for {sorted(missing)}")
            time.sleep(0.25)


def stored_reviews(stack, edge, key: dict, count: int) -> None:
    """Send `count` rules-only reviews and wait until all are stored."""
    sent = [
        edge.request("POST", REVIEW_PATH, RULES_ONLY, key).headers[
            "x-request-id"
        ]
        for _ in range(count)
    ]
    stored_rows(stack, sent)


class TestCompleteness:
    def test_every_outcome_has_a_row(self, stack, edge, new_org):
        """200, 400, 401 and 404 responses each get one audit row."""
        org = new_org()
        key = {"x-api-key": org.api_key}
        responses = {
            "ok": edge.request("POST", REVIEW_PATH, RULES_ONLY, key),
            "invalid": edge.request(
                "POST", REVIEW_PATH, {"question": "x" * 2001}, key
            ),
            "no_key": edge.request("POST", REVIEW_PATH, RULES_ONLY),
            "no_route": edge.request("GET", "/v1/nothing-here", headers=key),
        }
        ids = {
            name: response.headers["x-request-id"]
            for name, response in responses.items()
        }

        rows = stored_rows(stack, list(ids.values()))

        ok = rows[ids["ok"]]
        assert (org.org_id, org.key_id, "cds.clinical_review", 200) == ok[1:5]
        assert ("POST", REVIEW_PATH) == ok[6:8]
        assert 400 == rows[ids["invalid"]][4]
        assert org.org_id == rows[ids["invalid"]][1]
        no_key = rows[ids["no_key"]]
        assert (None, None, "cds.clinical_review", 401) == no_key[1:5]
        assert 404 == rows[ids["no_route"]][4]
        assert "(unrouted)" == rows[ids["no_route"]][7]

    def test_endpoint_is_the_route_not_the_path(self, stack, edge, new_org):
        """What a client puts in a path segment is not stored."""
        org = new_org()
        key = {"x-api-key": org.api_key}
        response = edge.request(
            "DELETE", "/v1/keys/zzphimarkerpath", headers=key
        )

        [row] = stored_rows(stack, [response.headers["x-request-id"]]).values()

        assert 404 == response.status
        assert "/v1/keys/{key_id}" == row[7]

    def test_url_text_never_stored(self, stack, edge, new_org):
        """Query string values and path text a client sent reach neither
        the access-log file nor the audit table: both hold the route."""
        org = new_org()
        key = {"x-api-key": org.api_key}
        sent = {
            "/v1/audit": edge.request(
                "GET", "/v1/audit?pageSize=5&zzqname=zzqvalueone", None, key
            ),
            "/v1/keys/{key_id}": edge.request(
                "DELETE", "/v1/keys/zzpathsegment?force=zzqvaluetwo", None, key
            ),
            "/v1/cds/clinical-review": edge.request(
                "POST", f"{REVIEW_PATH}?note=zzqvaluethree", RULES_ONLY, key
            ),
            "(unrouted)": edge.request(
                "GET", "/v1/zzpathunrouted?q=zzqvaluefour", None, key
            ),
        }
        with edge.channel() as channel:
            unknown = channel.unary_unary(
                "/arxio.cds.v1.ClinicalDecisionSupportService/ZzPathGrpc"
            )
            with pytest.raises(grpc.RpcError) as raised:
                unknown(b"", metadata=[("x-api-key", org.api_key)], timeout=30)
        metadata = dict(raised.value.initial_metadata())
        metadata |= dict(raised.value.trailing_metadata())
        ids = {
            endpoint: response.headers["x-request-id"]
            for endpoint, response in sent.items()
        }

        rows = stored_rows(stack, [*ids.values(), metadata["x-request-id"]])

        for endpoint, request_id in ids.items():
            assert endpoint == rows[request_id][7]
        assert "(unrouted)" == rows[metadata["x-request-id"]][7]
        stored = repr(rows)
        log_text = stack.access_log_path.read_text()
        for marker in ("zzq", "zzpath", "ZzPath"):
            assert marker not in stored
            assert marker not in log_text

    def test_quota_rejection_has_a_row(self, stack, edge, new_org):
        """A 429 is audited with the organization that hit its limit."""
        org = new_org()
        key = {"x-api-key": org.api_key}
        for _ in range(100):
            edge.request("POST", REVIEW_PATH, RULES_ONLY, key)

        rejected = edge.request("POST", REVIEW_PATH, RULES_ONLY, key)

        assert 429 == rejected.status
        row = stored_rows(stack, [rejected.headers["x-request-id"]])
        assert (org.org_id, 429) == (
            row[rejected.headers["x-request-id"]][1],
            row[rejected.headers["x-request-id"]][4],
        )

    def test_grpc_outcome_from_grpc_status(self, stack, edge, new_org):
        """A failed native gRPC call is audited with its grpc-status."""
        org = new_org()
        request = cds_pb2.ClinicalReviewRequest(question="x" * 2001)

        with edge.channel() as channel:
            stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.ClinicalReview(
                    request, metadata=[("x-api-key", org.api_key)], timeout=30
                )
        # A failed call is trailers-only: the request id is in the trailers.
        metadata = dict(raised.value.initial_metadata())
        metadata |= dict(raised.value.trailing_metadata())
        request_id = metadata["x-request-id"]

        row = stored_rows(stack, [request_id])[request_id]

        assert grpc.StatusCode.INVALID_ARGUMENT == raised.value.code()
        assert (400, 3) == (row[4], row[5])


class TestIsolation:
    def test_org_reads_only_its_own_rows(self, stack, edge, new_org):
        """GET /v1/audit never returns another organization's rows."""
        first, second = new_org(), new_org()
        mine = edge.request(
            "POST", REVIEW_PATH, RULES_ONLY, {"x-api-key": first.api_key}
        )
        theirs = edge.request(
            "POST", REVIEW_PATH, RULES_ONLY, {"x-api-key": second.api_key}
        )
        stored_rows(
            stack,
            [mine.headers["x-request-id"], theirs.headers["x-request-id"]],
        )

        page = edge.request(
            "GET",
            "/v1/audit?pageSize=1000",
            headers={"x-api-key": first.api_key},
        ).json()

        request_ids = {event["requestId"] for event in page["auditEvents"]}
        assert mine.headers["x-request-id"] in request_ids
        assert theirs.headers["x-request-id"] not in request_ids
        assert {first.org_id} == {
            event["orgId"] for event in page["auditEvents"]
        }

    def test_pages_are_newest_first(self, stack, edge, new_org):
        """Pages of two entries follow each other, newest first."""
        org = new_org()
        key = {"x-api-key": org.api_key}
        stored_reviews(stack, edge, key, 3)

        first = edge.request("GET", "/v1/audit?pageSize=2", headers=key).json()
        second = edge.request(
            "GET",
            f"/v1/audit?pageSize=2&pageToken={first['nextPageToken']}",
            headers=key,
        ).json()

        assert 2 == len(first["auditEvents"])
        times = [
            event["time"]
            for event in first["auditEvents"] + second["auditEvents"]
        ]
        assert sorted(times, reverse=True) == times
        listed = [
            event["requestId"]
            for event in first["auditEvents"] + second["auditEvents"]
        ]
        assert len(listed) == len(set(listed))

    def test_page_token_with_other_uuid_spellings(self, stack, edge, new_org):
        """A token id spelled urn:uuid:... or {...} reads the same page.

        Python's uuid reads these spellings and PostgreSQL does not, so
        the token's id must reach the query in its canonical form.
        """
        org = new_org()
        key = {"x-api-key": org.api_key}
        stored_reviews(stack, edge, key, 3)
        first = edge.request("GET", "/v1/audit?pageSize=2", headers=key).json()
        token = first["nextPageToken"]
        when, identifier = json.loads(
            base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        )
        expected = edge.request(
            "GET", f"/v1/audit?pageSize=2&pageToken={token}", headers=key
        ).json()

        for spelling in (f"urn:uuid:{identifier}", f"{{{identifier}}}"):
            forged = (
                base64.urlsafe_b64encode(json.dumps([when, spelling]).encode())
                .decode()
                .rstrip("=")
            )
            response = edge.request(
                "GET", f"/v1/audit?pageSize=2&pageToken={forged}", headers=key
            )

            assert 200 == response.status, response.body
            assert expected == response.json()

    def test_invalid_page_token_rejected(self, edge, new_org):
        """A forged page token gets 400 naming pageToken."""
        org = new_org()

        response = edge.request(
            "GET",
            "/v1/audit?pageToken=not-a-token",
            headers={"x-api-key": org.api_key},
        )

        assert 400 == response.status
        assert "pageToken" in response.body.decode()


class TestImmutability:
    def test_service_role_cannot_change_rows(self, stack, edge):
        """The audit service's role may not update or delete rows."""
        edge.request("POST", REVIEW_PATH, RULES_ONLY)
        with psycopg.connect(stack.database_urls["audit"]) as connection:
            for statement in (
                "UPDATE audit.events SET status_code = 200",
                "DELETE FROM audit.events",
                "TRUNCATE audit.events",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    connection.execute(statement)
                connection.rollback()

    def test_trigger_rejects_change_by_owner(self, stack, edge):
        """Even a superuser's UPDATE or DELETE is rejected by the trigger."""
        response = edge.request("POST", REVIEW_PATH, RULES_ONLY)
        request_id = response.headers["x-request-id"]
        stored_rows(stack, [request_id])
        with psycopg.connect(stack.admin_database_url) as connection:
            for statement in (
                "UPDATE audit.events SET status_code = 200"
                " WHERE request_id = %s",
                "DELETE FROM audit.events WHERE request_id = %s",
            ):
                with pytest.raises(
                    psycopg.errors.InsufficientPrivilege
                ) as raised:
                    connection.execute(statement, (request_id,))
                assert "append-only" in str(raised.value)
                connection.rollback()
