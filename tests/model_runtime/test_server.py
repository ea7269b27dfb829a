"""The local model runtime, through the official ollama client and httpx.

Every test talks to a real runtime process serving the real Gemma 3 270M
model. Generations use temperature 0 and small num_predict limits to stay
fast and repeatable.
"""

import json
import signal
import time
from collections.abc import Iterator

import httpx
import ollama
import pytest

pytest_plugins = ("tests.model_runtime.fixtures",)

CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1},
        "population": {"type": "integer"},
    },
    "required": ["city", "population"],
    "additionalProperties": False,
}
GREEDY = {"temperature": 0, "seed": 1}


@pytest.fixture
def client(model_runtime) -> ollama.Client:
    return ollama.Client(host=model_runtime.host, timeout=60)


def chat_once(client, model_runtime, text: str, **options):
    return client.chat(
        model=model_runtime.model,
        messages=[{"role": "user", "content": text}],
        options=GREEDY | options,
        stream=False,
    )


class TestMetadata:
    def test_root_says_running(self, model_runtime):
        """GET / answers like Ollama does."""
        response = httpx.get(model_runtime.host + "/")

        assert 200 == response.status_code
        assert "Ollama is running" == response.text

    def test_version_has_version(self, model_runtime):
        """/api/version returns a version string."""
        response = httpx.get(model_runtime.host + "/api/version")

        assert 200 == response.status_code
        assert isinstance(response.json()["version"], str)

    def test_tags_lists_model(self, client, model_runtime):
        """list() returns the one served model and its details."""
        listing = client.list()

        assert [model_runtime.model] == [m.model for m in listing.models]
        model = listing.models[0]
        assert model.size > 200_000_000
        assert "gguf" == model.details.format
        assert "gemma3" == model.details.family
        assert "Q4_K_M" == model.details.quantization_level

    def test_show_describes_model(self, client, model_runtime):
        """show() returns details, GGUF metadata and capabilities."""
        shown = client.show(model_runtime.model)

        assert "gemma3" == shown.details.family
        assert "270M" == shown.details.parameter_size
        assert "gemma3" == shown.modelinfo["general.architecture"]
        assert ["completion"] == shown.capabilities

    def test_show_unknown_model_404(self, client):
        """show() of a model the runtime lacks raises a 404."""
        with pytest.raises(ollama.ResponseError) as raised:
            client.show("llama3:8b")

        assert 404 == raised.value.status_code


class TestChat:
    def test_schema_chat_matches_schema(self, client, model_runtime):
        """A JSON schema as format gives JSON that fits it."""
        response = client.chat(
            model=model_runtime.model,
            messages=[
                {"role": "system", "content": "Reply in JSON."},
                {
                    "role": "user",
                    "content": "Name a large city in France and its "
                    "population.",
                },
            ],
            format=CITY_SCHEMA,
            options=GREEDY | {"num_predict": 64},
            stream=False,
        )

        reply = json.loads(response.message.content)
        assert {"city", "population"} == set(reply)
        assert isinstance(reply["city"], str)
        assert reply["city"]
        assert isinstance(reply["population"], int)
        assert "stop" == response.done_reason
        assert "assistant" == response.message.role

    def test_chat_reports_counts_and_durations(self, client, model_runtime):
        """A finished chat carries Ollama's token counts and durations."""
        response = chat_once(client, model_runtime, "Hello.", num_predict=8)

        assert response.done is True
        assert model_runtime.model == response.model
        assert response.created_at.endswith("Z")
        assert response.prompt_eval_count > 0
        assert 8 == response.eval_count
        assert 0 < response.eval_duration < response.total_duration
        assert 0 < response.prompt_eval_duration < response.total_duration

    def test_json_format_gives_object(self, client, model_runtime):
        """format "json" makes the output start a JSON object.

        Unconstrained, this base model echoes the prompt instead.
        """
        response = client.chat(
            model=model_runtime.model,
            messages=[{"role": "user", "content": "Describe Paris."}],
            format="json",
            options=GREEDY | {"num_predict": 16},
            stream=False,
        )

        assert response.message.content.lstrip().startswith("{")

    def test_stream_ends_with_done(self, client, model_runtime):
        """Streaming yields text chunks, then one done chunk."""
        chunks = list(
            client.chat(
                model=model_runtime.model,
                messages=[{"role": "user", "content": "Tell me about Paris."}],
                options=GREEDY | {"num_predict": 16},
                stream=True,
            )
        )

        assert len(chunks) > 2
        assert [False] * (len(chunks) - 1) == [c.done for c in chunks[:-1]]
        last = chunks[-1]
        assert last.done is True
        assert "length" == last.done_reason
        assert 16 == last.eval_count
        assert "".join(c.message.content for c in chunks[:-1])

    def test_stream_text_equals_whole_reply(self, client, model_runtime):
        """Streamed chunks join to the non-streamed reply."""
        text = "Tell me about Paris."
        whole = chat_once(client, model_runtime, text, num_predict=16)
        chunks = client.chat(
            model=model_runtime.model,
            messages=[{"role": "user", "content": text}],
            options=GREEDY | {"num_predict": 16},
            stream=True,
        )

        streamed = "".join(c.message.content for c in chunks)
        assert whole.message.content == streamed

    def test_empty_messages_only_load(self, client, model_runtime):
        """Chat without messages answers done_reason "load", like Ollama."""
        response = client.chat(model=model_runtime.model, messages=[])

        assert "load" == response.done_reason
        assert "" == response.message.content

    def test_unknown_model_raises_404(self, client):
        """A model the runtime does not serve gives Ollama's 404."""
        with pytest.raises(ollama.ResponseError) as raised:
            client.chat(
                model="llama3:8b",
                messages=[{"role": "user", "content": "Hello."}],
            )

        assert 404 == raised.value.status_code
        assert (
            'model "llama3:8b" not found, try pulling it first'
            == raised.value.error
        )

    def test_untagged_name_matches_latest(self, model_runtime):
        """ "gemma3" means "gemma3:latest", which is not "gemma3:270m"."""
        response = httpx.post(
            model_runtime.host + "/api/chat",
            json={"model": "gemma3", "messages": [], "stream": False},
        )

        assert 404 == response.status_code

    def test_oversized_schema_rejected_400(self, client, model_runtime):
        """A schema llama.cpp cannot compile is a 400, not a crash."""
        schema = {
            "type": "object",
            "properties": {"text": {"type": "string", "maxLength": 2000}},
        }

        with pytest.raises(ollama.ResponseError) as raised:
            client.chat(
                model=model_runtime.model,
                messages=[{"role": "user", "content": "Hello."}],
                format=schema,
            )

        assert 400 == raised.value.status_code
        assert "too large" in raised.value.error
        assert None is model_runtime.process.poll()
        assert client.list().models

    def test_unsupported_role_rejected_400(self, model_runtime):
        """Roles other than system, user and assistant are a 400."""
        response = httpx.post(
            model_runtime.host + "/api/chat",
            json={
                "model": model_runtime.model,
                "messages": [{"role": "tool", "content": "42"}],
            },
        )

        assert 400 == response.status_code
        assert "role" in response.json()["error"]

    def test_wrong_option_type_rejected_400(self, client, model_runtime):
        """A non-numeric temperature is a 400 that names the option."""
        with pytest.raises(ollama.ResponseError) as raised:
            client.chat(
                model=model_runtime.model,
                messages=[{"role": "user", "content": "Hello."}],
                options={"temperature": "hot"},
            )

        assert 400 == raised.value.status_code
        assert 'option "temperature" must be a number' == raised.value.error


class TestGenerate:
    def test_generate_returns_response(self, client, model_runtime):
        """generate() with a system prompt returns text and counts."""
        response = client.generate(
            model=model_runtime.model,
            prompt="Why is the sky blue?",
            system="Answer briefly.",
            options=GREEDY | {"num_predict": 12},
        )

        assert response.response
        assert response.done is True
        assert 12 == response.eval_count

    def test_raw_generate_continues_text(self, client, model_runtime):
        """raw=True continues the prompt without the chat layout."""
        response = client.generate(
            model=model_runtime.model,
            prompt="The capital of France is",
            raw=True,
            options=GREEDY | {"num_predict": 12},
        )

        assert response.response.strip()
        assert "length" == response.done_reason

    def test_streamed_generate_ends_done(self, client, model_runtime):
        """Streaming generate() ends with a done chunk."""
        chunks = list(
            client.generate(
                model=model_runtime.model,
                prompt="Paris is",
                raw=True,
                options=GREEDY | {"num_predict": 8},
                stream=True,
            )
        )

        assert chunks[-1].done is True
        assert "".join(c.response for c in chunks)


class TestRequestErrors:
    def test_malformed_body_returns_400(self, model_runtime):
        """A body that is not JSON is a 400 with an error field."""
        response = httpx.post(
            model_runtime.host + "/api/chat",
            content=b'{"model": "gemma3:270m", ',
            headers={"Content-Type": "application/json"},
        )

        assert 400 == response.status_code
        assert response.json()["error"].startswith(
            "request body is not valid JSON"
        )

    def test_non_object_body_returns_400(self, model_runtime):
        """A JSON array as body is a 400."""
        response = httpx.post(model_runtime.host + "/api/chat", json=[1])

        assert 400 == response.status_code
        assert (
            "request body must be a JSON object" == (response.json()["error"])
        )

    def test_missing_model_returns_400(self, model_runtime):
        """A chat without a model name is a 400."""
        response = httpx.post(
            model_runtime.host + "/api/chat", json={"messages": []}
        )

        assert 400 == response.status_code
        assert "model is required" == response.json()["error"]

    def test_oversized_body_returns_413(self, client, model_runtime):
        """A body over 1 MiB is a 413 through the ollama client."""
        with pytest.raises(ollama.ResponseError) as raised:
            client.chat(
                model=model_runtime.model,
                messages=[{"role": "user", "content": "x" * (1 << 20)}],
            )

        assert 413 == raised.value.status_code

    def test_wrong_method_returns_405(self, model_runtime):
        """GET on a POST route is a 405."""
        response = httpx.get(model_runtime.host + "/api/chat")

        assert 405 == response.status_code

    def test_unknown_path_returns_404(self, model_runtime):
        """A path outside the API is a 404 with an error field."""
        response = httpx.get(model_runtime.host + "/api/pull")

        assert 404 == response.status_code
        assert "path /api/pull not found" == response.json()["error"]


def http_request_entries(model_runtime) -> list[dict]:
    return [
        entry
        for entry in model_runtime.log_entries()
        if entry.get("event") == "http request"
    ]


def wait_for_entries(model_runtime, count: int) -> list[dict]:
    """Poll the log until it has `count` request lines, or 10 s pass.

    The runtime writes a request's line just after sending the reply.
    """
    deadline = time.monotonic() + 10
    entries = http_request_entries(model_runtime)
    while len(entries) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        entries = http_request_entries(model_runtime)

    return entries


class TestRequestLog:
    def test_log_has_one_line_per_request(self, model_runtime):
        """Each request logs method, path, status and duration."""
        before = len(http_request_entries(model_runtime))
        httpx.get(model_runtime.host + "/api/version")

        entries = wait_for_entries(model_runtime, before + 1)
        assert before + 1 == len(entries)
        entry = entries[-1]
        assert "GET" == entry["method"]
        assert "/api/version" == entry["path"]
        assert 200 == entry["status"]
        assert entry["duration_ms"] >= 0
        assert "model-runtime" == entry["service"]

    def test_log_omits_message_content(self, client, model_runtime):
        """Neither the prompt nor the reply reaches the log."""
        before = len(http_request_entries(model_runtime))
        response = chat_once(
            client,
            model_runtime,
            "Patient takes Zorblaxin 40 mg for Quendrel syndrome.",
            num_predict=24,
        )
        entries = wait_for_entries(model_runtime, before + 1)

        assert 24 == entries[-1]["eval_count"]
        log_text = model_runtime.log_text()
        assert "Zorblaxin" not in log_text
        assert "Quendrel" not in log_text
        assert response.message.content.strip()
        assert response.message.content.strip() not in log_text


class TestCancellation:
    def test_disconnect_stops_generation(self, model_runtime):
        """A client that gives up frees the model within a few tokens."""
        before = len(http_request_entries(model_runtime))
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                model_runtime.host + "/api/chat",
                json={
                    "model": model_runtime.model,
                    "messages": [{"role": "user", "content": "Tell a story."}],
                    "options": {"temperature": 0, "num_predict": 2000},
                    "stream": False,
                },
                timeout=1.0,
            )

        entries = wait_for_entries(model_runtime, before + 1)
        assert before + 1 == len(entries)
        # nginx's code for a client that closed the connection first.
        assert 499 == entries[-1]["status"]
        assert entries[-1]["eval_count"] < 2000


def stream_story(runtime, num_predict: int) -> Iterator:
    client = ollama.Client(host=runtime.host, timeout=60)

    return client.generate(
        model=runtime.model,
        prompt="Once upon a time",
        raw=True,
        options={"temperature": 0, "num_predict": num_predict},
        stream=True,
    )


class TestShutdown:
    def test_sigterm_lets_generation_finish(self, runtime_starter):
        """A generation shorter than the grace still gets its reply."""
        runtime = runtime_starter({"ARXIO_SHUTDOWN_GRACE_SECONDS": "30"})
        chunks = stream_story(runtime, 40)

        first = next(chunks)
        runtime.process.send_signal(signal.SIGTERM)
        rest = list(chunks)

        assert first.done is False
        assert rest[-1].done is True
        assert 40 == rest[-1].eval_count
        assert 0 == runtime.wait_for_exit()

    def test_sigterm_cancels_after_grace(self, runtime_starter):
        """After the grace, a running generation ends with an error."""
        runtime = runtime_starter({"ARXIO_SHUTDOWN_GRACE_SECONDS": "0.5"})
        chunks = stream_story(runtime, 3000)

        next(chunks)
        runtime.process.send_signal(signal.SIGTERM)
        with pytest.raises(ollama.ResponseError) as raised:
            list(chunks)

        assert "model runtime is stopping" == raised.value.error
        assert 0 == runtime.wait_for_exit()
        events = [e.get("event") for e in runtime.log_entries()]
        assert "cancelling generations after shutdown grace" in events
        assert "model runtime stopped" == events[-1]

    def test_stopping_runtime_rejects_requests(self, runtime_starter):
        """Requests that wait for the model while draining get 503."""
        runtime = runtime_starter({"ARXIO_SHUTDOWN_GRACE_SECONDS": "30"})
        chunks = stream_story(runtime, 60)
        next(chunks)
        runtime.process.send_signal(signal.SIGTERM)
        # Give the runtime time to start draining; the stream keeps going.
        time.sleep(0.5)

        with pytest.raises(httpx.TransportError):
            httpx.post(runtime.host + "/api/generate", json={}, timeout=5)
        list(chunks)
        assert 0 == runtime.wait_for_exit()
