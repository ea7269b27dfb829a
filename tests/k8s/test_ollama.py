"""Ollama's TLS proxy config and the job that pulls and loads the model."""

import http.server
import importlib.util
import json
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from services.common.certs import ensure_certificates
from tests.k8s.manifests import K8S, find, pod_spec, rendered

ENVOY = Path(sys.executable).with_name("envoy")
CONFIG = K8S / "base" / "config"


def load_pull_model():
    spec = importlib.util.spec_from_file_location(
        "pull_model", CONFIG / "pull_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    return module


pull_model = load_pull_model()


class FakeOllama(http.server.BaseHTTPRequestHandler):
    """Ollama's pull and generate endpoints, recording each request."""

    requests: list = []
    pull_status = "success"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append((self.path, body))
        if self.path == "/api/pull":
            reply = {"status": self.pull_status}
        else:
            reply = {
                "model": body["model"],
                "done": True,
                "done_reason": "load",
            }
        payload = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def certs(tmp_path):
    return ensure_certificates(tmp_path / "certs")


@pytest.fixture
def ollama_server(certs):
    """Serve FakeOllama over TLS with the ollama certificate on loopback."""
    FakeOllama.requests = []
    FakeOllama.pull_status = "success"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeOllama)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "ollama.crt", certs / "ollama.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def job_environment(server, certs) -> dict[str, str]:
    return {
        "ARXIO_MODEL": "gemma3:270m",
        # The ollama certificate names localhost among its hosts.
        "OLLAMA_POD_HOST": "localhost",
        "OLLAMA_POD_PORT": str(server.server_address[1]),
        "OLLAMA_REPLICAS": "1",
        "OLLAMA_CA_FILE": str(certs / "ca.crt"),
    }


class TestPullJob:
    def test_pulls_then_loads(self, ollama_server, certs):
        """The job pulls the model, then loads it with keep_alive -1."""
        code = pull_model.run(job_environment(ollama_server, certs))

        assert 0 == code
        assert [
            ("/api/pull", {"model": "gemma3:270m", "stream": False}),
            (
                "/api/generate",
                {"model": "gemma3:270m", "keep_alive": -1, "stream": False},
            ),
        ] == FakeOllama.requests

    def test_failed_pull_exits_1(self, ollama_server, certs):
        """A pull that does not end in success fails the job."""
        FakeOllama.pull_status = "error: manifest not found"

        code = pull_model.run(job_environment(ollama_server, certs))

        assert 1 == code
        assert ["/api/pull"] == [path for path, _ in FakeOllama.requests]

    def test_untrusted_certificate_fails(self, ollama_server, tmp_path):
        """The job rejects a proxy whose certificate another CA signed."""
        other_ca = ensure_certificates(tmp_path / "other") / "ca.crt"
        environment = job_environment(ollama_server, tmp_path)
        environment["OLLAMA_CA_FILE"] = str(other_ca)

        assert 1 == pull_model.run(environment)
        assert [] == FakeOllama.requests

    def test_missing_model_rejected(self):
        """Without ARXIO_MODEL the settings are invalid."""
        with pytest.raises(pull_model.SettingsError, match="ARXIO_MODEL"):
            pull_model.run({})

    def test_pods_found_by_name(self):
        """Without OLLAMA_REPLICAS, pods count up until a name fails."""
        known = {
            "ollama-0.ollama-pods.arxio.svc",
            "ollama-1.ollama-pods.arxio.svc",
        }

        hosts = pull_model.pod_hosts(
            pull_model.DEFAULT_HOST, "arxio", None, resolves=known.__contains__
        )

        assert sorted(known) == hosts

    def test_pattern_without_index_rejected(self):
        """A host pattern without {index} needs OLLAMA_REPLICAS."""
        with pytest.raises(pull_model.SettingsError, match="index"):
            pull_model.pod_hosts("ollama", "arxio", None)

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
