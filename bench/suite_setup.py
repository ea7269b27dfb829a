"""Start the processes that `make bench` adds beside the suite.

Three Envoys rendered from the suite's edge settings, each with an audit
ingester of its own access log, and the baseline services of
bench/stub_services.py. build_setting returns them with the suite's own
processes as the Setting that bench/scenarios.py sends requests to.
"""

import dataclasses
import json
import sys
import urllib.request
from pathlib import Path

import yaml
from arxio.cds.v1 import cds_pb2_grpc
from grpc_health.v1 import health_pb2

from bench.common import REPO_ROOT, KeptAliveClient
from bench.measure import CpuSource
from bench.scenarios import (
    REVIEW_PATH,
    Edge,
    Service,
    Setting,
    example_review,
    mutual_tls_channel,
    review_body,
)
from services.launcher.envoy_config import Upstream, render
from services.launcher.processes import (
    ChildProcess,
    base_environment,
    free_port,
    wait_until,
)
from services.launcher.stack import (
    START_TIMEOUT,
    Stack,
    envoy_command,
    health_status,
)
from tests.suite import Organization

STUB_SERVICES = REPO_ROOT / "bench" / "stub_services.py"


class BenchProcesses:
    """The Envoys, ingesters and baseline services the harness adds."""

    def __init__(self, stack: Stack, folder: Path) -> None:
        self.stack = stack
        self.folder = folder
        self.children: list[ChildProcess] = []
        self._ports: set[int] = set()

    def port(self) -> int:
        """Return a free port that no other process of the run was given."""
        stack = self.stack
        taken = {
            *self._ports,
            *stack.ports.values(),
            *stack.metrics_ports.values(),
            *(p for ports in stack.replica_ports.values() for p in ports),
        }
        while True:
            port = free_port()
            if port not in taken:
                self._ports.add(port)
                return port

    def _start(
        self, name: str, command: list[str], environment: dict[str, str]
    ) -> ChildProcess:
        child = ChildProcess(
            name, command, environment, self.folder / f"{name}.log"
        )
        child.start()
        self.children.append(child)

        return child

    def start_service(
        self, name: str, arguments: list[str], certificate: str
    ) -> Service:
        """Start a baseline service of bench/stub_services.py as
        `certificate`'s identity; return it once it is serving."""
        certs = self.stack.certs_dir
        port = self.port()
        metrics_port = self.port()
        child = self._start(
            name,
            [sys.executable, str(STUB_SERVICES), *arguments],
            base_environment()
            | {
                "ARXIO_HOST": "127.0.0.1",
                "ARXIO_PORT": str(port),
                "ARXIO_TLS_CA": str(certs / "ca.crt"),
                "ARXIO_TLS_CERT": str(certs / f"{certificate}.crt"),
                "ARXIO_TLS_KEY": str(certs / f"{certificate}.key"),
                "ARXIO_SHUTDOWN_GRACE_SECONDS": "5",
                "ARXIO_METRICS_HOST": "127.0.0.1",
                "ARXIO_METRICS_PORT": str(metrics_port),
            },
        )
        address = f"127.0.0.1:{port}"
        wait_until(
            child,
            lambda: (
                health_status(address, certs)
                == health_pb2.HealthCheckResponse.SERVING
            ),
            START_TIMEOUT,
            "serving",
        )

        return Service(name, port, metrics_port, certificate)

    def start_edge(
        self,
        name: str,
        upstreams: dict[str, tuple[Upstream, ...]],
        authorization: bool = True,
    ) -> Edge:
        """Start an Envoy rendered from the suite's settings, in front of
        `upstreams`, with an audit ingester of its own access log.

        Without `authorization` the Envoy has no ext_authz filter.
        """
        folder = self.folder / name
        folder.mkdir(parents=True)
        access_log = folder / "access.log"
        settings = dataclasses.replace(
            self.stack.edge_settings(),
            edge_port=self.port(),
            admin_port=self.port(),
            # A port of its own: Envoy binds listeners with SO_REUSEPORT,
            # so a shared one would split the scrapes between two Envoys.
            metrics_port=self.port(),
            access_log_path=access_log,
            upstreams=upstreams,
            authorization=authorization,
        )
        ingest_metrics_port = self.port()
        self._start(
            f"{name}-ingest",
            [sys.executable, "-m", "services.audit.ingest"],
            base_environment()
            | {
                "DATABASE_URL": self.stack.database_urls["audit"],
                "ARXIO_AUDIT_LOG_FILE": str(access_log),
                "ARXIO_AUDIT_SOURCE": f"bench-{name}",
                # The Envoy that the ingester asks to reopen a rotated log.
                "ARXIO_ENVOY_ADMIN_URL": (
                    f"http://127.0.0.1:{settings.admin_port}"
                ),
                "ARXIO_METRICS_HOST": "127.0.0.1",
                "ARXIO_METRICS_PORT": str(ingest_metrics_port),
            },
        )
        config = render(settings)
        # Histograms merge when the stats are read instead of every 5 s,
        # so a scrape right after a run contains all of the run's requests.
        config["stats_flush_on_admin"] = True
        config_path = folder / "envoy.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        envoy = self._start(
            name, envoy_command(config_path), base_environment()
        )
        ready = f"http://127.0.0.1:{settings.admin_port}/ready"
        wait_until(envoy, lambda: _http_ok(ready), START_TIMEOUT, "ready")

        return Edge(
            name,
            settings.edge_port,
            settings.metrics_port,
            envoy.process.pid,
            ingest_metrics_port,
        )

    def stop(self) -> None:
        # Envoys before the services behind them, as the suite stops.
        while self.children:
            self.children.pop().stop()


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as response:
        return response.status == 200


def record_review_response(certs_dir: Path, cds: Service) -> bytes:
    """Return the CDS service's serialized response to the rules-only
    example review, for the echo service to return."""
    with mutual_tls_channel(certs_dir, cds) as channel:
        stub = cds_pb2_grpc.ClinicalDecisionSupportServiceStub(channel)
        reply = stub.ClinicalReview(
            example_review(model_review=False), timeout=30
        )

    return reply.SerializeToString()


def check_same_response(setting: Setting) -> None:
    """Raise RuntimeError unless both edges return the same review.

    The two edges must differ only in the work behind them, so the echo
    baseline must return what the real service returns.
    """
    body = review_body(example_review(model_review=False))
    headers = {
        "x-api-key": setting.api_key,
        "content-type": "application/json",
    }
    replies = []
    for edge in (setting.edge_1, setting.echo_edge):
        client = KeptAliveClient(edge.port, setting.certs_dir / "ca.crt")
        status, payload = client.request("POST", REVIEW_PATH, body, headers)
        client.close()
        if status != 200:
            raise RuntimeError(
                f"POST {REVIEW_PATH} through {edge.name} returned HTTP "
                f"{status}: {payload[:300]!r}"
            )
        replies.append(json.loads(payload))
    if replies[0] != replies[1]:
        raise RuntimeError(
            "the echo edge returned another review than the full edge, "
            "so the echo baseline would not measure the same response: "
            "check the response that bench/stub_services.py returns"
        )


def build_setting(
    stack: Stack,
    processes: BenchProcesses,
    org: Organization,
    concurrency: int,
) -> Setting:
    """Start the harness's own processes; return what scenarios reach."""
    ports = stack.replica_ports
    metrics = stack.metrics_ports

    def service(child: str, name: str, index: int) -> Service:
        return Service(child, ports[name][index], metrics[child], name)

    auth, auth_2 = service("auth", "auth", 0), service("auth-2", "auth", 1)
    cds, cds_2 = service("cds", "cds", 0), service("cds-2", "cds", 1)
    response_file = processes.folder / "echo-response.pb"
    response_file.write_bytes(record_review_response(stack.certs_dir, cds))
    echo = processes.start_service(
        "echo", ["echo-review", str(response_file)], "cds"
    )
    empty_check = processes.start_service(
        "empty-check", ["empty-check"], "auth"
    )
    upstreams = stack.edge_settings().upstreams
    first_replicas = upstreams | {
        "auth": upstreams["auth"][:1],
        "cds": upstreams["cds"][:1],
    }
    edge_1 = processes.start_edge("edge-1", first_replicas)
    edge_2 = processes.start_edge("edge-2", upstreams)
    echo_edge = processes.start_edge(
        "echo-edge",
        first_replicas | {"cds": (Upstream("127.0.0.1", echo.port),)},
    )

    return Setting(
        certs_dir=stack.certs_dir,
        api_key=org.api_key,
        org_id=org.org_id,
        concurrency=concurrency,
        postgres=CpuSource("PostgreSQL", "tree", stack.database_pid()),
        admin_database_url=stack.admin_database_url,
        audit_database_url=stack.database_urls["audit"],
        edge_1=edge_1,
        edge_2=edge_2,
        echo_edge=echo_edge,
        auth=auth,
        auth_2=auth_2,
        cds=cds,
        cds_2=cds_2,
        audit=Service("audit", ports["audit"][0], metrics["audit"], "audit"),
        echo=echo,
        empty_check=empty_check,
    )
