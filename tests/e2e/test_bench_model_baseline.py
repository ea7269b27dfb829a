"""The raw model baseline of `make bench` against a real model runtime.

The baseline must run in a process of its own, with the runtime's
settings, and generate what the runtime generates for the same chat
request: otherwise the model review scenario compares unlike work.
"""

import os
import time
from pathlib import Path

import httpx
import pytest

from bench.common import process_cpu_seconds
from bench.model_scenario import (
    RawModelProcess,
    chat_request,
    check_same_settings,
    logged_settings,
    model_unavailable_reason,
)
from tests.model_runtime.fixtures import (
    MODEL_DIR,
    MODEL_NAME,
    RunningRuntime,
    start_runtime,
)

pytestmark = pytest.mark.e2e

# Set in the runtime's environment, as the launcher sets it, to show that
# the baseline inherits the runtime's variables.
MALLOC_ARENAS = "2"


@pytest.fixture(scope="module")
def runtime(tmp_path_factory) -> RunningRuntime:
    reason = model_unavailable_reason(MODEL_DIR)
    if reason is not None:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("raw-baseline")
    running = start_runtime(
        folder / "runtime.log", {"MALLOC_ARENA_MAX": MALLOC_ARENAS}
    )
    yield running
    running.stop()


def environment_of(pid: int) -> dict[str, str]:
    """Return a process's environment as it was started, from /proc."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)

    return {name.decode(): value.decode() for name, _, value in pairs}


@pytest.fixture(scope="module")
def runtime_environment(runtime) -> dict[str, str]:
    return environment_of(runtime.process.pid)


@pytest.fixture(scope="module")
def baseline(runtime_environment, tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw-baseline-log")
    raw = RawModelProcess(runtime_environment, folder / "raw-model.log")
    yield raw
    raw.stop()


@pytest.fixture(scope="module")
def request_body(runtime) -> dict:
    return chat_request(
        {"OLLAMA_HOST": runtime.host, "ARXIO_MODEL": MODEL_NAME}
    )


def test_baseline_runs_in_own_process(baseline, runtime):
    assert baseline.pid != os.getpid()
    assert baseline.pid != runtime.process.pid
    command = Path(f"/proc/{baseline.pid}/cmdline").read_bytes()
    assert b"bench.raw_model" in command.split(b"\0")


def test_baseline_settings_equal_runtime(baseline, runtime):
    runtime_settings = logged_settings(runtime.log_path)
    check_same_settings(runtime_settings, baseline.settings)
    assert baseline.settings == runtime_settings


def test_baseline_inherits_runtime_variables(baseline):
    environment = baseline.settings["environment"]
    assert environment.get("MALLOC_ARENA_MAX") == MALLOC_ARENAS


def test_settings_report_llama_parameters(baseline):
    settings = baseline.settings
    assert settings["n_threads"] >= 1
    assert settings["n_threads_batch"] >= 1
    assert settings["n_ctx"] >= 256
    assert settings["n_batch"] >= 1
    assert settings["cpu_affinity"]
    assert Path(settings["model_path"]).is_file()


def test_other_thread_count_rejected(runtime, runtime_environment, tmp_path):
    runtime_settings = logged_settings(runtime.log_path)
    threads = runtime_settings["n_threads"] + 1
    environment = runtime_environment | {"ARXIO_MODEL_THREADS": str(threads)}
    other = RawModelProcess(environment, tmp_path / "raw-model.log")
    try:
        assert other.settings["n_threads"] == threads
        with pytest.raises(RuntimeError, match="n_threads: runtime"):
            check_same_settings(runtime_settings, other.settings)
    finally:
        other.stop()


def test_baseline_reply_equals_runtime(baseline, runtime, request_body):
    response = httpx.post(
        f"{runtime.host}/api/chat", json=request_body, timeout=300
    )
    assert response.status_code == 200, response.text
    runtime_content = response.json()["message"]["content"]
    reply = baseline.request(request_body, timeout=300)
    assert reply["content"] == runtime_content
    assert reply["eval_count"] > 0


def test_baseline_cpu_counted_by_pid(baseline, request_body):
    before = process_cpu_seconds(baseline.pid)
    own_before = time.process_time()
    baseline.request(request_body, timeout=300)
    used = process_cpu_seconds(baseline.pid) - before
    own_used = time.process_time() - own_before
    assert used > 0.1
    # The test process only waits on the pipe while the child computes.
    assert own_used < used / 4


def test_invalid_request_returns_error(baseline, request_body):
    body = request_body | {"format": "yaml"}
    with pytest.raises(RuntimeError, match="format must be"):
        baseline.request(body, timeout=60)


def test_request_timeout_stops_process(
    runtime_environment, request_body, tmp_path
):
    slow = RawModelProcess(runtime_environment, tmp_path / "raw-model.log")
    try:
        with pytest.raises(TimeoutError, match="within 0.01 s"):
            slow.request(request_body, timeout=0.01)
        with pytest.raises(RuntimeError, match="not running"):
            slow.request(request_body, timeout=60)
    finally:
        slow.stop()


def test_closed_input_ends_process(runtime_environment, tmp_path):
    child = RawModelProcess(runtime_environment, tmp_path / "raw-model.log")
    child.stop()
    assert not Path(f"/proc/{child.pid}").exists()
    log = (tmp_path / "raw-model.log").read_text()
    assert "raw model stopped" in log
