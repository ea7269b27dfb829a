"""The model review scenario of `make bench`: a review with the model
through the full edge, against the raw llama-cpp-python call that the
model runtime makes for it, on the same prompt and model.

The raw call loads the runtime's model file in this process with the
runtime's own settings (context size, threads). It builds the prompt, the
output grammar and the sampling options with the same functions as the
CDS service and the runtime, and skips the HTTP server, the Ollama
client, gRPC, the edge and the screening.
"""

import json
from pathlib import Path

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


class RawModel:
    """The runtime's model, called in this process without its server."""

    def __init__(
        self,
        runtime_environment: dict[str, str],
        cds_environment: dict[str, str],
    ) -> None:
        import llama_cpp
        from llama_cpp import llama_grammar

        from services.model_runtime.server import (
            RuntimeConfig,
            gemma_prompt,
            parse_options,
        )

        config = RuntimeConfig.from_env(Environment(runtime_environment))
        self._llama = llama_cpp.Llama(
            model_path=str(config.model_path),
            n_ctx=config.context_tokens,
            n_threads=config.threads,
            verbose=False,
        )
        options = ModelConfig.from_env(Environment(cds_environment)).options
        self._sampling = parse_options(options)
        request = example_review(model_review=True)
        findings = screen(request, load_knowledge_base()).findings
        prompt = gemma_prompt(build_messages(request, findings))
        self._tokens = self._llama.tokenize(
            prompt.encode(), add_bos=True, special=True
        )
        # The runtime compiles the grammar for each request. Here it is
        # compiled once, so that cost counts against the model path.
        self._grammar = llama_grammar.LlamaGrammar.from_string(
            llama_grammar.json_schema_to_gbnf(json.dumps(SCHEMA)),
            verbose=False,
        )
        self.last_reply: dict | None = None

    def __call__(self) -> None:
        completion = self._llama.create_completion(
            self._tokens, grammar=self._grammar, **self._sampling
        )
        self.last_reply = json.loads(completion["choices"][0]["text"])


def model_review(
    setting: Setting,
    model_pid: int,
    runtime_environment: dict[str, str],
    cds_environment: dict[str, str],
) -> Comparison:
    """Compare reviews with the model through the full edge, one at a
    time, against the raw call on the same prompt, one at a time."""
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
    raw = RawModel(runtime_environment, cds_environment)

    def raw_factory() -> Sender:
        return raw

    measured = Side(
        "model review through the full edge, one at a time",
        lambda seconds: closed_loop(through_edge, 1, seconds),
        cpu=[
            *edge_review_cpu(setting, setting.edge_1),
            CpuSource("model runtime", "process", model_pid),
        ],
        count=setting.edge_1.requests(),
        latency=setting.edge_1.latency(),
    )
    baseline = Side(
        "baseline: the raw llama-cpp-python call on the same prompt",
        lambda seconds: closed_loop(raw_factory, 1, seconds),
        cpu=[CpuSource("harness (llama-cpp-python)", "self")],
    )
    comparison = Comparison("model_review", measured, baseline)

    def finish() -> str:
        """Compare the last replies: with greedy decoding and the same
        seed both paths generate the same text."""
        if raw.last_reply is None or not last_review:
            return "Model review: no reply of both paths to compare."
        same = raw.last_reply.get("summary") == last_review.get("summary")

        return (
            "Model review: the raw call's summary "
            + ("matched" if same else "differed from")
            + " the model path's, with the same prompt and options."
        )

    comparison.finish = finish

    return comparison
