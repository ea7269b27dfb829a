"""How an Ollama pod gets its model into memory and reports it ready."""

import http.server
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from tests.k8s.manifests import K8S, OVERLAYS, find, pod_spec, rendered
from tests.k8s.test_ollama import CONFIG, pull_model

# The CLI's `ollama ps` table, as Ollama 0.13 prints it.
PS_HEADER = "NAME    ID    SIZE    PROCESSOR    CONTEXT    UNTIL"
PS_ROW = "{name}    a2af6cc3eb7f    1.1 GB    100% GPU    4096    Forever"


class LocalOllama(http.server.BaseHTTPRequestHandler):
    """Ollama's /api/ps, /api/show and /api/generate, recording requests.

    `on_disk` and `in_memory` hold model names as `ollama ps` lists them.
    A generate request loads its model unless `load_error` is set.
    """

    protocol_version = "HTTP/1.1"
    requests: list = []
    on_disk: set = set()
    in_memory: set = set()
    load_error = ""

    def do_GET(self):
        self.requests.append(("GET", self.path, None))
        models = [{"name": name, "model": name} for name in self.in_memory]
        self._reply(200, {"models": models})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(("POST", self.path, body))
        name = pull_model.tagged(body["model"])
        if name not in self.on_disk:
            self._reply(404, {"error": f"model '{body['model']}' not found"})
        elif self.path == "/api/show":
            self._reply(200, {"details": {}})
        elif self.load_error:
            self._reply(500, {"error": self.load_error})
        else:
            self.in_memory.add(name)
            self._reply(200, {"model": body["model"], "done": True})

    def _reply(self, status: int, reply: dict) -> None:
        payload = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def local_ollama():
    LocalOllama.requests = []
    LocalOllama.on_disk = set()
    LocalOllama.in_memory = set()
    LocalOllama.load_error = ""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LocalOllama)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def generates() -> list:
    return [r for r in LocalOllama.requests if r[1] == "/api/generate"]


class TestLocalLoader:
    def test_loads_model_found_on_disk(self, local_ollama):
        LocalOllama.on_disk = {"gemma3:latest"}
        loader = pull_model.LocalLoader("gemma3", local_ollama)

        loader.check_once()

        [(_, _, body)] = generates()
        assert "gemma3" == body["model"]
        assert -1 == body["keep_alive"]
        assert "prompt" not in body
        assert {"gemma3:latest"} == LocalOllama.in_memory

    def test_loaded_model_left_alone(self, local_ollama):
        LocalOllama.on_disk = {"gemma3:latest"}
        LocalOllama.in_memory = {"gemma3:latest"}
        loader = pull_model.LocalLoader("gemma3", local_ollama)

        loader.check_once()

        assert [] == generates()

    def test_model_not_pulled_not_loaded(self, local_ollama):
        loader = pull_model.LocalLoader("gemma3:270m", local_ollama)

        loader.check_once()

        assert [] == generates()

    def test_failed_load_retried(self, local_ollama):
        LocalOllama.on_disk = {"gemma3:270m"}
        LocalOllama.load_error = "out of memory"
        loader = pull_model.LocalLoader("gemma3:270m", local_ollama, 8.0)
        pauses = []

        loader.run_forever(30.0, pauses.append, rounds=4)

        assert 4 == len(generates())
        assert [2.0, 4.0, 8.0, 8.0] == pauses
        assert set() == LocalOllama.in_memory

    def test_unreachable_server_retried(self):
        loader = pull_model.LocalLoader("gemma3", "http://127.0.0.1:9")
        pauses = []

        loader.run_forever(30.0, pauses.append, rounds=2)

        assert [2.0, 4.0] == pauses

    @pytest.mark.parametrize(
        ("model", "expected"),
        [
            ("gemma3", "gemma3:latest"),
            ("gemma3:270m", "gemma3:270m"),
            ("registry:5000/team/gemma3", "registry:5000/team/gemma3:latest"),
            ("registry:5000/team/gemma3:1b", "registry:5000/team/gemma3:1b"),
        ],
    )
    def test_implicit_latest_tag(self, model, expected):
        assert expected == pull_model.tagged(model)


def ollama_container(overlay: str) -> dict:
    spec = pod_spec(find(rendered(overlay), "StatefulSet", "ollama"))

    return next(c for c in spec["containers"] if c["name"] == "ollama")


def run_readiness(tmp_path: Path, model: str, listed: list[str]) -> int:
    """Run the readiness command with an `ollama` that lists `listed`."""
    table = "\n".join([PS_HEADER] + [PS_ROW.format(name=n) for n in listed])
    fake = tmp_path / "ollama"
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{table}\nEOF\n")
    fake.chmod(0o755)
    command = ollama_container("prod")["readinessProbe"]["exec"]["command"]
    environment = {
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "ARXIO_MODEL": model,
    }

    return subprocess.run(
        command, env=environment, timeout=10, check=False
    ).returncode


class TestPodManifest:
    @pytest.mark.parametrize(
        ("model", "listed", "ready"),
        [
            ("gemma3", ["gemma3:latest"], True),
            ("gemma3:latest", ["gemma3:latest"], True),
            ("gemma3:270m", ["gemma3:270m"], True),
            ("gemma3", ["gemma3:270m"], False),
            ("gemma3:270m", ["gemma3:270m-it"], False),
            ("gemma3", [], False),
        ],
    )
    def test_readiness_matches_model(self, tmp_path, model, listed, ready):
        code = run_readiness(tmp_path, model, listed)

        assert ready == (0 == code)

    @pytest.mark.parametrize("overlay", OVERLAYS)
    def test_loader_sidecar_runs_shipped_script(self, overlay):
        objects = rendered(overlay)
        spec = pod_spec(find(objects, "StatefulSet", "ollama"))
        [loader] = [
            c for c in spec["initContainers"] if c["name"] == "model-loader"
        ]
        volume = next(v for v in spec["volumes"] if v["name"] == "script")
        config_map = find(objects, "ConfigMap", volume["configMap"]["name"])

        assert "Always" == loader["restartPolicy"]
        assert "keep-loaded" == loader["command"][-1]
        assert (CONFIG / "pull_model.py").read_text() == config_map["data"][
            "pull_model.py"
        ]

    def test_no_silent_post_start_hook(self):
        lifecycle = ollama_container("prod").get("lifecycle", {})

        assert "postStart" not in lifecycle

    def test_generate_route_outlasts_load(self):
        """The proxy waits longer for a load than the pull Job does."""
        config = yaml.safe_load(
            (K8S / "base" / "config" / "ollama-proxy.yaml").read_text()
        )
        listener = config["static_resources"]["listeners"][0]
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        routes = manager["route_config"]["virtual_hosts"][0]["routes"]
        route = next(
            r["route"]
            for r in routes
            if r["match"].get("path") == "/api/generate"
        )

        assert float(route["timeout"].rstrip("s")) > pull_model.LOAD_TIMEOUT
        assert (
            float(route["idle_timeout"].rstrip("s")) > pull_model.LOAD_TIMEOUT
        )
