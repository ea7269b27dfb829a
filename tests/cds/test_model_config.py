"""Model settings read from the environment."""

import pytest

from services.cds.model_config import (
    DEFAULT_CONCURRENCY,
    ModelConfig,
    checked_ollama_host,
)
from services.cds.model_review import DEFAULT_OPTIONS
from services.common.config import ConfigError, Environment

HOST = "http://127.0.0.1:11434"


def config_from(**values: str) -> ModelConfig:
    return ModelConfig.from_env(Environment({"OLLAMA_HOST": HOST, **values}))


class TestModelConfig:
    def test_defaults(self):
        """Only OLLAMA_HOST is required."""
        config = config_from()

        assert HOST == config.ollama_host
        assert "gemma3:270m" == config.model
        assert 30.0 == config.timeout
        assert DEFAULT_CONCURRENCY == config.concurrency
        assert None is config.keep_alive
        assert DEFAULT_OPTIONS == config.options
        assert 5 == config.breaker_failures
        assert 30.0 == config.breaker_cooldown
        assert 15.0 == config.check_interval

    def test_every_variable_read(self):
        """Each variable sets its field."""
        config = config_from(
            ARXIO_MODEL="llama3.2:3b",
            ARXIO_MODEL_TIMEOUT_SECONDS="12.5",
            ARXIO_MODEL_CONCURRENCY="8",
            ARXIO_MODEL_KEEP_ALIVE="10m",
            ARXIO_MODEL_OPTIONS='{"num_ctx": 4096, "temperature": 0.2}',
            ARXIO_MODEL_BREAKER_FAILURES="2",
            ARXIO_MODEL_BREAKER_COOLDOWN_SECONDS="5",
            ARXIO_MODEL_CHECK_INTERVAL_SECONDS="60",
        )

        assert "llama3.2:3b" == config.model
        assert 12.5 == config.timeout
        assert 8 == config.concurrency
        assert "10m" == config.keep_alive
        assert 4096 == config.options["num_ctx"]
        assert 0.2 == config.options["temperature"]
        assert 0 == config.options["seed"]
        assert 2 == config.breaker_failures
        assert 5.0 == config.breaker_cooldown
        assert 60.0 == config.check_interval

    def test_missing_host_rejected(self):
        """OLLAMA_HOST has no default."""
        with pytest.raises(ConfigError, match="OLLAMA_HOST is missing"):
            ModelConfig.from_env(Environment({}))

    @pytest.mark.parametrize(
        ("value", "expected"),
        [("300", 300.0), ("-1", -1.0), ("0", 0.0), ("1h30m", "1h30m")]
        + [("5m", "5m"), ("-1s", "-1s"), ("0.5h", "0.5h")],
    )
    def test_keep_alive_forms(self, value, expected):
        """Seconds become a number; Go durations pass as text."""
        assert expected == config_from(ARXIO_MODEL_KEEP_ALIVE=value).keep_alive

    @pytest.mark.parametrize("value", ["5 minutes", "m", "5d", "1h-30m"])
    def test_invalid_keep_alive_rejected(self, value):
        """A value Ollama would not parse fails at start."""
        with pytest.raises(ConfigError, match="ARXIO_MODEL_KEEP_ALIVE="):
            config_from(ARXIO_MODEL_KEEP_ALIVE=value)

    def test_null_option_removes_default(self):
        """null leaves an option to the model server."""
        config = config_from(ARXIO_MODEL_OPTIONS='{"seed": null}')

        assert "seed" not in config.options
        assert 0 == config.options["temperature"]

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ("{temperature: 0}", "ARXIO_MODEL_OPTIONS is not valid JSON"),
            ("[1, 2]", "must be a JSON object"),
            ('{"temprature": 0}', r"unknown options \['temprature'\]"),
            ('{"num_ctx": "4096"}', "num_ctx"),
            ('{"num_ctx": 1.5}', "num_ctx"),
        ],
    )
    def test_invalid_options_rejected(self, value, message):
        """Options must be a JSON object of Ollama's names and types."""
        with pytest.raises(ConfigError, match=message):
            config_from(ARXIO_MODEL_OPTIONS=value)

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("ARXIO_MODEL_CONCURRENCY", "0"),
            ("ARXIO_MODEL_BREAKER_FAILURES", "0"),
            ("ARXIO_MODEL_TIMEOUT_SECONDS", "0"),
            ("ARXIO_MODEL_BREAKER_COOLDOWN_SECONDS", "0"),
            ("ARXIO_MODEL_CHECK_INTERVAL_SECONDS", "0"),
        ],
    )
    def test_values_below_minimum_rejected(self, name, value):
        """Counts start at 1 and durations above 0."""
        with pytest.raises(ConfigError, match=f"{name}="):
            config_from(**{name: value})


class TestOllamaHost:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("127.0.0.1:11434", "http://127.0.0.1:11434"),
            ("http://localhost:11434", "http://localhost:11434"),
            ("http://[::1]:11434", "http://[::1]:11434"),
            ("https://ollama.example:443", "https://ollama.example:443"),
        ],
    )
    def test_loopback_or_tls_accepted(self, value, expected):
        """Plain HTTP only on loopback; TLS anywhere."""
        assert expected == checked_ollama_host(value)

    def test_plain_http_off_machine_rejected(self):
        """Patient data must not leave the machine unencrypted."""
        with pytest.raises(ConfigError, match="unencrypted"):
            checked_ollama_host("http://ollama.example:11434")
