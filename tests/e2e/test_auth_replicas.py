"""Two auth replicas behind the edge: revocation and quotas stay exact.

Each replica caches credentials for a second at most and drops its cache
when PostgreSQL notifies a change to keys or organizations, so a
revocation is in force on every replica as its transaction commits; the
count of one organization is one row that replicas increment atomically.
"""

import concurrent.futures

import psycopg
import pytest

from tests.edge import EdgeClient
from tests.suite import Organization, own_stack, run_cli

pytestmark = pytest.mark.e2e

REVIEW_PATH = "/v1/cds/clinical-review"
RULES_ONLY = {
    "medications": [{"name": "metformin"}],
    "options": {"modelReview": False},
}


@pytest.fixture(scope="module")
def replicated_stack():
    """A suite with two auth replicas and no model behind it, behind one
    trusted proxy."""
    with own_stack(replicas={"auth": 2}, trusted_hops=1) as running:
        yield running


@pytest.fixture(scope="module")
def edge(replicated_stack) -> EdgeClient:
    return EdgeClient(
        replicated_stack.edge_port,
        replicated_stack.certs_dir / "ca.crt",
    )


def decisions_by_replica(stack) -> dict[str, int]:
    return {
        name: (stack.run_dir / "logs" / f"{name}.log")
        .read_text()
        .count("/envoy.service.auth.v3.Authorization/Check")
        for name in ("auth", "auth-2")
    }


class TestRevocation:
    def test_revoked_key_fails_on_every_replica(self, replicated_stack, edge):
        logs = replicated_stack.run_dir / "logs"
        # Both replicas cache credentials, so the notification is what
        # makes the revocation take effect at once on each of them.
        for name in ("auth", "auth-2"):
            assert "auth.cache_listening" in (logs / f"{name}.log").read_text()
        org = Organization(replicated_stack)
        admin = {"x-api-key": org.api_key}
        created = edge.request(
            "POST", "/v1/keys", {"name": "to revoke"}, admin
        ).json()
        key = {"x-api-key": created["apiKey"]}
        before = decisions_by_replica(replicated_stack)
        for _ in range(6):
            assert (
                200
                == edge.request("POST", REVIEW_PATH, RULES_ONLY, key).status
            )
        after = decisions_by_replica(replicated_stack)
        assert all(after[name] > before[name] for name in after), after

        revoked = edge.request(
            "DELETE", f"/v1/keys/{created['key']['keyId']}", None, admin
        )
        statuses = [
            edge.request("POST", REVIEW_PATH, RULES_ONLY, key).status
            for _ in range(10)
        ]

        assert 200 == revoked.status, revoked.body
        assert "REVOKED" == revoked.json()["state"]
        assert [401] * 10 == statuses

    def test_rotation_with_zero_grace(self, replicated_stack, edge):
        """The new key works at once and the old one stops at once."""
        org = Organization(replicated_stack)
        old = {"x-api-key": org.api_key}

        rotated = edge.request(
            "POST",
            f"/v1/keys/{org.key_id}:rotate",
            {"gracePeriod": "0s"},
            old,
        )
        new = {"x-api-key": rotated.json()["apiKey"]}

        assert 200 == rotated.status, rotated.body
        assert [401] * 4 == [
            edge.request("POST", REVIEW_PATH, RULES_ONLY, old).status
            for _ in range(4)
        ]
        assert [200] * 4 == [
            edge.request("POST", REVIEW_PATH, RULES_ONLY, new).status
            for _ in range(4)
        ]


class TestQuotaRace:
    def test_exactly_the_limit_passes(self, replicated_stack, edge):
        """250 concurrent requests of a Free organization: 100 pass."""
        org = Organization(replicated_stack)
        key = {"x-api-key": org.api_key}

        def send(_):
            return edge.request("POST", REVIEW_PATH, RULES_ONLY, key)

        with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
            responses = list(pool.map(send, range(250)))

        statuses = [response.status for response in responses]
        passed = [r for r in responses if r.status == 200]
        remaining = sorted(
            int(r.headers["x-ratelimit-remaining"]) for r in passed
        )
        with psycopg.connect(replicated_stack.admin_database_url) as db:
            [stored] = db.execute(
                "SELECT request_count FROM auth.daily_usage WHERE org_id = %s",
                (org.org_id,),
            ).fetchone()
        assert 100 == statuses.count(200)
        assert 150 == statuses.count(429)
        assert list(range(100)) == remaining
        assert 100 == stored
        assert all(
            int(r.headers["retry-after"]) > 0
            for r in responses
            if r.status == 429
        )


class TestTrustedProxy:
    """With one trusted hop, the client is the last X-Forwarded-For entry."""

    def _allowlisted(self, stack) -> str:
        org = Organization(stack, "enterprise")
        run_cli(
            stack,
            "orgs",
            "set-allowlist",
            "--org",
            org.org_id,
            "--cidr",
            "203.0.113.0/24",
        )

        return org.api_key

    @pytest.mark.parametrize(
        ("forwarded", "status"),
        [
            ("203.0.113.9", 200),
            ("10.9.9.9, 203.0.113.9", 200),
            ("203.0.113.9, 10.9.9.9", 403),
            (None, 403),
        ],
    )
    def test_allowlist_uses_forwarded_client(
        self, replicated_stack, edge, forwarded, status
    ):
        headers = {"x-api-key": self._allowlisted(replicated_stack)}
        if forwarded is not None:
            headers["x-forwarded-for"] = forwarded

        response = edge.request("POST", REVIEW_PATH, RULES_ONLY, headers)

        assert status == response.status, response.body
