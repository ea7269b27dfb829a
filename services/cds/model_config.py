"""Settings of the model review, read from the environment at start."""

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import ollama
import pydantic

from services.cds.model_review import DEFAULT_OPTIONS
from services.common.config import ConfigError, Environment

DEFAULT_MODEL = "gemma3:270m"
# Model calls in flight at once. Set it to the number of requests the model
# server runs in parallel (OLLAMA_NUM_PARALLEL on Ollama): calls beyond
# that wait at the server, where no fair share applies. The default lets
# one call wait at a server that runs one at a time, so that the server
# does not idle between calls.
DEFAULT_CONCURRENCY = 2
# Ollama's keep_alive: a number of seconds, or a Go duration such as "5m"
# or "1h30m". A negative value keeps the model loaded indefinitely.
KEEP_ALIVE_PATTERN = re.compile(
    r"-?(\d+(\.\d*)?|\.\d+)"
    r"|-?((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+"
)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def checked_ollama_host(value: str) -> str:
    """Accept an Ollama URL on loopback, or over TLS anywhere else."""
    if "://" not in value:
        value = "http://" + value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"OLLAMA_HOST={value!r} is invalid: expected http://HOST:PORT "
            "or https://HOST:PORT"
        )
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ConfigError(
            f"OLLAMA_HOST={value!r} sends patient data unencrypted off this "
            "machine: use https:// or a loopback address"
        )

    return value


def parse_keep_alive(value: str | None) -> str | float | None:
    """Convert ARXIO_MODEL_KEEP_ALIVE to the value Ollama's API takes."""
    if value is None:
        return None
    if not KEEP_ALIVE_PATTERN.fullmatch(value):
        raise ConfigError(
            f"ARXIO_MODEL_KEEP_ALIVE={value!r} is invalid: expected seconds "
            'such as "300" or a duration such as "5m" or "1h30m"'
        )
    try:
        return float(value)
    except ValueError:
        return value


def parse_options(value: str | None) -> dict[str, Any]:
    """Merge ARXIO_MODEL_OPTIONS, a JSON object, over DEFAULT_OPTIONS.

    Names and types are those of Ollama's model options (temperature,
    num_ctx, seed, top_p and so on) as the `ollama` client declares them.
    A null value removes a default, which leaves the choice to the server.
    """
    options = dict(DEFAULT_OPTIONS)
    if value is None:
        return options
    try:
        overrides = json.loads(value)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"ARXIO_MODEL_OPTIONS is not valid JSON ({error.msg} at "
            f"character {error.pos}): expected an object such as "
            '{"temperature": 0, "num_ctx": 4096}'
        ) from None
    if not isinstance(overrides, dict):
        raise ConfigError(
            "ARXIO_MODEL_OPTIONS must be a JSON object such as "
            '{"temperature": 0, "num_ctx": 4096}'
        )
    known = ollama.Options.model_fields
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(
            f"ARXIO_MODEL_OPTIONS has unknown options {unknown}: use "
            f"Ollama's option names, one of {sorted(known)}"
        )
    try:
        checked = ollama.Options.model_validate(
            {k: v for k, v in overrides.items() if v is not None},
            strict=True,
        )
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
            for e in error.errors()
        )
        raise ConfigError(
            f"ARXIO_MODEL_OPTIONS has invalid values ({problems}): fix "
            "their types"
        ) from None
    for name, option in overrides.items():
        if option is None:
            options.pop(name, None)
        else:
            options[name] = checked[name]

    return options


@dataclass(frozen=True)
class ModelConfig:
    """Settings of the model calls and of the guards around them."""

    ollama_host: str
    model: str = DEFAULT_MODEL
    # Seconds the whole model part of a review may take, the wait for a
    # slot and the connection included, before the findings return without
    # it.
    timeout: float = 30.0
    # Model calls in flight at once, across all organizations.
    concurrency: int = DEFAULT_CONCURRENCY
    # Ollama's keep_alive for the model; None leaves the server's default.
    keep_alive: str | float | None = None
    options: dict[str, Any] = field(
        default_factory=lambda: dict(DEFAULT_OPTIONS)
    )
    # Consecutive failures that open the circuit breaker.
    breaker_failures: int = 5
    # Seconds the open breaker skips the model before one trial call.
    breaker_cooldown: float = 30.0
    # Seconds between checks that the model server has the model.
    check_interval: float = 15.0

    @classmethod
    def from_env(cls, env: Environment) -> "ModelConfig":
        return cls(
            ollama_host=checked_ollama_host(env.text("OLLAMA_HOST")),
            model=env.text("ARXIO_MODEL", DEFAULT_MODEL),
            timeout=env.number(
                "ARXIO_MODEL_TIMEOUT_SECONDS", 30.0, minimum=0.1
            ),
            concurrency=env.integer(
                "ARXIO_MODEL_CONCURRENCY", DEFAULT_CONCURRENCY, minimum=1
            ),
            keep_alive=parse_keep_alive(
                env.optional("ARXIO_MODEL_KEEP_ALIVE")
            ),
            options=parse_options(env.optional("ARXIO_MODEL_OPTIONS")),
            breaker_failures=env.integer(
                "ARXIO_MODEL_BREAKER_FAILURES", 5, minimum=1
            ),
            breaker_cooldown=env.number(
                "ARXIO_MODEL_BREAKER_COOLDOWN_SECONDS", 30.0, minimum=0.1
            ),
            check_interval=env.number(
                "ARXIO_MODEL_CHECK_INTERVAL_SECONDS", 15.0, minimum=0.1
            ),
        )
