"""Serve one local GGUF model over a subset of the Ollama REST API.

The CDS service talks to Ollama through the official `ollama` client. When
the operator sets no OLLAMA_HOST, this runtime stands in for Ollama on one
machine: it loads the model once with llama-cpp-python and answers
``POST /api/chat``, ``POST /api/generate``, ``POST /api/show``,
``GET /api/tags``, ``GET /api/version`` and ``GET /`` with the field names
that `ollama` 0.6.3 parses.

Request bodies contain PHI. This module logs one line per request with its
method, path, status, duration and token counts, and never a prompt, a
message or a reply.
"""

import contextvars
import ctypes
import json
import os
import random
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import sha256
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import llama_cpp
import structlog
from llama_cpp import llama_grammar

from services.common.config import ConfigError, Environment

log = structlog.get_logger()

MAX_BODY_BYTES = 1 << 20
# Bodies up to this size are read and discarded before a 413 reply, so the
# client finishes sending and can read the reply instead of a reset.
MAX_DRAINED_BYTES = 8 << 20
# Requests allowed to wait for the model while one runs; more get 503, the
# way Ollama rejects requests beyond OLLAMA_MAX_QUEUE.
MAX_PENDING = 16
# Seconds a cancelled generation gets to stop after the shutdown grace ends.
CANCEL_WAIT = 5.0
# Reported by /api/version. Ollama 0.5.0 was the first release to accept a
# JSON schema as `format`, so clients that check the version use it.
OLLAMA_VERSION = "0.5.0"

# Ollama's defaults for sampling options a request leaves out, from
# DefaultOptions in ollama/ollama api/types.go. Keys are Ollama's option
# names; values are the llama-cpp-python keyword, its type and the default.
SAMPLING_OPTIONS: dict[str, tuple[str, type, float]] = {
    "temperature": ("temperature", float, 0.8),
    "top_k": ("top_k", int, 40),
    "top_p": ("top_p", float, 0.9),
    "min_p": ("min_p", float, 0.0),
    "typical_p": ("typical_p", float, 1.0),
    "tfs_z": ("tfs_z", float, 1.0),
    "repeat_penalty": ("repeat_penalty", float, 1.1),
    "presence_penalty": ("presence_penalty", float, 0.0),
    "frequency_penalty": ("frequency_penalty", float, 0.0),
    "mirostat": ("mirostat_mode", int, 0),
    "mirostat_tau": ("mirostat_tau", float, 5.0),
    "mirostat_eta": ("mirostat_eta", float, 0.1),
}

# Gemma's turn layout, as /api/show reports it in Ollama's template syntax.
GEMMA_TEMPLATE = (
    "<start_of_turn>user\n{{ .Prompt }}<end_of_turn>\n<start_of_turn>model\n"
)

# llama.cpp file types by number, for the `quantization_level` detail.
FILE_TYPES = {
    value: name.removeprefix("LLAMA_FTYPE_")
    .removeprefix("MOSTLY_")
    .removeprefix("ALL_")
    for name, value in vars(llama_cpp).items()
    if name.startswith("LLAMA_FTYPE_") and isinstance(value, int)
}


# ggml_log_level values of the bundled llama.cpp, whose ggml.h numbers them
# NONE, DEBUG, INFO, WARN, ERROR, CONT. llama-cpp-python 0.3.36 maps them
# with an older numbering, so its own filter drops errors and prints
# warnings as plain text.
GGML_LOG_WARN = 3
GGML_LOG_ERROR = 4

# Prefixes of the environment variables that change how fast the model
# runs: glibc's malloc tuning, the OpenMP runtime (libgomp) that ggml's CPU
# backend uses for its threads, and ggml's own variables.
SPEED_VARIABLE_PREFIXES = ("MALLOC_", "OMP_", "GOMP_", "GGML_")


@llama_cpp.llama_log_callback
def _forward_llama_log(level: int, text: bytes, user_data: Any) -> None:
    """Log llama.cpp's warnings and errors as JSON lines, drop the rest."""
    if level not in (GGML_LOG_WARN, GGML_LOG_ERROR):
        return
    message = text.decode(errors="replace").strip()
    if message:
        log.warning("llama.cpp message", message=message[:300])


@dataclass(frozen=True)
class RuntimeConfig:
    """Settings of the model runtime, read from the environment."""

    model_path: Path
    model_name: str
    host: str
    port: int
    context_tokens: int
    threads: int
    # Seconds that running generations get to finish after SIGTERM.
    shutdown_grace: float

    @classmethod
    def from_env(cls, env: Environment) -> "RuntimeConfig":
        model_path = Path(env.text("ARXIO_MODEL_PATH"))
        if not model_path.is_file():
            raise ConfigError(
                f"ARXIO_MODEL_PATH={str(model_path)!r} is not a readable "
                "file: run `make model` or point it at a GGUF file"
            )

        return cls(
            model_path=model_path,
            model_name=env.text("ARXIO_MODEL_NAME", "gemma3:270m"),
            host=env.text("ARXIO_HOST", "127.0.0.1"),
            port=env.port("ARXIO_PORT", 11434),
            context_tokens=env.integer(
                "ARXIO_MODEL_CONTEXT", 4096, minimum=256
            ),
            threads=env.integer("ARXIO_MODEL_THREADS", 2, minimum=1),
            shutdown_grace=env.number("ARXIO_SHUTDOWN_GRACE_SECONDS", 10.0),
        )


class RequestError(Exception):
    """A request the runtime rejects, with the HTTP status to reply with."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _bad_request(message: str) -> RequestError:
    return RequestError(HTTPStatus.BAD_REQUEST, message)


def _timestamp() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _with_tag(name: str) -> str:
    """Add Ollama's default tag, so "gemma3" and "gemma3:latest" match."""
    if ":" in name.rsplit("/", 1)[-1]:
        return name

    return name + ":latest"


def parse_messages(raw: Any) -> list[dict[str, str]]:
    """Check chat messages and keep only their role and text."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad_request("messages must be a list")
    messages = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise _bad_request(f"messages[{index}] must be an object")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise _bad_request(
                f"messages[{index}].role must be system, user or assistant"
            )
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise _bad_request(f"messages[{index}].content must be a string")
        if message.get("images"):
            raise _bad_request("this model does not support images")
        messages.append({"role": role, "content": content})

    return messages


def gemma_prompt(messages: list[dict[str, str]]) -> str:
    """Lay out chat messages in Gemma's turn format.

    Gemma has no system role. Like the chat template Gemma 3 ships with, the
    system text opens the first user turn, followed by a blank line.
    """
    system = "\n\n".join(
        m["content"].strip() for m in messages if m["role"] == "system"
    )
    turns = [m for m in messages if m["role"] != "system"]
    if system and (not turns or turns[0]["role"] != "user"):
        turns.insert(0, {"role": "user", "content": ""})
    parts = []
    for index, message in enumerate(turns):
        text = message["content"].strip()
        if index == 0 and system:
            text = f"{system}\n\n{text}" if text else system
        role = "model" if message["role"] == "assistant" else "user"
        parts.append(f"<start_of_turn>{role}\n{text}<end_of_turn>\n")
    parts.append("<start_of_turn>model\n")

    return "".join(parts)


def _number(name: str, value: Any, kind: type) -> float | int:
    # bool is a subclass of int, and Ollama rejects it for numeric options.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad_request(f'option "{name}" must be a number')
    if kind is int:
        return int(value)

    return float(value)


def parse_options(raw: Any) -> dict[str, Any]:
    """Map Ollama's request options to llama-cpp-python keyword arguments.

    Options that only apply when a model loads (num_ctx, num_thread and the
    like) and unknown names are ignored, as Ollama ignores unknown names.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _bad_request("options must be an object")
    sampling: dict[str, Any] = {}
    for name, (keyword, kind, default) in SAMPLING_OPTIONS.items():
        value = raw.get(name)
        sampling[keyword] = (
            kind(default) if value is None else _number(name, value, kind)
        )

    # llama-cpp-python reads num_predict <= 0 or None as "until the context
    # is full", which is what Ollama's -1 (no limit) and -2 mean too.
    num_predict = raw.get("num_predict")
    if num_predict is not None:
        num_predict = int(_number("num_predict", num_predict, int))
    sampling["max_tokens"] = (
        num_predict if num_predict and num_predict > 0 else None
    )

    # Without a seed llama-cpp-python derives the same seed on every call,
    # while Ollama's seed -1 means a new random seed each time.
    seed = raw.get("seed")
    if seed is not None:
        seed = int(_number("seed", seed, int))
    sampling["seed"] = (
        seed if seed is not None and seed >= 0 else random.getrandbits(32)
    )

    stop = raw.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (
        isinstance(stop, list) and all(isinstance(s, str) for s in stop)
    ):
        raise _bad_request('option "stop" must be a list of strings')
    sampling["stop"] = stop or []

    return sampling


@dataclass
class Generation:
    """Token counts and timings of one generation, in nanoseconds."""

    prompt_tokens: int
    started_ns: int
    first_token_ns: int = 0
    finished_ns: int = 0
    sampled_tokens: int = 0
    done_reason: str = "stop"
    cancelled: bool = False

    def metrics(self, received_ns: int) -> dict[str, int]:
        first_token_ns = self.first_token_ns or self.finished_ns

        return {
            "total_duration": self.finished_ns - received_ns,
            # The model loads once at start, so requests never wait for it.
            "load_duration": 0,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": first_token_ns - self.started_ns,
            "eval_count": self.sampled_tokens,
            "eval_duration": self.finished_ns - first_token_ns,
        }


class _TokenMeter:
    """Stopping criterion that counts sampled tokens and cancels on demand.

    llama-cpp-python calls it after each sampled token with the token ids so
    far (prompt included), and once more when the generation ends.
    """

    def __init__(
        self, generation: Generation, should_stop: Callable[[], bool]
    ) -> None:
        self._generation = generation
        self._should_stop = should_stop

    def __call__(self, input_ids: Any, logits: Any) -> bool:
        generation = self._generation
        if not generation.first_token_ns:
            generation.first_token_ns = time.perf_counter_ns()
        # The ids end just before the token sampled last, hence the + 1.
        sampled = len(input_ids) - generation.prompt_tokens + 1
        generation.sampled_tokens = max(generation.sampled_tokens, sampled)
        if self._should_stop():
            generation.cancelled = True

            return True

        return False


class LocalModel:
    """The one llama.cpp model this runtime serves, and facts about it."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.name = config.model_name
        self.lock = threading.Lock()
        llama_cpp.llama_log_set(_forward_llama_log, ctypes.c_void_p(0))
        self._llama = llama_cpp.Llama(
            model_path=str(config.model_path),
            n_ctx=config.context_tokens,
            n_threads=config.threads,
            verbose=False,
        )
        self._vocab = llama_cpp.llama_model_get_vocab(self._llama.model)
        metadata = self._llama.metadata
        self.family = metadata.get("general.architecture", "")
        if not self.family.startswith("gemma"):
            raise ConfigError(
                f"ARXIO_MODEL_PATH is a {self.family or 'unknown'} model: "
                "this runtime only formats prompts for Gemma models"
            )
        self.context_tokens = self._llama.n_ctx()
        self.model_info = {k: _typed(v) for k, v in metadata.items()}
        stat = config.model_path.stat()
        self.size = stat.st_size
        self.modified_at = (
            datetime.fromtimestamp(stat.st_mtime, UTC)
            .isoformat()
            .replace("+00:00", "Z")
        )
        self.digest = _file_sha256(config.model_path)
        file_type = int(metadata.get("general.file_type", -1))
        self.details = {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": metadata.get("general.size_label", ""),
            "quantization_level": FILE_TYPES.get(file_type, "unknown"),
        }

    def settings(self) -> dict[str, Any]:
        """Return the settings that decide how fast this process runs the
        model: llama.cpp's context parameters in force, the CPUs the
        process may run on and the environment variables that tune its
        threads and memory allocator."""
        params = self._llama.context_params
        environment = {
            name: value
            for name, value in sorted(os.environ.items())
            if name.startswith(SPEED_VARIABLE_PREFIXES)
        }

        return {
            "model_path": self._llama.model_path,
            "n_ctx": self._llama.n_ctx(),
            "n_batch": params.n_batch,
            "n_ubatch": params.n_ubatch,
            "n_threads": params.n_threads,
            "n_threads_batch": params.n_threads_batch,
            "cpu_affinity": sorted(os.sched_getaffinity(0)),
            "environment": environment,
        }

    def serves(self, name: Any) -> bool:
        return isinstance(name, str) and _with_tag(name) == _with_tag(
            self.name
        )

    def compile_format(self, output_format: Any) -> Any:
        """Turn Ollama's `format` into a llama.cpp grammar, or None."""
        if output_format in (None, ""):
            return None
        if output_format == "json":
            gbnf = llama_grammar.JSON_GBNF
        elif isinstance(output_format, dict):
            try:
                gbnf = llama_grammar.json_schema_to_gbnf(
                    json.dumps(output_format)
                )
            # The converter raises assertion, key and value errors, among
            # others, on schemas it cannot handle.
            except Exception as error:
                raise _bad_request(
                    f"format schema is not supported: {error}"
                ) from None
        else:
            raise _bad_request('format must be "json" or a JSON schema')

        # llama-cpp-python does not check the grammar it builds. llama.cpp
        # rejects one it cannot parse (a maxLength of 2000 or more exceeds
        # its repetition limit) and sampling with it then crashes the
        # process, so the grammar is parsed here first.
        # NOTE: llama.cpp prints the rejected grammar to stderr itself.
        sampler = llama_cpp.llama_sampler_init_grammar(
            self._vocab, gbnf.encode(), b"root"
        )
        if not sampler:
            raise _bad_request(
                "format schema is too large for llama.cpp's grammar: "
                "lower its maxLength, maxItems or nesting"
            )
        llama_cpp.llama_sampler_free(sampler)

        return llama_grammar.LlamaGrammar.from_string(gbnf, verbose=False)

    def tokenize(self, prompt: str) -> list[int]:
        """Tokenize a prompt and check that it leaves room for a reply."""
        tokens = self._llama.tokenize(
            prompt.encode(), add_bos=True, special=True
        )
        if len(tokens) >= self.context_tokens:
            raise _bad_request(
                f"prompt is {len(tokens)} tokens, more than the context "
                f"window of {self.context_tokens} tokens allows"
            )

        return tokens

    def generate(
        self,
        prompt_tokens: list[int],
        sampling: Mapping[str, Any],
        grammar: Any,
        should_stop: Callable[[], bool],
    ) -> tuple[Generation, Iterator[str]]:
        """Start a generation; the caller must hold `lock` while iterating.

        The returned Generation fills in as the iterator yields text pieces.
        """
        generation = Generation(
            prompt_tokens=len(prompt_tokens),
            started_ns=time.perf_counter_ns(),
        )
        meter = _TokenMeter(generation, should_stop)
        chunks = self._llama.create_completion(
            prompt_tokens,
            stream=True,
            grammar=grammar,
            stopping_criteria=llama_cpp.StoppingCriteriaList([meter]),
            **sampling,
        )

        def pieces() -> Iterator[str]:
            with closing(chunks):
                for chunk in chunks:
                    choice = chunk["choices"][0]
                    if choice["text"]:
                        yield choice["text"]
                    if choice["finish_reason"]:
                        generation.done_reason = choice["finish_reason"]
            generation.finished_ns = time.perf_counter_ns()

        return generation, pieces()


def _typed(value: str) -> Any:
    """Return a GGUF metadata string as the number it holds, if it is one."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass

    return value


def _file_sha256(path: Path) -> str:
    digest = sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)

    return digest.hexdigest()


class ModelServer(ThreadingHTTPServer):
    """HTTP server with one thread per connection and one shared model."""

    daemon_threads = True

    def __init__(self, config: RuntimeConfig, model: LocalModel) -> None:
        self.address_family = socket.getaddrinfo(
            config.host, config.port, type=socket.SOCK_STREAM
        )[0][0]
        super().__init__((config.host, config.port), OllamaHandler)
        self.model = model
        # Log context bound at start (the service name), for every thread.
        self._log_context = contextvars.copy_context()
        self.draining = threading.Event()
        self.cancelling = threading.Event()
        self._pending = threading.BoundedSemaphore(MAX_PENDING + 1)
        self._active = 0
        self._idle = threading.Condition()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def process_request_thread(
        self, request: Any, client_address: Any
    ) -> None:
        self._log_context.copy().run(
            super().process_request_thread, request, client_address
        )

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Replaces socketserver's traceback on stderr with a JSON line.
        log.exception("model runtime connection failed")

    @contextmanager
    def model_turn(self) -> Iterator[None]:
        """Wait for the model, or reject when too many requests wait."""
        if self.draining.is_set():
            raise RequestError(
                HTTPStatus.SERVICE_UNAVAILABLE, "model runtime is stopping"
            )
        if not self._pending.acquire(blocking=False):
            raise RequestError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "server busy, please try again: maximum pending requests "
                "exceeded",
            )
        with self._idle:
            self._active += 1
        try:
            with self.model.lock:
                if self.draining.is_set():
                    raise RequestError(
                        HTTPStatus.SERVICE_UNAVAILABLE,
                        "model runtime is stopping",
                    )
                yield
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()
            self._pending.release()

    def drain(self, grace: float) -> None:
        """Let running generations finish for `grace` s, then cancel them."""
        self.draining.set()
        with self._idle:
            if self._idle.wait_for(lambda: self._active == 0, grace):
                return
            log.warning(
                "cancelling generations after shutdown grace",
                active=self._active,
                grace_s=grace,
            )
            self.cancelling.set()
            self._idle.wait_for(lambda: self._active == 0, CANCEL_WAIT)


class OllamaHandler(BaseHTTPRequestHandler):
    """Route one connection's requests to the Ollama API handlers."""

    server: ModelServer
    protocol_version = "HTTP/1.1"
    # Seconds a connection may sit idle or stall mid-request.
    timeout = 60
    # nginx's code for "client closed the connection before the reply".
    CLIENT_CLOSED = 499
    # Path -> (method, handler). GET routes answer HEAD as well.
    ROUTES = {
        "/": ("GET", "_root"),
        "/api/version": ("GET", "_version"),
        "/api/tags": ("GET", "_tags"),
        "/api/show": ("POST", "_show"),
        "/api/chat": ("POST", "_chat"),
        "/api/generate": ("POST", "_generate"),
    }

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        # Replaced by the structured line _dispatch writes per request.
        pass

    def log_error(self, format: str, *args: Any) -> None:
        # Only malformed request lines and timeouts reach here. The request
        # line holds a method and a path, never a body.
        log.warning("http request rejected", detail=format % args)

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def _dispatch(self) -> None:
        started = time.perf_counter()
        self._status = 0
        self._streaming = False
        self._fields: dict[str, Any] = {}
        path = urlsplit(self.path).path
        try:
            if path not in self.ROUTES:
                raise RequestError(
                    HTTPStatus.NOT_FOUND, f"path {path} not found"
                )
            method, handler_name = self.ROUTES[path]
            allowed = ("GET", "HEAD") if method == "GET" else (method,)
            if self.command not in allowed:
                raise RequestError(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    f"method {self.command} is not allowed on {path}",
                )
            getattr(self, handler_name)()
        except RequestError as error:
            self._send_json(error.status, {"error": error.message})
        except (BrokenPipeError, ConnectionResetError):
            self._status = self.CLIENT_CLOSED
            self.close_connection = True
        except Exception:
            # Tracebacks name code lines, not request content.
            log.exception("model runtime request failed", path=path[:200])
            self._reply_internal_error()
        finally:
            log.info(
                "http request",
                method=self.command,
                path=path[:200],
                status=self._status,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
                **self._fields,
            )

    def _reply_internal_error(self) -> None:
        message = "model runtime failed: see its log"
        self.close_connection = True
        try:
            if self._streaming:
                self._write_line({"error": message})
                self._end_stream()
            elif not self._status:
                self._send_json(
                    HTTPStatus.INTERNAL_SERVER_ERROR, {"error": message}
                )
        except OSError:
            pass

    def _send_bytes(
        self, status: int, body: bytes, content_type: str, **headers: str
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, **headers: str) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode()
        self._send_bytes(
            status, body, "application/json; charset=utf-8", **headers
        )

    def _read_json(self) -> dict[str, Any]:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise RequestError(
                HTTPStatus.LENGTH_REQUIRED, "Content-Length header is missing"
            )
        try:
            length = int(length_header)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise _bad_request("Content-Length header is invalid")
        if length > MAX_BODY_BYTES:
            if length <= MAX_DRAINED_BYTES:
                self._discard(length)
            self.close_connection = True
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body is {length} bytes, more than the maximum "
                f"of {MAX_BODY_BYTES} bytes",
            )
        body = self.rfile.read(length)
        try:
            payload = json.loads(body)
        except UnicodeDecodeError:
            raise _bad_request("request body is not UTF-8") from None
        except json.JSONDecodeError as error:
            # The message names a position, never the text around it.
            raise _bad_request(
                f"request body is not valid JSON: {error.msg} at "
                f"line {error.lineno} column {error.colno}"
            ) from None
        if not isinstance(payload, dict):
            raise _bad_request("request body must be a JSON object")

        return payload

    def _discard(self, length: int) -> None:
        while length > 0:
            block = self.rfile.read(min(length, 1 << 16))
            if not block:
                return
            length -= len(block)

    def _require_model(self, body: dict[str, Any]) -> str:
        name = body.get("model") or body.get("name")
        if not name:
            raise _bad_request("model is required")
        if not self.server.model.serves(name):
            raise RequestError(
                HTTPStatus.NOT_FOUND,
                f'model "{name}" not found, try pulling it first',
            )

        return self.server.model.name

    def _root(self) -> None:
        self._send_bytes(
            HTTPStatus.OK, b"Ollama is running", "text/plain; charset=utf-8"
        )

    def _version(self) -> None:
        self._send_json(HTTPStatus.OK, {"version": OLLAMA_VERSION})

    def _tags(self) -> None:
        model = self.server.model
        self._send_json(
            HTTPStatus.OK,
            {
                "models": [
                    {
                        "name": model.name,
                        "model": model.name,
                        "modified_at": model.modified_at,
                        "size": model.size,
                        "digest": model.digest,
                        "details": model.details,
                    }
                ]
            },
        )

    def _show(self) -> None:
        self._require_model(self._read_json())
        model = self.server.model
        self._send_json(
            HTTPStatus.OK,
            {
                "license": model.model_info.get("general.license", ""),
                "template": GEMMA_TEMPLATE,
                "details": model.details,
                "model_info": model.model_info,
                "capabilities": ["completion"],
                "modified_at": model.modified_at,
            },
        )

    def _chat(self) -> None:
        body = self._read_json()
        name = self._require_model(body)
        if body.get("tools"):
            raise _bad_request(f'model "{name}" does not support tools')
        messages = parse_messages(body.get("messages"))

        def wrap(text: str) -> dict[str, Any]:
            return {"message": {"role": "assistant", "content": text}}

        prompt = gemma_prompt(messages) if messages else None
        self._run(body, name, prompt, wrap)

    def _generate(self) -> None:
        body = self._read_json()
        name = self._require_model(body)
        prompt = body.get("prompt") or ""
        system = body.get("system") or ""
        if not isinstance(prompt, str) or not isinstance(system, str):
            raise _bad_request("prompt and system must be strings")
        if body.get("images"):
            raise _bad_request("this model does not support images")

        def wrap(text: str) -> dict[str, Any]:
            return {"response": text}

        if not prompt:
            text = None
        elif body.get("raw"):
            text = prompt
        else:
            messages = [{"role": "user", "content": prompt}]
            if system:
                messages.insert(0, {"role": "system", "content": system})
            text = gemma_prompt(messages)
        self._run(body, name, text, wrap)

    def _run(
        self,
        body: dict[str, Any],
        name: str,
        prompt: str | None,
        wrap: Callable[[str], dict[str, Any]],
    ) -> None:
        """Generate a reply and send it whole or as NDJSON lines."""
        received_ns = time.perf_counter_ns()
        stream = body.get("stream", True) is not False
        model = self.server.model
        grammar = model.compile_format(body.get("format"))
        sampling = parse_options(body.get("options"))
        header = {"model": name}

        # With nothing to generate Ollama only loads the model and says so.
        if prompt is None:
            self._send_json(
                HTTPStatus.OK,
                {
                    **header,
                    "created_at": _timestamp(),
                    **wrap(""),
                    "done": True,
                    "done_reason": "load",
                },
            )
            return

        tokens = model.tokenize(prompt)
        # The reply is written inside the model turn, so that a shutdown
        # waiting for the turn to end does not cut it off.
        with self.server.model_turn():
            generation, pieces = model.generate(
                tokens, sampling, grammar, self._should_stop
            )
            with closing(pieces):
                if stream:
                    self._stream(header, pieces, wrap)
                else:
                    text = "".join(pieces)
            self._fields = {
                "prompt_eval_count": generation.prompt_tokens,
                "eval_count": generation.sampled_tokens,
            }
            if generation.cancelled:
                self._finish_cancelled(stream)
                return

            final = {
                **header,
                "created_at": _timestamp(),
                **wrap("" if stream else text),
                "done": True,
                "done_reason": generation.done_reason,
                **generation.metrics(received_ns),
            }
            if stream:
                self._write_line(final)
                self._end_stream()
            else:
                self._send_json(HTTPStatus.OK, final)

    def _stream(
        self,
        header: dict[str, str],
        pieces: Iterator[str],
        wrap: Callable[[str], dict[str, Any]],
    ) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._streaming = True
        for piece in pieces:
            self._write_line(
                {
                    **header,
                    "created_at": _timestamp(),
                    **wrap(piece),
                    "done": False,
                }
            )

    def _finish_cancelled(self, stream: bool) -> None:
        if not self.server.cancelling.is_set():
            # The client went away, so there is no one to reply to.
            self._status = self.CLIENT_CLOSED
            self.close_connection = True
            return
        message = "model runtime is stopping"
        if stream:
            # The ollama client raises ResponseError on an "error" line.
            self._write_line({"error": message})
            self._end_stream()
        else:
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": message})

    def _write_line(self, payload: dict[str, Any]) -> None:
        line = json.dumps(payload, ensure_ascii=False).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def _should_stop(self) -> bool:
        return self.server.cancelling.is_set() or self._client_closed()

    def _client_closed(self) -> bool:
        """Check, without blocking, whether the client closed its socket."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False

            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


def serve(config: RuntimeConfig) -> None:
    """Load the model, serve until SIGTERM or SIGINT, then drain and stop."""
    started = time.perf_counter()
    model = LocalModel(config)
    log.info(
        "model loaded",
        model=model.name,
        path=str(config.model_path),
        duration_ms=round((time.perf_counter() - started) * 1000, 1),
        settings=model.settings(),
    )
    server = ModelServer(config, model)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    thread = threading.Thread(
        target=server.serve_forever, name="http", daemon=True
    )
    thread.start()
    log.info(
        "model runtime listening",
        host=config.host,
        port=server.port,
        model=model.name,
    )

    stop.wait()
    log.info("model runtime stopping", grace_s=config.shutdown_grace)
    server.shutdown()
    server.drain(config.shutdown_grace)
    server.server_close()
    log.info("model runtime stopped")
