"""Access-log lines become audit rows that name the route, never the path."""

import datetime

import pytest

from services.audit.entries import (
    EDGE_REQUEST_ID,
    REPLACED_REQUEST_ID_PREFIX,
    UNASSIGNED_REQUEST_ID_PREFIX,
    UNREADABLE_ACTION,
    UNROUTED_ENDPOINT,
    audit_row,
    unreadable_line_row,
)
from services.common import methods

REVIEW_GRPC_PATH = (
    "/arxio.cds.v1.ClinicalDecisionSupportService/ClinicalReview"
)


def log_line(**fields: str) -> dict:
    """Return an access-log line as the edge writes it, with `fields`."""
    return {
        "time": "2026-12-04T09:00:00.000001Z",
        "request_id": "0b7c6a52-9a7e-4c1e-9a51-3f1f3c2f5b0e",
        "reply_request_id": "0b7c6a52-9a7e-4c1e-9a51-3f1f3c2f5b0e",
        "method": "POST",
        "route": "cds.clinical_review",
        "content_type": "application/json",
        "status": "200",
        "grpc_status": "0",
        "duration_ms": "4",
        "client": "127.0.0.1",
        "org_id": None,
        "key_id": None,
        "action": None,
        "resource_type": None,
    } | fields


class TestRouteNames:
    @pytest.mark.parametrize(
        ("route", "method", "endpoint", "action"),
        [
            (
                "cds.clinical_review",
                "POST",
                "/v1/cds/clinical-review",
                "cds.clinical_review",
            ),
            (
                "auth.revoke_key",
                "DELETE",
                "/v1/keys/{key_id}",
                "auth.revoke_key",
            ),
            (
                "cds.clinical_review.grpc",
                "POST",
                REVIEW_GRPC_PATH,
                "cds.clinical_review",
            ),
            (
                "cds.clinical_review.query_rejected",
                "POST",
                "/v1/cds/clinical-review",
                "cds.clinical_review",
            ),
            (
                "auth.revoke_key.grpc_rejected",
                "DELETE",
                "/v1/keys/{key_id}",
                "auth.revoke_key",
            ),
        ],
    )
    def test_route_gives_endpoint(self, route, method, endpoint, action):
        row = audit_row(log_line(route=route, method=method))

        assert endpoint == row.endpoint
        assert action == row.action

    @pytest.mark.parametrize(
        "route", ["-", "api_description", "options", "grpc/arxio.cds.v1"]
    )
    def test_route_without_rpc_unrouted(self, route):
        row = audit_row(log_line(route=route))

        assert UNROUTED_ENDPOINT == row.endpoint
        assert "edge.unrouted" == row.action

    def test_action_from_auth_decision_kept(self):
        """The auth decision's action wins over the route's."""
        row = audit_row(log_line(route="-", action="cds.clinical_review"))

        assert "cds.clinical_review" == row.action
        assert UNROUTED_ENDPOINT == row.endpoint

    def test_every_route_name_resolves(self):
        """Each RPC's REST and gRPC route names find that RPC."""
        for method in methods.public_methods():
            names = [methods.grpc_route_name(method)]
            if method.http is not None:
                names.append(method.action)
            for name in names:
                found, _ = methods.find_route(name)
                assert method == found, name


class TestPathLines:
    """Lines of an edge that logged the path, before route names."""

    def test_path_gives_template(self):
        line = log_line(method="DELETE", path="/v1/keys/zzclientsegment")
        del line["route"]

        row = audit_row(line)

        assert "/v1/keys/{key_id}" == row.endpoint
        assert "zzclientsegment" not in repr(row)

    def test_unknown_path_unrouted(self):
        line = log_line(method="GET", path="/v1/zzclientpath?q=zzvalue")
        del line["route"]

        row = audit_row(line)

        assert UNROUTED_ENDPOINT == row.endpoint
        assert "zzclient" not in repr(row)
        assert "zzvalue" not in repr(row)


EDGE_ID = "0b7c6a52-9a7e-4c1e-9a51-3f1f3c2f5b0e"
MAPPER_ID = "5d0e8c1f-2b9a-4c7e-8f31-6a4b2c9d0e17"


class TestRequestIds:
    def test_edge_id_kept(self):
        row = audit_row(log_line(request_id=EDGE_ID, reply_request_id=EDGE_ID))

        assert EDGE_ID == row.request_id

    def test_early_rejection_gets_reply_id(self):
        """A request rejected before the edge made an id (no Host header)
        is stored under the fresh id its reply carried."""
        row = audit_row(log_line(request_id=None, reply_request_id=MAPPER_ID))

        assert MAPPER_ID == row.request_id

    def test_no_id_at_all_unassigned(self):
        row = audit_row(log_line(request_id=None, reply_request_id=None))

        assert row.request_id.startswith(UNASSIGNED_REQUEST_ID_PREFIX)
        assert EDGE_REQUEST_ID.fullmatch(
            row.request_id.removeprefix(UNASSIGNED_REQUEST_ID_PREFIX)
        )

    @pytest.mark.parametrize(
        "client_id", ["chosen-by-client", "x" * 20000, EDGE_ID.upper()]
    )
    def test_client_id_replaced(self, client_id):
        """An id that is not of the edge's form keeps nothing of it: such
        as a client's in a line of an edge that logged the client's id."""
        line = log_line(request_id=client_id)
        del line["reply_request_id"]

        row = audit_row(line)

        assert row.request_id.startswith(REPLACED_REQUEST_ID_PREFIX)
        assert client_id.lower() not in row.request_id
        assert len(row.request_id) < 64

    def test_client_id_in_reply_replaced(self):
        row = audit_row(log_line(request_id=None, reply_request_id="chosen"))

        assert row.request_id.startswith(REPLACED_REQUEST_ID_PREFIX)

    def test_replaced_ids_distinct(self):
        """Lines with one client id get one entry id each."""
        line = log_line(request_id="chosen", reply_request_id="chosen")

        ids = {audit_row(line).request_id for _ in range(200)}

        assert 200 == len(ids)


class TestGrpcStatus:
    @pytest.mark.parametrize(
        ("fields", "expected"),
        [
            # The service's NOT_FOUND, which the REST routes strip from
            # the response; Envoy's own number is 12 for any 404.
            (
                {"status": "404", "grpc_status": "12"}
                | {"service_grpc_status": "5"},
                5,
            ),
            ({"status": "200", "grpc_status": "0"}, 0),
            # The auth decision's denials.
            ({"status": "401", "auth_grpc_status": "16"}, 16),
            ({"status": "429", "auth_grpc_status": "8"}, 8),
            # The edge's own replies, as the local reply mappers code them.
            ({"status": "404", "grpc_status": "12", "route": "-"}, 5),
            ({"status": "400"}, 3),
            ({"status": "431"}, 3),
            ({"status": "503", "grpc_status": "14"}, 14),
            ({"status": "418"}, 2),
            # No response: the client left.
            ({"status": "0"}, None),
        ],
    )
    def test_rest_code_is_json_errors(self, fields, expected):
        line = log_line(service_grpc_status=None, auth_grpc_status=None)

        row = audit_row(line | fields)

        assert expected == row.grpc_status

    def test_older_edge_rest_code_unknown(self):
        """An edge that did not log the service's code left Envoy's number
        only, derived from the HTTP status."""
        row = audit_row(log_line(status="404", grpc_status="12"))

        assert row.grpc_status is None
        assert 404 == row.status_code

    def test_grpc_caller_code_from_grpc_status(self):
        line = log_line(
            content_type="application/grpc",
            status="200",
            grpc_status="5",
            service_grpc_status="5",
        )

        row = audit_row(line)

        assert 5 == row.grpc_status
        assert 404 == row.status_code


class TestMethodAndContentType:
    """The edge's recorded values win. A request that Envoy rejected before
    its filter chain ran has only its own :method and Content-Type."""

    @pytest.mark.parametrize(
        ("fields", "method", "grpc_status", "status_code"),
        [
            # A transcoded request's own :method and Content-Type are POST
            # and application/grpc. The recorded ones are what the client
            # sent.
            (
                {"method": "GET", "content_type": None}
                | {"request_method": "POST"}
                | {"request_content_type": "application/grpc"}
                | {"status": "404", "service_grpc_status": "5"},
                "GET",
                5,
                404,
            ),
            # No recorded values, as on the 400 of a missing Host header.
            (
                {"request_method": "OPTIONS"}
                | {"request_content_type": "text/plain", "status": "404"},
                "OPTIONS",
                5,
                404,
            ),
            # A gRPC request rejected that early is read as gRPC.
            (
                {"request_method": "POST"}
                | {"request_content_type": "application/grpc"}
                | {"status": "200", "grpc_status": "14"},
                "POST",
                14,
                503,
            ),
            # Envoy's HTTP/1 codec passes no header of a request it
            # rejects.
            ({"status": "431", "grpc_status": "2"}, "", 3, 431),
        ],
    )
    def test_values_by_stage(self, fields, method, grpc_status, status_code):
        line = log_line(
            method=None,
            content_type=None,
            request_method=None,
            request_content_type=None,
            route=None,
            grpc_status="12",
            service_grpc_status=None,
        )

        row = audit_row(line | fields)

        assert method == row.method
        assert grpc_status == row.grpc_status
        assert status_code == row.status_code

    def test_older_edge_line_keeps_method(self):
        """A line without request_method is read as it was written."""
        line = log_line(method="DELETE", content_type="application/grpc")

        row = audit_row(line)

        assert "DELETE" == row.method
        assert 0 == row.grpc_status


def test_unreadable_line_row():
    moment = datetime.datetime(2026, 12, 4, 9, tzinfo=datetime.UTC)

    row = unreadable_line_row(moment)

    assert UNREADABLE_ACTION == row.action
    assert UNROUTED_ENDPOINT == row.endpoint
    assert moment == row.time
    assert row.request_id.startswith(UNASSIGNED_REQUEST_ID_PREFIX)
