"""Every audit entry has a request id that the edge generated, never a
client's, and no id is stored twice.

A real Envoy writes the access log and a real ingester stores it. Among
the requests are some that Envoy rejects before it replaces a client's
X-Request-ID.
"""

import datetime
import json
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from services.audit.entries import (
    EDGE_REQUEST_ID,
    REPLACED_REQUEST_ID_PREFIX,
)
from tests.e2e.edge_instance import EdgeInstance, overloaded_edge
from tests.e2e.fault_load import sample_sum, scrape
from tests.e2e.test_audit_rotation import ingester_events
from tests.e2e.test_edge_replies import raw_exchange
from tests.edge import EdgeClient
from tests.suite import Organization, own_stack

pytestmark = pytest.mark.e2e

CLIENT_ID = "chosen-by-the-client"
REPLAYED = "arxio_audit_ingest_replayed_lines_total"
LONG_CLIENT_ID = "x" * 20000
# Envoy flushes the suite's access log every 0.2 s, and the second edge's
# every 10 s (Envoy's default); allow for a slow machine.
WAIT = 60.0


@pytest.fixture(scope="module")
def id_stack():
    with own_stack() as stack:
        yield stack


@pytest.fixture
def edge(id_stack) -> EdgeClient:
    return EdgeClient(id_stack.edge_port, id_stack.certs_dir / "ca.crt")


def send_in_parallel(
    edge: EdgeClient, request: bytes, count: int
) -> list[tuple[int, dict[str, str], bytes]]:
    with ThreadPoolExecutor(16) as pool:
        return list(
            pool.map(lambda _: raw_exchange(edge, request), range(count))
        )


def entries(stack, request_ids: list[str]) -> dict[str, list[tuple]]:
    """Wait until each request id has an entry; return the entries by id:
    (status_code, grpc_status, action) each."""
    deadline = time.monotonic() + WAIT
    with psycopg.connect(stack.admin_database_url, autocommit=True) as conn:
        while True:
            rows = conn.execute(
                "SELECT request_id, status_code, grpc_status, action"
                " FROM audit.events WHERE request_id = ANY(%s)",
                (request_ids,),
            ).fetchall()
            found: dict[str, list[tuple]] = {}
            for request_id, *entry in rows:
                found.setdefault(request_id, []).append(tuple(entry))
            if len(found) == len(set(request_ids)):
                return found
            if time.monotonic() > deadline:
                missing = len(set(request_ids) - set(found))
                raise AssertionError(f"{missing} requests have no entry")
            time.sleep(0.25)


def stored_count(stack, request_id: str) -> int:
    with psycopg.connect(stack.admin_database_url) as connection:
        return connection.execute(
            "SELECT count(*) FROM audit.events WHERE request_id = %s",
            (request_id,),
        ).fetchone()[0]


def wait_for_overload(instance: EdgeInstance) -> None:
    gauge = "overload.envoy.overload_actions.stop_accepting_requests.active"
    deadline = time.monotonic() + WAIT
    while instance.stats(gauge).get(gauge) != 1:
        assert time.monotonic() < deadline, "Envoy never shed requests"
        time.sleep(0.2)


def assert_fresh_ids(replies, client_id: str) -> list[str]:
    """Check that each reply has its own edge id, in its header and body;
    return the ids."""
    ids = [headers["x-request-id"] for _, headers, _ in replies]
    for _, headers, body in replies:
        [detail] = json.loads(body)["details"]
        assert headers["x-request-id"] == detail["requestId"]
        assert client_id.encode() not in body
    assert len(replies) == len(set(ids))
    assert client_id not in ids
    for request_id in ids:
        assert EDGE_REQUEST_ID.fullmatch(request_id), request_id

    return ids


def assert_one_entry_each(stack, request_ids: list[str], client_id: str):
    stored = entries(stack, request_ids)

    repeated = {rid: rows for rid, rows in stored.items() if len(rows) != 1}
    assert {} == repeated
    assert 0 == stored_count(stack, client_id)


class TestEarlyRejections:
    def test_parallel_no_host_requests(self, id_stack, edge):
        """200 requests at once without a Host header and with one chosen
        id get 200 entries, each under its reply's own id."""
        request = (
            b"GET /v1/audit HTTP/1.1\r\n"
            + f"x-request-id: {CLIENT_ID}\r\n".encode()
            + b"connection: close\r\n\r\n"
        )

        replies = send_in_parallel(edge, request, 200)

        assert {400} == {status for status, _, _ in replies}
        ids = assert_fresh_ids(replies, CLIENT_ID)
        assert_one_entry_each(id_stack, ids, CLIENT_ID)
        stored = entries(id_stack, ids)
        assert {(400, 3, "edge.unrouted")} == {
            rows[0] for rows in stored.values()
        }

    def test_options_asterisk(self, id_stack, edge):
        request = (
            b"OPTIONS * HTTP/1.1\r\nhost: localhost\r\n"
            + f"x-request-id: {CLIENT_ID}\r\n".encode()
            + b"connection: close\r\n\r\n"
        )

        replies = send_in_parallel(edge, request, 20)

        assert {404} == {status for status, _, _ in replies}
        ids = assert_fresh_ids(replies, CLIENT_ID)
        assert_one_entry_each(id_stack, ids, CLIENT_ID)

    def test_20_kb_id(self, id_stack, edge):
        """A 20 KB id, on a request rejected early and on a routed one,
        neither reaches the log line nor skips its entry."""
        skipped_before = ingester_events(id_stack, "audit.line_invalid")
        long_before = ingester_events(id_stack, "audit.line_too_long")
        client_header = f"x-request-id: {LONG_CLIENT_ID}\r\n".encode()

        replies = [
            raw_exchange(
                edge,
                b"GET /v1/audit HTTP/1.1\r\n"
                + client_header
                + b"connection: close\r\n\r\n",
            ),
            raw_exchange(
                edge,
                b"GET /v1/audit HTTP/1.1\r\nhost: localhost\r\n"
                + client_header
                + b"connection: close\r\n\r\n",
            ),
        ]

        assert [400, 401] == [status for status, _, _ in replies]
        ids = assert_fresh_ids(replies, LONG_CLIENT_ID)
        assert_one_entry_each(id_stack, ids, LONG_CLIENT_ID)
        assert skipped_before == ingester_events(
            id_stack, "audit.line_invalid"
        )
        assert long_before == ingester_events(id_stack, "audit.line_too_long")

    def test_overload_reply(self, id_stack, tmp_path):
        """The overload manager's 503 comes before Envoy replaces a
        client's id; its reply and entry get a fresh one all the same."""
        instance = overloaded_edge(id_stack, tmp_path)
        request = (
            b"GET /v1/audit HTTP/1.1\r\nhost: localhost\r\n"
            + f"x-request-id: {CLIENT_ID}\r\n".encode()
            + b"connection: close\r\n\r\n"
        )
        overloaded = EdgeClient(instance.port, id_stack.certs_dir / "ca.crt")
        try:
            wait_for_overload(instance)
            replies = [raw_exchange(overloaded, request) for _ in range(10)]
        finally:
            # Envoy flushes its access log when it stops.
            instance.stop()

        assert {503} == {status for status, _, _ in replies}
        ids = assert_fresh_ids(replies, CLIENT_ID)
        assert_one_entry_each(id_stack, ids, CLIENT_ID)


class TestGrpcStatus:
    def test_rest_entry_has_json_error_code(self, id_stack, edge):
        """A REST caller's entry records the code of the JSON error it got:
        the service's NOT_FOUND, the auth decision's denials and the
        edge's own replies, where Envoy's number would be derived from
        the HTTP status (12 for any 404)."""
        org = Organization(id_stack)
        key = {"x-api-key": org.api_key}
        responses = [
            # The service's NOT_FOUND for a key id of the right form.
            edge.request("DELETE", "/v1/keys/key_0123456789abcdef", None, key),
            # The auth decision's NOT_FOUND for one of the wrong form.
            edge.request("DELETE", "/v1/keys/key_zz", None, key),
            edge.request("GET", "/v1/audit"),
            edge.request("GET", "/v1/nothing-here", None, key),
        ]
        codes = {
            response.headers["x-request-id"]: response.json()["code"]
            for response in responses
        }

        stored = entries(id_stack, list(codes))

        assert [404, 404, 401, 404] == [r.status for r in responses]
        assert [5, 5, 16, 5] == list(codes.values())
        for request_id, code in codes.items():
            [(_, grpc_status, _)] = stored[request_id]
            assert code == grpc_status, request_id


class TestRepeatedIds:
    def test_repeated_id_stored_once(self, id_stack, edge):
        """A line whose id an entry has already, here one written into the
        log by hand, is stored under a fresh id."""
        response = edge.request("GET", "/v1/audit")
        request_id = response.headers["x-request-id"]
        entries(id_stack, [request_id])
        marker = "REPEATED"
        line = {
            "time": datetime.datetime.now(datetime.UTC).strftime(
                "%Y-%m-%dT%H:%M:%S.%fZ"
            ),
            "request_id": request_id,
            "reply_request_id": request_id,
            "method": marker,
            "route": "-",
            "status": 401,
        }
        with id_stack.access_log_path.open("a") as log:
            log.write(json.dumps(line) + "\n")

        deadline = time.monotonic() + WAIT
        with psycopg.connect(id_stack.admin_database_url) as connection:
            while True:
                stored = connection.execute(
                    "SELECT request_id FROM audit.events WHERE method = %s",
                    (marker,),
                ).fetchall()
                if stored or time.monotonic() > deadline:
                    break
                time.sleep(0.25)

        [(stored_id,)] = stored
        assert stored_id.startswith(REPLACED_REQUEST_ID_PREFIX)
        assert 1 == stored_count(id_stack, request_id)

    def test_replayed_line_skipped(self, id_stack, edge):
        """An exact copy of a stored line, appended to the log, is a replay:
        it is skipped and counted, not stored under a fresh id."""
        request_id = edge.request("GET", "/v1/audit").headers["x-request-id"]
        entries(id_stack, [request_id])
        [line] = [
            line
            for line in id_stack.access_log_path.read_bytes().splitlines()
            if request_id.encode() in line
        ]
        replays_before = ingester_events(id_stack, "audit.line_replayed")

        with id_stack.access_log_path.open("ab") as log:
            log.write(line + b"\n")
        # The ingester stores lines in file order, so once the next
        # request's entry is stored, the copy before it has been read.
        after = edge.request("GET", "/v1/audit").headers["x-request-id"]
        entries(id_stack, [after])

        with psycopg.connect(id_stack.admin_database_url) as connection:
            same_time = connection.execute(
                "SELECT count(*) FROM audit.events WHERE time ="
                " (SELECT time FROM audit.events WHERE request_id = %s)",
                (request_id,),
            ).fetchone()[0]
        assert 1 == stored_count(id_stack, request_id)
        assert 1 == same_time
        assert ingester_events(id_stack, "audit.line_replayed") > (
            replays_before
        )
        samples = scrape(id_stack.metrics_ports["audit-ingest"])
        assert sample_sum(samples, REPLAYED) >= 1
