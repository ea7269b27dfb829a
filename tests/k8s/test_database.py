"""Database connections of the rendered overlays: TLS, pools, egress."""

import copy
import os
import re
import subprocess
import sys

import pytest

from services.common import db
from services.common.config import ConfigError
from services.launcher.processes import free_port
from tests.k8s.manifests import (
    OVERLAYS,
    REPO_ROOT,
    WORKLOAD_KINDS,
    find,
    pod_labels,
    pod_spec,
    rendered,
)

CA_SECRET = "arxio-db-ca"
# Connections a process opens beside its pool, by the module it runs: the
# auth service's LISTEN connection for key revocations
# (services/auth/credential_cache.py) and its quota counter's connection
# (services/auth/quota.py).
EXTRA_CONNECTIONS = {"services.auth": 2}
# Commands that open one psycopg connection and no pool.
SINGLE_CONNECTION = {"services.common.migrations", "services.audit.retention"}
# PostgreSQL's default superuser_reserved_connections.
SUPERUSER_RESERVED = 3
# Connections left for people's sessions and CloudNativePG's own.
HEADROOM = 20
DOCS = REPO_ROOT / "docs" / "deploy.md"


def environment(container: dict) -> dict[str, str | None]:
    return {entry["name"]: entry.get("value") for entry in container["env"]}


def containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)

    return spec["containers"] + spec.get("initContainers", [])


def database_clients(objects) -> list[tuple[dict, dict]]:
    """Return (workload, container) for each container with a database."""
    found = []
    for item in objects:
        if item["kind"] not in WORKLOAD_KINDS:
            continue
        for container in containers(item):
            names = {entry["name"] for entry in container.get("env", [])}
            if "DATABASE_URL" in names:
                found.append((item, container))

    return found


def container_connections(container: dict) -> int:
    """Return the most connections one container opens."""
    values = environment(container)
    module = container["command"][2]
    if module in SINGLE_CONNECTION:
        return 1
    if values.get("ARXIO_DB_POOL_SIZE") is None:
        raise AssertionError(
            f"container {container['name']} ({module}) sets no "
            "ARXIO_DB_POOL_SIZE, so its connections are not bounded here"
        )
    size = int(values["ARXIO_DB_POOL_SIZE"])
    overflow = int(values.get("ARXIO_DB_MAX_OVERFLOW") or size)

    return size + overflow + EXTRA_CONNECTIONS.get(module, 0)


def max_pods(workload: dict, objects) -> int:
    """Return the most pods of a workload at once, rollouts included."""
    if workload["kind"] == "CronJob":
        assert "Forbid" == workload["spec"]["concurrencyPolicy"]
        return 1
    if workload["kind"] == "Job":
        return workload["spec"].get("parallelism", 1)
    name = workload["metadata"]["name"]
    autoscalers = [
        item
        for item in objects
        if item["kind"] == "HorizontalPodAutoscaler"
        and item["spec"]["scaleTargetRef"]["name"] == name
    ]
    if autoscalers:
        replicas = autoscalers[0]["spec"]["maxReplicas"]
    else:
        replicas = workload["spec"].get("replicas", 1)
    surge = (
        workload["spec"]
        .get("strategy", {})
        .get("rollingUpdate", {})
        .get("maxSurge", 0)
    )

    return replicas + surge


def connection_total(objects) -> int:
    """Sum every pod's connections at the overlay's largest scale."""
    return sum(
        container_connections(container) * max_pods(workload, objects)
        for workload, container in database_clients(objects)
    )


def max_connections(objects) -> int:
    cluster = find(objects, "Cluster", "arxio-db")

    return int(cluster["spec"]["postgresql"]["parameters"]["max_connections"])


class TestConnectionBudget:
    def test_largest_scale_fits_database(self):
        """Pools times maxReplicas, plus reserve, fit max_connections."""
        objects = rendered("cloudnativepg")

        needed = connection_total(objects) + SUPERUSER_RESERVED + HEADROOM

        assert needed <= max_connections(objects)

    def test_more_replicas_exceed_database(self):
        """The sum grows with an autoscaler's max until it no longer fits."""
        objects = copy.deepcopy(list(rendered("cloudnativepg")))
        autoscaler = find(objects, "HorizontalPodAutoscaler", "auth")
        autoscaler["spec"]["maxReplicas"] = 40

        needed = connection_total(objects) + SUPERUSER_RESERVED + HEADROOM

        assert needed > max_connections(objects)

    def test_extra_connections_match_code(self):
        """Each direct psycopg connect in a service adds one connection."""
        for module, extra in EXTRA_CONNECTIONS.items():
            folder = REPO_ROOT.joinpath(*module.split("."))
            connects = sum(
                path.read_text().count("AsyncConnection.connect(")
                for path in folder.glob("*.py")
            )

            assert extra == connects, module

    def test_documented_total_current(self):
        """docs/deploy.md names the prod overlay's connection total."""
        total = connection_total(rendered("prod"))

        assert f"{total} connections" in DOCS.read_text()

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_every_client_bounded(self, overlay):
        """Every container with a database URL has a bounded pool."""
        clients = database_clients(rendered(overlay))

        assert len(clients) >= 8
        for _, container in clients:
            assert container_connections(container) > 0


@pytest.mark.parametrize("overlay", OVERLAYS)
class TestVerifiedTls:
    def test_clients_verify_server(self, overlay):
        """Every database client defaults libpq to verify-full."""
        for workload, container in database_clients(rendered(overlay)):
            values = environment(container)
            where = f"{workload['metadata']['name']}/{container['name']}"

            assert "verify-full" == values.get("PGSSLMODE"), where

    def test_root_certificate_mounted(self, overlay):
        """PGSSLROOTCERT is the ca.crt of the mounted arxio-db-ca."""
        for workload, container in database_clients(rendered(overlay)):
            volumes = {
                volume["name"]: volume
                for volume in pod_spec(workload)["volumes"]
            }
            mounts = [
                mount["mountPath"]
                for mount in container["volumeMounts"]
                # A StatefulSet's claim templates are not pod volumes.
                if volumes.get(mount["name"], {})
                .get("secret", {})
                .get("secretName")
                == CA_SECRET
            ]
            where = f"{workload['metadata']['name']}/{container['name']}"

            assert 1 == len(mounts), where
            assert f"{mounts[0]}/ca.crt" == environment(container).get(
                "PGSSLROOTCERT"
            ), where


class TestDocumentedUrls:
    def test_urls_verify_full(self):
        """Every libpq URL in docs/deploy.md verifies the server."""
        urls = re.findall(r"postgresql://[^\s\"']+", DOCS.read_text())

        assert len(urls) >= 3
        for url in urls:
            assert "sslmode=verify-full" in url, url
            assert "sslrootcert=/etc/arxio/postgres/ca.crt" in url, url


class TestSslmodeCheck:
    REQUIRED = {"PGSSLMODE": "verify-full"}

    @pytest.mark.parametrize("mode", ["disable", "prefer", "require"])
    def test_weaker_mode_rejected(self, mode):
        url = f"postgresql://arxio_auth:s3cret@db:5432/arxio?sslmode={mode}"

        with pytest.raises(ConfigError, match=f"sslmode={mode}") as raised:
            db.check_sslmode(url, self.REQUIRED)

        assert "s3cret" not in str(raised.value)

    @pytest.mark.parametrize(
        "query", ["", "?sslmode=verify-full&sslrootcert=/ca.crt"]
    )
    def test_verify_full_or_default_accepted(self, query):
        db.check_sslmode(f"postgresql://u@db/arxio{query}", self.REQUIRED)

    def test_no_requirement_accepts_any(self):
        db.check_sslmode("postgresql://u@db/arxio?sslmode=disable", {})

    def test_engine_rejects_weaker_url(self, monkeypatch):
        """The services' engines apply the check."""
        monkeypatch.setenv("PGSSLMODE", "verify-full")

        with pytest.raises(ConfigError, match="sslmode=require"):
            db.create_engine("postgresql://u@db/arxio?sslmode=require")

    def test_migrations_command_exits_2(self):
        """The migration Job's command rejects a weaker URL before
        connecting."""
        url = (
            f"postgresql://postgres@127.0.0.1:{free_port()}/arxio"
            "?sslmode=disable"
        )
        completed = subprocess.run(
            [sys.executable, "-m", "services.common.migrations"],
            env=os.environ | {"DATABASE_URL": url, "PGSSLMODE": "verify-full"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

        assert 2 == completed.returncode
        assert "weaker than PGSSLMODE=verify-full" in completed.stderr


class TestDatabaseEgress:
    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_no_open_database_egress(self, overlay):
        """No policy allows port 5432 to every address."""
        for item in rendered(overlay):
            if item["kind"] != "NetworkPolicy":
                continue
            for rule in item["spec"].get("egress", []):
                ports = {port.get("port") for port in rule.get("ports", [])}
                if 5432 not in ports:
                    continue
                for peer in rule.get("to", []):
                    cidr = peer.get("ipBlock", {}).get("cidr", "")

                    assert not cidr.endswith("/0"), item["metadata"]["name"]

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_every_client_may_reach_database(self, overlay):
        """postgres-clients selects each workload that has a database."""
        objects = rendered(overlay)
        policy = find(objects, "NetworkPolicy", "postgres-clients")
        expression = policy["spec"]["podSelector"]["matchExpressions"][0]
        apps = {
            pod_labels(workload)["app"]
            for workload, _ in database_clients(objects)
        }

        assert "In" == expression["operator"]
        assert apps <= set(expression["values"])

    def test_database_admits_every_client(self):
        """The CloudNativePG pods admit each workload that connects."""
        objects = rendered("cloudnativepg")
        policy = find(objects, "NetworkPolicy", "arxio-db")
        selector = policy["spec"]["ingress"][0]["from"][0]["podSelector"]
        apps = {
            pod_labels(workload)["app"]
            for workload, _ in database_clients(objects)
        }

        assert apps <= set(selector["matchExpressions"][0]["values"])

    def test_base_address_is_placeholder(self):
        """Without an overlay's address, PostgreSQL egress goes nowhere."""
        policy = find(rendered("prod"), "NetworkPolicy", "postgres-clients")

        assert [{"ipBlock": {"cidr": "192.0.2.1/32"}}] == policy["spec"][
            "egress"
        ][0]["to"]
