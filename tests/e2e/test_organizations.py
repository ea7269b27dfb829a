"""Operator administration: suspension, plans and IP allowlists."""

import grpc
import pytest
from arxio.cds.v1 import cds_pb2, cds_pb2_grpc

from tests.suite import cli_process, run_cli

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"
RULES_ONLY = {
    "medications": [{"name": "metformin"}],
    "options": {"modelReview": False},
}


def review(edge, api_key: str, headers: dict | None = None):
    return edge.request(
        "POST",
        REVIEW_PATH,
        RULES_ONLY,
        {"x-api-key": api_key} | (headers or {}),
    )


def grpc_review_code(edge, api_key: str) -> grpc.StatusCode:
    request = cds_pb2.ClinicalReviewRequest(
        medications=[cds_pb2.Medication(name="metformin")],
        options=cds_pb2.ReviewOptions(model_review=False),
    )
    with edge.channel() as channel:
        stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
        try:
            stub.ClinicalReview(
                request, metadata=[("x-api-key", api_key)], timeout=30
            )
        except grpc.RpcError as error:
            return error.code()

    return grpc.StatusCode.OK


class TestSuspension:
    def test_suspended_keys_get_403(self, stack, edge, new_org):
        """Suspension stops every key at once; reactivation restores it."""
        org = new_org()
        assert 200 == review(edge, org.api_key).status

        suspended = run_cli(stack, "orgs", "suspend", "--org", org.org_id)
        response = review(edge, org.api_key)

        assert "SUSPENDED" == suspended["state"]
        assert 403 == response.status
        assert 7 == response.json()["code"]
        assert "suspended" in response.json()["message"]
        assert grpc.StatusCode.PERMISSION_DENIED == grpc_review_code(
            edge, org.api_key
        )

        reactivated = run_cli(stack, "orgs", "reactivate", "--org", org.org_id)

        assert "ACTIVE" == reactivated["state"]
        assert 200 == review(edge, org.api_key).status

    def test_unknown_org_is_404(self, stack):
        completed = cli_process(
            stack,
            "orgs",
            "suspend",
            "--org",
            "00000000-0000-4000-8000-000000000000",
        )

        assert 1 == completed.returncode
        assert "NOT_FOUND" in completed.stderr

    def test_get_shows_the_organization(self, stack, new_org):
        org = new_org("pro")

        shown = run_cli(stack, "orgs", "get", "--org", org.org_id)

        assert org.org_id == shown["orgId"]
        assert "PRO" == shown["plan"]


class TestPlanChange:
    def test_takes_effect_on_next_request(self, stack, edge, new_org):
        """Free to Enterprise: the next response is unlimited."""
        org = new_org()
        assert "100" == review(edge, org.api_key).headers["x-ratelimit-limit"]

        changed = run_cli(
            stack,
            "orgs",
            "set-plan",
            "--org",
            org.org_id,
            "--plan",
            "enterprise",
        )
        headers = review(edge, org.api_key).headers

        assert "ENTERPRISE" == changed["plan"]
        assert "unlimited" == headers["x-ratelimit-limit"]
        assert "unlimited" == headers["x-ratelimit-remaining"]

    def test_pro_limit_applies(self, stack, edge, new_org):
        org = new_org()

        run_cli(
            stack, "orgs", "set-plan", "--org", org.org_id, "--plan", "pro"
        )

        assert (
            "10000" == review(edge, org.api_key).headers["x-ratelimit-limit"]
        )


def set_allowlist(stack, org_id: str, *cidrs: str):
    arguments = []
    for cidr in cidrs:
        arguments += ["--cidr", cidr]

    return cli_process(
        stack, "orgs", "set-allowlist", "--org", org_id, *arguments
    )


class TestIpAllowlist:
    def test_outside_the_list_gets_403(self, stack, edge, new_org):
        org = new_org("enterprise")
        completed = set_allowlist(
            stack, org.org_id, "10.0.0.0/8", "2001:db8::/32"
        )
        assert 0 == completed.returncode, completed.stderr

        response = review(edge, org.api_key)

        assert 403 == response.status
        error = response.json()
        assert 7 == error["code"]
        assert "allowlist" in error["message"]
        assert grpc.StatusCode.PERMISSION_DENIED == grpc_review_code(
            edge, org.api_key
        )

    def test_inside_the_list_passes(self, stack, edge, new_org):
        org = new_org("enterprise")
        completed = set_allowlist(stack, org.org_id, "127.0.0.0/8", "::1/128")
        assert 0 == completed.returncode, completed.stderr

        assert 200 == review(edge, org.api_key).status
        assert grpc.StatusCode.OK == grpc_review_code(edge, org.api_key)

    def test_spoofed_address_headers_ignored(self, stack, edge, new_org):
        """Neither X-Forwarded-For nor the edge's own header is trusted."""
        org = new_org("enterprise")
        set_allowlist(stack, org.org_id, "10.0.0.0/8")

        response = review(
            edge,
            org.api_key,
            {
                "x-forwarded-for": "10.1.2.3",
                "x-arxio-client-address": "10.1.2.3",
                "x-real-ip": "10.1.2.3",
            },
        )

        assert 403 == response.status

    def test_empty_list_removes_it(self, stack, edge, new_org):
        org = new_org("enterprise")
        set_allowlist(stack, org.org_id, "10.0.0.0/8")
        assert 403 == review(edge, org.api_key).status

        completed = set_allowlist(stack, org.org_id)

        assert 0 == completed.returncode, completed.stderr
        assert 200 == review(edge, org.api_key).status

    def test_other_plans_get_failed_precondition(self, stack, new_org):
        org = new_org("pro")

        completed = set_allowlist(stack, org.org_id, "10.0.0.0/8")

        assert 1 == completed.returncode
        assert "FAILED_PRECONDITION" in completed.stderr
        assert "enterprise" in completed.stderr

    def test_downgrade_needs_empty_allowlist(self, stack, edge, new_org):
        """Leaving Enterprise never drops the allowlist silently."""
        org = new_org("enterprise")
        set_allowlist(stack, org.org_id, "10.0.0.0/8")

        refused = cli_process(
            stack, "orgs", "set-plan", "--org", org.org_id, "--plan", "pro"
        )
        shown = run_cli(stack, "orgs", "get", "--org", org.org_id)

        assert 1 == refused.returncode
        assert "FAILED_PRECONDITION" in refused.stderr
        assert "set-allowlist" in refused.stderr
        assert "ENTERPRISE" == shown["plan"]
        assert ["10.0.0.0/8"] == shown["ipAllowlist"]
        assert 403 == review(edge, org.api_key).status

        cleared = set_allowlist(stack, org.org_id)
        downgraded = run_cli(
            stack, "orgs", "set-plan", "--org", org.org_id, "--plan", "pro"
        )

        assert 0 == cleared.returncode, cleared.stderr
        assert "PRO" == downgraded["plan"]
        assert 200 == review(edge, org.api_key).status

    @pytest.mark.parametrize(
        ("cidr", "expected"),
        [
            ("10.0.0.1/8", "use 10.0.0.0/8"),
            ("not-an-address", "cidrs[0]"),
            ("300.1.1.1/32", "cidrs[0]"),
            ("2001:db8::1/32", "use 2001:db8::/32"),
        ],
    )
    def test_invalid_ranges_rejected(self, stack, new_org, cidr, expected):
        org = new_org("enterprise")

        completed = set_allowlist(stack, org.org_id, cidr)

        assert 1 == completed.returncode
        assert "INVALID_ARGUMENT" in completed.stderr
        assert expected in completed.stderr

    def test_ranges_are_normalized(self, stack, new_org):
        org = new_org("enterprise")
        set_allowlist(stack, org.org_id, "203.0.113.7", "2001:DB8::/32")

        shown = run_cli(stack, "orgs", "get", "--org", org.org_id)

        assert ["2001:db8::/32", "203.0.113.7/32"] == sorted(
            shown["ipAllowlist"]
        )


class TestOperatorRest:
    def test_customer_key_cannot_suspend(self, edge, new_org):
        """Operator routes reject API keys, whatever their scopes."""
        org = new_org()

        response = edge.request(
            "POST",
            f"/v1/operator/organizations/{org.org_id}:suspend",
            {},
            {"x-api-key": org.api_key},
        )

        assert 401 == response.status

    def test_operator_token_over_rest(self, stack, edge, new_org):
        org = new_org()

        response = edge.request(
            "POST",
            f"/v1/operator/organizations/{org.org_id}:setPlan",
            {"plan": "PRO"},
            {"authorization": f"Bearer {stack.operator_token}"},
        )

        assert 200 == response.status, response.body
        assert "PRO" == response.json()["plan"]
