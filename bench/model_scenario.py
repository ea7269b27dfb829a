"""The model review scenario of `make bench`: a review with the model
through the full edge, against the raw llama-cpp-python call that the
model runtime makes for it, on the same prompt and model.

The raw call runs in a child process of its own (bench/raw_model.py),
started with the runtime's environment and loading the model with the
runtime's class, so that it runs under the same conditions as the
runtime: same model file, llama.cpp settings, thread variables and CPU
affinity. The harness checks that the settings the child reports equal
those the runtime logged, sends it the chat request that the CDS service
sends, one at a time over a pipe, and reads its CPU time from /proc. The
child skips the HTTP server, the Ollama client, gRPC, the edge and the
screening.
"""

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT
from bench.load import Sender, closed_loop
from bench.measure import Comparison, CpuSource, Side
from bench.scenarios import (
    MODEL_REQUEST_TIMEOUT,
    REVIEW_PATH,
    Setting,
    check_model_review,
    edge_review_cpu,
    example_review,
    rest_sender,
    review_body,
)
from services.cds.knowledge_base import load_knowledge_base
from services.cds.model_config import ModelConfig
from services.cds.model_review import SCHEMA, build_messages
from services.cds.screening import screen
from services.common.config import Environment
from services.launcher.processes import ChildProcess

# Seconds the raw model process gets to load the model and report its
# settings, and to exit once its input closes or after SIGTERM.
RAW_START_TIMEOUT = 90.0
RAW_STOP_TIMEOUT = 10.0
RAW_CPU_NAME = "raw model process (llama-cpp-python)"


def model_unavailable_reason(model_dir: Path) -> str | None:
    """Return why the local model runtime cannot run here, or None."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as error:
        return f"llama-cpp-python cannot be imported ({error})"
    from services.model_runtime.assemble import ensure_model

    try:
        ensure_model(model_dir)
    except (OSError, ValueError) as error:
        return f"the model file in {model_dir} is unavailable ({error})"

    return None


class RawModelProcess:
    """The raw baseline's child process, sent one request at a time.

    The child runs `python -m bench.raw_model` with the given environment.
    The constructor waits until it has loaded the model and reported its
    settings. A request that gets no reply within its timeout kills the
    child, so that a late reply cannot be read as the next one's.
    """

    def __init__(self, environment: dict[str, str], log_file: Path) -> None:
        self.log_file = log_file
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "bench.raw_model"],
                cwd=REPO_ROOT,
                env=environment,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                bufsize=0,
                start_new_session=True,
            )
        self._buffer = b""
        self._lock = threading.Lock()
        try:
            ready = self._read_reply(RAW_START_TIMEOUT, "loading the model")
            if "error" in ready:
                raise RuntimeError(
                    "the raw model process failed to start: "
                    f"{ready['error']}; see {log_file}"
                )
            if ready.get("pid") != self.pid:
                raise RuntimeError(
                    f"the raw model process reported pid {ready.get('pid')}"
                    f" but runs as pid {self.pid}: its first line on "
                    "stdout must come from bench/raw_model.py"
                )
        except BaseException:
            self.stop()
            raise
        self.settings: dict[str, Any] = ready["settings"]

    @property
    def pid(self) -> int:
        return self._process.pid

    def request(self, body: dict[str, Any], timeout: float) -> dict:
        """Send one chat request and return the reply's fields.

        Raises RuntimeError when the child replies with an error or has
        exited, and TimeoutError after `timeout` seconds without a reply.
        """
        line = json.dumps(body).encode() + b"\n"
        with self._lock:
            if self._process.poll() is not None:
                raise RuntimeError(
                    "the raw model process is not running (exit code "
                    f"{self._process.returncode}): see {self.log_file}"
                )
            try:
                self._process.stdin.write(line)
            except BrokenPipeError:
                raise RuntimeError(
                    "the raw model process closed its input: see "
                    f"{self.log_file}"
                ) from None
            try:
                reply = self._read_reply(timeout, "replying")
            except TimeoutError:
                self._process.kill()
                self._process.wait()
                raise
        if "error" in reply:
            raise RuntimeError(f"the raw model call failed: {reply['error']}")

        return reply

    def _read_reply(self, timeout: float, activity: str) -> dict:
        """Read one JSON line from the child's stdout within `timeout` s.

        `activity` names the child's work in errors, such as "replying".
        """
        deadline = time.monotonic() + timeout
        output = self._process.stdout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"the raw model process did not finish {activity} within "
                    f"{timeout:g} s: see {self.log_file}"
                )
            readable, _, _ = select.select([output], [], [], remaining)
            if not readable:
                continue
            block = os.read(output.fileno(), 1 << 16)
            if not block:
                code = self._process.wait(RAW_STOP_TIMEOUT)
                raise RuntimeError(
                    f"the raw model process exited with code {code} before "
                    f"it finished {activity}: see {self.log_file}"
                )
            self._buffer += block
        line, _, self._buffer = self._buffer.partition(b"\n")

        return json.loads(line)

    def stop(self) -> None:
        """Close the child's input, which ends it, or else kill it."""
        process = self._process
        if process.stdin is not None and not process.stdin.closed:
            try:
                process.stdin.close()
            except BrokenPipeError:
                pass
        try:
            process.wait(RAW_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # A generation is still running: it ends at its next token.
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(RAW_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()


def logged_settings(log_file: Path | None) -> dict[str, Any]:
    """Return the settings that the model runtime logged when it loaded
    the model, from its log file of JSON lines."""
    if log_file is None or not log_file.exists():
        raise RuntimeError(
            f"the model runtime's log file {log_file} is missing: start the "
            "suite with log_to_files=True, so that its settings can be "
            "compared with the raw baseline's"
        )
    settings = None
    for line in log_file.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            # llama.cpp prints some lines of its own.
            continue
        if isinstance(entry, dict) and entry.get("event") == "model loaded":
            settings = entry.get("settings")
    if not isinstance(settings, dict):
        raise RuntimeError(
            f'the model runtime\'s log {log_file} has no "model loaded" '
            "line with its settings"
        )

    return settings


def check_same_settings(
    runtime: dict[str, Any], baseline: dict[str, Any]
) -> None:
    """Raise RuntimeError naming each setting where the raw baseline's
    process differs from the model runtime's."""
    differences = [
        f"{name}: runtime {runtime.get(name)!r}, baseline "
        f"{baseline.get(name)!r}"
        for name in sorted(runtime.keys() | baseline.keys())
        if runtime.get(name) != baseline.get(name)
    ]
    if differences:
        raise RuntimeError(
            "the raw model baseline runs with other settings than the model "
            "runtime, so the comparison would not be fair: "
            + "; ".join(differences)
            + ". Start it with the runtime's environment."
        )


def chat_request(cds_environment: dict[str, str]) -> dict[str, Any]:
    """Return the chat request that the CDS service sends the model for
    the example review, as Ollama's /api/chat body."""
    config = ModelConfig.from_env(Environment(cds_environment))
    request = example_review(model_review=True)
    findings = screen(request, load_knowledge_base()).findings

    return {
        "model": config.model,
        "messages": build_messages(request, findings),
        "format": SCHEMA,
        "options": dict(config.options),
        "stream": False,
    }


def model_review(
    setting: Setting,
    runtime: ChildProcess,
    cds_environment: dict[str, str],
    log_folder: Path,
) -> Comparison:
    """Compare reviews with the model through the full edge, one at a
    time, against the raw call on the same prompt, one at a time.

    Starts the raw baseline's process, which the returned comparison's
    `stop` ends, and raises RuntimeError when its settings differ from
    those the runtime logged.
    """
    last_review: dict = {}

    def check(review: dict) -> None:
        check_model_review(review)
        last_review.update(review["modelReview"])

    body = review_body(example_review(model_review=True))
    through_edge = rest_sender(
        setting,
        setting.edge_1,
        "POST",
        REVIEW_PATH,
        body,
        check,
        timeout=MODEL_REQUEST_TIMEOUT,
    )
    runtime_settings = logged_settings(runtime.log_file)
    raw = RawModelProcess(
        dict(runtime.environment), log_folder / "raw-model.log"
    )
    try:
        check_same_settings(runtime_settings, raw.settings)
    except RuntimeError:
        raw.stop()
        raise
    request = chat_request(cds_environment)
    last_raw_reply: dict = {}

    def send_raw() -> None:
        reply = raw.request(request, MODEL_REQUEST_TIMEOUT)
        last_raw_reply.clear()
        last_raw_reply.update(json.loads(reply["content"]))

    def raw_factory() -> Sender:
        return send_raw

    measured = Side(
        "model review through the full edge, one at a time",
        lambda seconds: closed_loop(through_edge, 1, seconds),
        cpu=[
            *edge_review_cpu(setting, setting.edge_1),
            CpuSource("model runtime", "process", runtime.process.pid),
        ],
        count=setting.edge_1.requests(),
        latency=setting.edge_1.latency(),
    )
    baseline = Side(
        "baseline: the raw llama-cpp-python call on the same prompt, in a "
        "process of its own",
        lambda seconds: closed_loop(raw_factory, 1, seconds),
        cpu=[CpuSource(RAW_CPU_NAME, "process", raw.pid)],
    )
    comparison = Comparison("model_review", measured, baseline)
    comparison.facts = {
        "harness_pid": os.getpid(),
        "runtime_pid": runtime.process.pid,
        "baseline_pid": raw.pid,
        "runtime_settings": runtime_settings,
        "baseline_settings": raw.settings,
    }
    comparison.stop = raw.stop

    def finish() -> str:
        """Compare the last replies: with greedy decoding and the same
        seed both paths generate the same text."""
        if not last_raw_reply or not last_review:
            return "Model review: no reply of both paths to compare."
        same = last_raw_reply.get("summary") == last_review.get("summary")
        comparison.facts["same_summary"] = same

        return (
            "Model review: the raw call's summary "
            + ("matched" if same else "differed from")
            + " the model path's, with the same prompt, options and model "
            "settings."
        )

    comparison.finish = finish

    return comparison
