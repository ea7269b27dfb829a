"""Start the real model runtime, once per test session.

Test modules load this file with ``pytest_plugins``, so that tests under
tests/model_runtime and tests/cds share one runtime process.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.model_runtime.assemble import ensure_model

REPO_ROOT = Path(__file__).resolve().parents[2]
# The folder `make model` assembles the model into.
MODEL_DIR = REPO_ROOT / ".run" / "models"
MODEL_NAME = "gemma3:270m"
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class RunningRuntime:
    """A model runtime process started for tests."""

    process: subprocess.Popen
    # Base URL for ollama.Client(host=...), for example http://127.0.0.1:5123.
    host: str
    model: str
    # The process's stderr, where its JSON log lines go.
    log_path: Path

    def stop(self, timeout: float = 15.0) -> int:
        """Send SIGTERM, wait for the exit and return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

        return self.process.returncode

    def wait_for_exit(self, timeout: float = 15.0) -> int:
        """Wait for an exit already under way and return the exit code.

        A second SIGTERM during the exit would find Python's default
        handler back in place and kill the process, so none is sent.
        """
        return self.process.wait(timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_entries(self) -> list[dict[str, Any]]:
        """Parse the JSON log lines.

        Lines llama.cpp prints itself and a line still being written are
        skipped.
        """
        entries = []
        for line in self.log_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)

        return entries


def start_runtime(
    log_path: Path, extra_env: dict[str, str] | None = None
) -> RunningRuntime:
    """Start ``python -m services.model_runtime`` on a free port."""
    environment = os.environ | {
        "ARXIO_MODEL_PATH": str(ensure_model(MODEL_DIR)),
        "ARXIO_MODEL_NAME": MODEL_NAME,
        "ARXIO_HOST": "127.0.0.1",
        # Port 0 lets the OS pick; the runtime logs the port it got.
        "ARXIO_PORT": "0",
        **(extra_env or {}),
    }
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.model_runtime"],
            cwd=REPO_ROOT,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    runtime = RunningRuntime(process, "", MODEL_NAME, log_path)
    try:
        port = _wait_for_port(runtime)
        runtime = RunningRuntime(
            process, f"http://127.0.0.1:{port}", MODEL_NAME, log_path
        )
        _wait_for_version(runtime)
    except BaseException:
        runtime.stop()
        raise

    return runtime


def _check_running(runtime: RunningRuntime) -> None:
    if runtime.process.poll() is not None:
        tail = "\n".join(runtime.log_text().splitlines()[-20:])
        pytest.fail(
            f"model runtime exited with code {runtime.process.returncode}:"
            f"\n{tail}"
        )


def _wait_for_port(runtime: RunningRuntime) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        _check_running(runtime)
        for entry in runtime.log_entries():
            if entry.get("event") == "model runtime listening":
                return int(entry["port"])
        time.sleep(0.1)
    pytest.fail(f"model runtime did not listen within {START_TIMEOUT:g} s")


def _wait_for_version(runtime: RunningRuntime) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        _check_running(runtime)
        try:
            response = httpx.get(f"{runtime.host}/api/version", timeout=2)
            if response.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"/api/version did not answer within {START_TIMEOUT:g} s")


@pytest.fixture(scope="session")
def model_runtime(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningRuntime]:
    """Run the model runtime on 127.0.0.1 for the whole session."""
    log_path = tmp_path_factory.mktemp("model-runtime") / "stderr.log"
    runtime = start_runtime(log_path)
    yield runtime
    runtime.stop()


@pytest.fixture
def runtime_starter(
    tmp_path: Path,
) -> Iterator[Callable[[dict[str, str]], RunningRuntime]]:
    """Return a function that starts a private runtime for one test."""
    started: list[RunningRuntime] = []

    def start(extra_env: dict[str, str]) -> RunningRuntime:
        log_path = tmp_path / f"runtime-{len(started)}.log"
        started.append(start_runtime(log_path, extra_env))

        return started[-1]

    yield start
    for runtime in started:
        runtime.stop()
