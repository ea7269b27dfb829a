"""`python -m services.billing.report_usage`, the usage-report CronJob's
command: real PostgreSQL, a local Stripe, and the auth service's
AccountService served over mutual TLS by a stand-in on loopback."""

import asyncio
import datetime
import os
import subprocess
import sys
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from arxio.auth.v1 import organization_pb2
from arxio.internal.v1 import accounts_pb2, accounts_pb2_grpc

from services.billing import webhooks
from services.billing.accounts import Plan
from services.billing.events import EventProcessor
from services.billing.usage_reports import meter_identifier
from services.common.certs import ensure_certificates
from services.common.config import ServerConfig, TlsConfig
from services.common.server import server_credentials
from services.launcher.processes import free_port
from tests.billing.conftest import FakeAccounts, open_store
from tests.billing.fake_stripe import API_KEY

METER_PATH = "/v1/billing/meter_events"
RETURN_URL = "https://api.hospital.org/billing"
TODAY = datetime.datetime.now(datetime.UTC).date()
# Days old enough to be final whatever the time of the run.
USAGE = {
    TODAY - datetime.timedelta(days=4): 7,
    TODAY - datetime.timedelta(days=3): 2,
}


class AccountServicer(accounts_pb2_grpc.AccountServiceServicer):
    """The auth service's AccountService over the data of FakeAccounts."""

    def __init__(self, accounts: FakeAccounts) -> None:
        self._accounts = accounts

    def GetOrganization(self, request, context):
        # Other tests' organizations share the session's database: here
        # they are on the free plan, for which nothing is metered.
        return self._accounts.organizations.get(
            request.org_id,
            organization_pb2.Organization(
                org_id=request.org_id, plan=Plan.FREE
            ),
        )

    def ListDailyUsage(self, request, context):
        first = datetime.date.fromisoformat(request.start_date)
        last = datetime.date.fromisoformat(request.end_date)
        days = [
            accounts_pb2.DailyRequestCount(
                date=day.isoformat(), request_count=count
            )
            for (owner, day), count in sorted(self._accounts.usage.items())
            if owner == request.org_id and first <= day <= last
        ]

        return accounts_pb2.ListDailyUsageResponse(days=days)


@pytest.fixture
def certs(tmp_path) -> Path:
    return ensure_certificates(tmp_path / "certs")


@pytest.fixture
def pro_organization(billing_database_url) -> tuple[FakeAccounts, str]:
    """An organization on Pro since ten days, with usage on two days."""
    accounts = FakeAccounts()
    org_id = accounts.add()
    event = webhooks.StripeEvent(
        event_id=f"evt_{uuid.uuid4().hex}",
        event_type="customer.subscription.created",
        time=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10),
        data={
            "id": f"sub_{uuid.uuid4().hex}",
            "customer": f"cus_{uuid.uuid4().hex}",
            "status": "active",
            "metadata": {"org_id": org_id},
        },
    )

    async def subscribe() -> None:
        async with open_store(billing_database_url[0]) as billing_store:
            await EventProcessor(billing_store, accounts).process(event)

    asyncio.run(subscribe())
    for day, count in USAGE.items():
        accounts.usage[(org_id, day)] = count

    return accounts, org_id


@pytest.fixture
def auth_address(certs, pro_organization):
    """Serve AccountService with the auth certificate; return host:port."""
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        tls=TlsConfig(
            certs / "ca.crt", certs / "auth.crt", certs / "auth.key"
        ),
        allowed_peers=frozenset({"billing"}),
        shutdown_grace=0,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    accounts_pb2_grpc.add_AccountServiceServicer_to_server(
        AccountServicer(pro_organization[0]), server
    )
    port = server.add_secure_port("127.0.0.1:0", server_credentials(config))
    server.start()
    yield f"localhost:{port}"
    server.stop(0)


def report(environment: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.billing.report_usage"],
        env={
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("STRIPE_", "ARXIO_", "DATABASE_URL"))
        }
        | environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def billing_environment(certs: Path, database_url: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "ARXIO_TLS_CA": str(certs / "ca.crt"),
        "ARXIO_TLS_CERT": str(certs / "billing.crt"),
        "ARXIO_TLS_KEY": str(certs / "billing.key"),
    }


def stripe_environment(
    certs: Path, database_url: str, return_url: str = RETURN_URL
) -> dict[str, str]:
    return billing_environment(certs, database_url) | {
        "STRIPE_API_KEY": API_KEY,
        "STRIPE_PRO_PRICE_ID": "price_pro_monthly",
        "ARXIO_BILLING_RETURN_URL": return_url,
    }


def unreachable_database() -> str:
    # Nothing listens on this loopback port.
    return f"postgresql://arxio_billing@127.0.0.1:{free_port()}/arxio"


def sent(fake_stripe, org_id: str) -> list[tuple[str, str]]:
    return [
        (
            request.parameters["identifier"],
            request.parameters["payload[value]"],
        )
        for request in fake_stripe.requests_to(METER_PATH)
        if org_id in request.parameters["identifier"]
        and request.status == 200
        and not request.replayed
    ]


class TestReportCommand:
    def test_sends_each_day_once(
        self,
        certs,
        billing_database_url,
        fake_stripe,
        pro_organization,
        auth_address,
    ):
        """A run sends every final day; a second run sends nothing new."""
        _, org_id = pro_organization
        environment = stripe_environment(certs, billing_database_url[0]) | {
            "ARXIO_AUTH_ADDRESS": auth_address,
            "STRIPE_API_BASE": fake_stripe.base_url,
        }

        first = report(environment)
        second = report(environment)

        assert 0 == first.returncode, first.stderr[-2000:]
        assert 0 == second.returncode, second.stderr[-2000:]
        assert [
            (meter_identifier(org_id, day), str(count))
            for day, count in sorted(USAGE.items())
        ] == sent(fake_stripe, org_id)
        assert "usage_report.finished" in first.stderr

    def test_without_stripe_exits_0(self, certs):
        """Without a Stripe key there is nothing to send."""
        completed = report(billing_environment(certs, unreachable_database()))

        assert 0 == completed.returncode, completed.stderr[-2000:]
        assert "usage_report.skipped" in completed.stderr

    def test_unreachable_database_exits_1(self, certs):
        """A run that cannot read the database fails for the CronJob."""
        completed = report(stripe_environment(certs, unreachable_database()))

        assert 1 == completed.returncode, completed.stderr[-2000:]
        assert "usage_report.run_failed" in completed.stderr

    def test_placeholder_return_url_exits_2(self, certs):
        """The manifests' placeholder return URL fails the settings."""
        completed = report(
            stripe_environment(
                certs,
                unreachable_database(),
                "https://edge-address-not-set.invalid/",
            )
        )

        assert 2 == completed.returncode
        assert "placeholder" in completed.stderr
