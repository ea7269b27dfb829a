"""Ollama's TLS proxy config and the job that pulls and loads the model."""

import http.server
import importlib.util
import json
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from services.common.certs import ensure_certificates
from services.launcher.processes import free_port
from tests.k8s.manifests import K8S, OVERLAYS, find, pod_spec, rendered

ENVOY = Path(sys.executable).with_name("envoy")
CONFIG = K8S / "base" / "config"
MODEL = "gemma3:270m"
# Seconds the tests let a pull stream stay silent before the job gives up.
READ_TIMEOUT = 0.5
ENVOY_START_TIMEOUT = 60.0


def load_pull_model():
    spec = importlib.util.spec_from_file_location(
        "pull_model", CONFIG / "pull_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    return module


pull_model = load_pull_model()


class FakeOllama(http.server.BaseHTTPRequestHandler):
    """Ollama's version, pull and generate endpoints, recording requests.

    Each pull takes the next outcome of `pull_plan`: "success", "cut"
    (the stream stops without its last chunk), "stall" (no byte for
    `stall_seconds`, then success for a client still listening) or "error"
    (Ollama's error line).
    """

    protocol_version = "HTTP/1.1"
    requests: list = []
    pull_plan: list = []
    stall_seconds = 2 * READ_TIMEOUT

    def do_GET(self):
        self.requests.append(("GET", self.path, None))
        self._reply_json({"version": "0.13.5"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(("POST", self.path, body))
        if self.path == "/api/pull":
            outcome = self.pull_plan.pop(0) if self.pull_plan else "success"
            self._stream_pull(outcome)
        else:
            self._reply_json(
                {"model": body["model"], "done": True, "done_reason": "load"}
            )

    def _reply_json(self, reply: dict) -> None:
        payload = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _chunk(self, line: dict) -> None:
        data = json.dumps(line).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _stream_pull(self, outcome: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._chunk({"status": "pulling manifest"})
        self._chunk({"status": "pulling 1234", "total": 100, "completed": 40})
        if outcome == "cut":
            self.close_connection = True
            return
        if outcome == "stall":
            time.sleep(self.stall_seconds)
        if outcome == "error":
            self._chunk({"error": "max retries exceeded: connection reset"})
        else:
            self._chunk({"status": "verifying sha256 digest"})
            self._chunk({"status": "success"})
        self.wfile.write(b"0\r\n\r\n")

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            # The job, or the proxy, gave up on a stalled stream.
            pass

    def log_message(self, *args):
        pass


def pulls() -> list:
    return [r for r in FakeOllama.requests if r[1] == "/api/pull"]


@pytest.fixture
def certs(tmp_path):
    return ensure_certificates(tmp_path / "certs")


def serve(context: ssl.SSLContext | None):
    FakeOllama.requests = []
    FakeOllama.pull_plan = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeOllama)
    server.daemon_threads = True
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    return server


@pytest.fixture
def ollama_server(certs):
    """Serve FakeOllama over TLS with the ollama certificate on loopback."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "ollama.crt", certs / "ollama.key")
    server = serve(context)
    yield server
    server.shutdown()
    server.server_close()


def job_environment(port: int, certs: Path) -> dict[str, str]:
    return {
        "ARXIO_MODEL": MODEL,
        # The ollama certificate names localhost among its hosts.
        "OLLAMA_POD_HOST": "localhost",
        "OLLAMA_POD_PORT": str(port),
        "OLLAMA_REPLICAS": "1",
        "OLLAMA_CA_FILE": str(certs / "ca.crt"),
        "OLLAMA_PULL_ATTEMPTS": "3",
        "OLLAMA_PULL_READ_TIMEOUT_SECONDS": str(READ_TIMEOUT),
        "OLLAMA_WAIT_SECONDS": "5",
    }


class FakeTime:
    """A clock that only the recorded pauses move."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


class TestPullJob:
    def test_streams_pull_then_loads(self, ollama_server, certs):
        """The job checks the pod, streams the pull, then loads the model."""
        port = ollama_server.server_address[1]

        code = pull_model.run(job_environment(port, certs))

        assert 0 == code
        assert [
            ("GET", "/api/version", None),
            ("POST", "/api/pull", {"model": MODEL, "stream": True}),
            (
                "POST",
                "/api/generate",
                {"model": MODEL, "keep_alive": -1, "stream": False},
            ),
        ] == FakeOllama.requests

    @pytest.mark.parametrize("outcome", ["cut", "stall", "error"])
    def test_failed_attempt_retried(self, ollama_server, certs, outcome):
        """A cut, silent or failed pull is pulled again after a pause."""
        FakeOllama.pull_plan = [outcome, "success"]
        time_source = FakeTime()
        port = ollama_server.server_address[1]

        code = pull_model.run(
            job_environment(port, certs), sleep=time_source.sleep
        )

        assert 0 == code
        assert 2 == len(pulls())
        assert [pull_model.FIRST_PAUSE] == time_source.pauses
        assert "/api/generate" == FakeOllama.requests[-1][1]

    def test_attempts_exhausted_exit_1(self, ollama_server, certs):
        """Each failed attempt doubles the pause; the last one fails."""
        FakeOllama.pull_plan = ["error"] * 3
        time_source = FakeTime()
        port = ollama_server.server_address[1]

        code = pull_model.run(
            job_environment(port, certs), sleep=time_source.sleep
        )

        assert 1 == code
        assert 3 == len(pulls())
        assert [2.0, 4.0] == time_source.pauses
        assert "/api/generate" not in [r[1] for r in FakeOllama.requests]

    def test_untrusted_certificate_fails(self, ollama_server, tmp_path):
        """A proxy whose certificate another CA signed fails at once."""
        other = ensure_certificates(tmp_path / "other")
        port = ollama_server.server_address[1]
        time_source = FakeTime()

        code = pull_model.run(
            job_environment(port, other), sleep=time_source.sleep
        )

        assert 1 == code
        assert [] == FakeOllama.requests
        assert [] == time_source.pauses

    def test_missing_model_rejected(self):
        """Without ARXIO_MODEL the settings are invalid."""
        with pytest.raises(pull_model.SettingsError, match="ARXIO_MODEL"):
            pull_model.run({"OLLAMA_REPLICAS": "1"})

    def test_missing_replicas_rejected(self):
        """The job must know how many pods to wait for."""
        with pytest.raises(pull_model.SettingsError, match="OLLAMA_REPLICAS"):
            pull_model.run({"ARXIO_MODEL": MODEL})

    def test_one_host_per_replica(self):
        """Each replica is called by its StatefulSet name, in order."""
        hosts = pull_model.pod_hosts(pull_model.DEFAULT_HOST, "arxio", 3)

        assert [
            "ollama-0.ollama-pods.arxio.svc",
            "ollama-1.ollama-pods.arxio.svc",
            "ollama-2.ollama-pods.arxio.svc",
        ] == hosts

    def test_pattern_without_index_rejected(self):
        """Several replicas need {index} in the host pattern."""
        with pytest.raises(pull_model.SettingsError, match="index"):
            pull_model.pod_hosts("ollama", "arxio", 2)


class TestWaitForReplicas:
    def settings(self, port: int, certs: Path, hosts: tuple[str, ...]):
        environment = job_environment(port, certs)

        return pull_model.Settings(
            model=MODEL,
            hosts=hosts,
            port=str(port),
            ca_file=environment["OLLAMA_CA_FILE"],
            wait_seconds=30.0,
            attempts=3,
            read_timeout=READ_TIMEOUT,
            retry_max_seconds=8.0,
        )

    def test_waits_for_pod_without_address(self, ollama_server, certs):
        """A pod whose name resolves only later is waited for, not skipped."""
        checks = []

        def resolves(host: str) -> bool:
            checks.append(host)
            return len(checks) > 3

        time_source = FakeTime()
        port = ollama_server.server_address[1]
        settings = self.settings(port, certs, ("localhost",))

        code = pull_model.run_pods(
            settings, time_source.sleep, time_source.clock, resolves
        )

        assert 0 == code
        assert [2.0, 4.0, 8.0] == time_source.pauses
        assert 1 == len(pulls())

    def test_pod_never_up_fails_others_pulled(self, ollama_server, certs):
        """A pod that never gets an address fails the job after the wait;
        the other pods still get the model."""
        time_source = FakeTime()
        port = ollama_server.server_address[1]
        settings = self.settings(port, certs, ("localhost", "ollama-1"))

        code = pull_model.run_pods(
            settings,
            time_source.sleep,
            time_source.clock,
            lambda host: host == "localhost",
        )

        assert 1 == code
        assert 1 == len(pulls())
        assert time_source.now >= settings.wait_seconds


class TestManifests:
    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_job_waits_for_every_replica(self, overlay):
        """OLLAMA_REPLICAS of the pull Job is the StatefulSet's count."""
        objects = rendered(overlay)
        statefulset = find(objects, "StatefulSet", "ollama")
        job = pod_spec(find(objects, "Job", "ollama-pull"))
        environment = {
            entry["name"]: entry.get("value")
            for entry in job["containers"][0]["env"]
        }

        assert (
            str(statefulset["spec"]["replicas"])
            == environment["OLLAMA_REPLICAS"]
        )

    def test_job_retries_bounded(self):
        """The Job itself retries a bounded number of times."""
        job = find(rendered("prod"), "Job", "ollama-pull")

        assert 0 < job["spec"]["backoffLimit"] <= 5
        assert "OnFailure" == pod_spec(job)["restartPolicy"]

    def test_runtime_malloc_arenas_capped(self):
        """The model runtime runs with two glibc malloc arenas."""
        ollama = pod_spec(find(rendered("prod"), "StatefulSet", "ollama"))
        container = next(
            c for c in ollama["containers"] if c["name"] == "ollama"
        )
        environment = {
            entry["name"]: entry.get("value") for entry in container["env"]
        }

        assert "2" == environment["MALLOC_ARENA_MAX"]

    def test_pull_route_outlasts_job_timeout(self):
        """The proxy lets a pull stay silent longer than the job does."""
        config = yaml.safe_load((CONFIG / "ollama-proxy.yaml").read_text())
        listener = config["static_resources"]["listeners"][0]
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        routes = manager["route_config"]["virtual_hosts"][0]["routes"]
        pull = next(r for r in routes if r["match"].get("path") == "/api/pull")
        idle = float(pull["route"]["idle_timeout"].rstrip("s"))
        default = pull_model.settings_from(
            {"ARXIO_MODEL": MODEL, "OLLAMA_REPLICAS": "1"}
        )

        assert "0s" == pull["route"]["timeout"]
        assert idle > default.read_timeout

    def test_job_runs_shipped_script(self):
        """The Job runs the script that the ConfigMap generator ships."""
        objects = rendered("prod")
        job = pod_spec(find(objects, "Job", "ollama-pull"))
        volume = next(v for v in job["volumes"] if v["name"] == "script")
        config_map = find(objects, "ConfigMap", volume["configMap"]["name"])

        assert (CONFIG / "pull_model.py").read_text() == config_map["data"][
            "pull_model.py"
        ]
        assert job["containers"][0]["command"][-1].endswith("/pull_model.py")


def proxy_config(certs: Path, upstream_port: int, idle_timeout: str) -> dict:
    """Return the proxy config on free ports, with `idle_timeout` on pull."""
    text = (CONFIG / "ollama-proxy.yaml").read_text()
    text = text.replace("/etc/arxio/tls/tls.crt", str(certs / "ollama.crt"))
    text = text.replace("/etc/arxio/tls/tls.key", str(certs / "ollama.key"))
    config = yaml.safe_load(text)
    resources = config["static_resources"]
    for listener in resources["listeners"]:
        address = listener["address"]["socket_address"]
        address["address"] = "127.0.0.1"
        address["port_value"] = free_port()
    tls_listener = resources["listeners"][0]
    manager = tls_listener["filter_chains"][0]["filters"][0]["typed_config"]
    for route in manager["route_config"]["virtual_hosts"][0]["routes"]:
        if route["match"].get("path") == "/api/pull":
            route["route"]["idle_timeout"] = idle_timeout
    endpoint = resources["clusters"][0]["load_assignment"]["endpoints"][0]
    socket_address = endpoint["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]
    socket_address["port_value"] = upstream_port

    return config


@pytest.fixture
def plain_ollama():
    server = serve(None)
    yield server
    server.shutdown()
    server.server_close()


def wait_until_ready(process: subprocess.Popen, probe_port: int, log: Path):
    """Wait for Envoy's /ready; raise with its log if it never comes."""
    deadline = time.monotonic() + ENVOY_START_TIMEOUT
    while True:
        try:
            urllib.request.urlopen(
                f"http://127.0.0.1:{probe_port}/ready", timeout=1
            ).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(
                    f"the proxy did not start: {log.read_text()[-2000:]}"
                ) from None
            time.sleep(0.2)


@pytest.fixture
def proxy(certs, plain_ollama, tmp_path):
    """Run the shipped proxy config in front of a plain FakeOllama, with
    the pull route's idle timeout cut to 1 s; yield its TLS port."""
    config = proxy_config(certs, plain_ollama.server_address[1], "1s")
    path = tmp_path / "ollama-proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    listeners = config["static_resources"]["listeners"]
    tls_port = listeners[0]["address"]["socket_address"]["port_value"]
    probe_port = listeners[1]["address"]["socket_address"]["port_value"]
    log = tmp_path / "envoy.log"
    command = [
        str(ENVOY),
        "-c",
        str(path),
        "--disable-hot-restart",
        "--base-id",
        str(free_port()),
        "--log-level",
        "warning",
    ]

    with log.open("wb") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT
        )
        wait_until_ready(process, probe_port, log)
        yield tls_port
        process.terminate()
        process.wait(10)


class TestTlsProxy:
    def test_envoy_validates_proxy_config(self, certs, tmp_path):
        """`envoy --mode validate` accepts the proxy config."""
        text = (CONFIG / "ollama-proxy.yaml").read_text()
        text = text.replace(
            "/etc/arxio/tls/tls.crt", str(certs / "ollama.crt")
        )
        text = text.replace(
            "/etc/arxio/tls/tls.key", str(certs / "ollama.key")
        )
        path = tmp_path / "ollama-proxy.yaml"
        path.write_text(text)

        completed = subprocess.run(
            [str(ENVOY), "--mode", "validate", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

        assert 0 == completed.returncode, completed.stderr[-2000:]

    def test_pull_survives_proxy_idle_timeout(self, proxy, certs):
        """The proxy cuts a pull that stays silent past its idle timeout;
        the job pulls again through it and loads the model.

        The stalled stream would end in success for a client that waited
        3 s, so a second pull shows that the proxy cut it.
        """
        FakeOllama.pull_plan = ["stall", "success"]
        FakeOllama.stall_seconds = 3.0
        environment = job_environment(proxy, certs)
        # Longer than the proxy's 1 s, so the proxy is what cuts the stream.
        environment["OLLAMA_PULL_READ_TIMEOUT_SECONDS"] = "10"
        time_source = FakeTime()

        try:
            code = pull_model.run(environment, sleep=time_source.sleep)
        finally:
            FakeOllama.stall_seconds = 2 * READ_TIMEOUT

        assert 0 == code
        assert 2 == len(pulls())
        assert [pull_model.FIRST_PAUSE] == time_source.pauses
        assert "/api/generate" == FakeOllama.requests[-1][1]

    def test_cds_reaches_ollama_over_tls(self):
        """The CDS service calls the proxy's TLS port by the Service name."""
        objects = rendered("prod")
        cds = pod_spec(find(objects, "Deployment", "cds"))["containers"][0]
        environment = {
            entry["name"]: entry.get("value") for entry in cds["env"]
        }
        service = find(objects, "Service", "ollama")

        assert "https://ollama:11443" == environment["OLLAMA_HOST"]
        assert 11443 == service["spec"]["ports"][0]["port"]
