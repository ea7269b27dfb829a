"""The raw baseline of the model review scenario, in a process of its own.

    python -m bench.raw_model    (bench/model_scenario.py starts it)

It reads the model runtime's environment (ARXIO_MODEL_PATH,
ARXIO_MODEL_CONTEXT, ARXIO_MODEL_THREADS and the rest that
services/model_runtime reads) and loads the model with the runtime's own
class, so that its llama.cpp settings, thread variables and CPU affinity
are the runtime's. Its first line on stdout reports its pid and those
settings. Then it reads requests from stdin, one JSON object a line in
the shape of Ollama's /api/chat body (messages, format, options). For
each it runs the steps of the runtime's chat handler without the HTTP
server and writes one JSON line to stdout, with the reply's `content` or
an `error`. It exits when stdin closes. Its log lines go to stderr.
"""

import json
import os
import sys
from typing import IO, Any

import structlog

from services.common.config import Environment
from services.common.logging import configure_logging
from services.model_runtime.server import (
    LocalModel,
    RequestError,
    RuntimeConfig,
    gemma_prompt,
    parse_messages,
    parse_options,
)

log = structlog.get_logger()


def run_chat(model: LocalModel, body: dict[str, Any]) -> dict[str, Any]:
    """Run one chat request with the steps of the runtime's chat handler."""
    messages = parse_messages(body.get("messages"))
    grammar = model.compile_format(body.get("format"))
    sampling = parse_options(body.get("options"))
    tokens = model.tokenize(gemma_prompt(messages))
    with model.lock:
        generation, pieces = model.generate(
            tokens, sampling, grammar, lambda: False
        )
        content = "".join(pieces)

    return {
        "content": content,
        "done_reason": generation.done_reason,
        "prompt_eval_count": generation.prompt_tokens,
        "eval_count": generation.sampled_tokens,
    }


def write_line(output: IO[str], payload: dict[str, Any]) -> None:
    output.write(json.dumps(payload) + "\n")
    output.flush()


def serve(model: LocalModel, requests: IO[str], output: IO[str]) -> None:
    """Run each request line and write its reply, until `requests` ends."""
    for line in requests:
        try:
            body = json.loads(line)
        except json.JSONDecodeError as error:
            log.warning("raw model request invalid", error=error.msg)
            write_line(
                output,
                {"error": f"request line is not valid JSON: {error.msg}"},
            )
            continue
        if not isinstance(body, dict):
            log.warning("raw model request invalid", error="not an object")
            write_line(output, {"error": "request line must be an object"})
            continue
        try:
            reply = run_chat(model, body)
        except RequestError as error:
            # Its messages name options and sizes, never request content.
            log.warning("raw model request rejected", error=error.message)
            reply = {"error": error.message}
        except Exception as error:
            # The benchmark counts the failure and goes on with the next
            # request. Tracebacks name code lines, never the prompt.
            log.exception("raw model request failed")
            reply = {"error": f"raw model call failed: {error}"}
        write_line(output, reply)


def main() -> int:
    configure_logging("raw-model")
    # Replies go to a copy of stdout. File descriptor 1 then points to
    # stderr, so that anything else written to stdout, by llama.cpp for
    # one, cannot break the line protocol.
    output = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    try:
        config = RuntimeConfig.from_env(Environment())
        model = LocalModel(config)
    # ConfigError is a ValueError, as is llama-cpp-python's error for a
    # model file that fails to load.
    except (OSError, ValueError) as error:
        log.error("raw model not started", error=str(error))
        write_line(output, {"error": f"raw model not started: {error}"})
        return 2

    write_line(output, {"pid": os.getpid(), "settings": model.settings()})
    log.info("raw model ready", model=model.name)
    serve(model, sys.stdin, output)
    log.info("raw model stopped: its input closed")

    return 0


if __name__ == "__main__":
    sys.exit(main())
