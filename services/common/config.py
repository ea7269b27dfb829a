"""Read a service's settings from environment variables, once, at start."""

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names it and the fix."""


class Environment:
    """Typed access to a mapping of environment variables."""

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._values = os.environ if values is None else values

    def text(self, name: str, default: str | None = None) -> str:
        value = self._values.get(name, "").strip()
        if value:
            return value
        if default is None:
            raise ConfigError(f"{name} is missing: set it in the environment")

        return default

    def optional(self, name: str) -> str | None:
        value = self._values.get(name, "").strip()

        return value or None

    def integer(
        self,
        name: str,
        default: int | None = None,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        raw = self.text(name, None if default is None else str(default))
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(
                f"{name}={raw!r} is invalid: expected a whole number"
            ) from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name}={value} is below the minimum {minimum}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{name}={value} is above the maximum {maximum}")

        return value

    def number(self, name: str, default: float, minimum: float = 0) -> float:
        raw = self.text(name, str(default))
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(
                f"{name}={raw!r} is invalid: expected a number"
            ) from None
        if value < minimum:
            raise ConfigError(f"{name}={value} is below the minimum {minimum}")

        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.text(name, "true" if default else "false").lower()
        if raw not in ("true", "false"):
            raise ConfigError(
                f"{name}={raw!r} is invalid: expected true or false"
            )

        return raw == "true"

    def port(self, name: str, default: int | None = None) -> int:
        return self.integer(name, default, minimum=0, maximum=65535)

    def file(self, name: str, default: str | None = None) -> Path:
        path = Path(self.text(name, default))
        if not path.is_file():
            raise ConfigError(
                f"{name}={str(path)!r} is not a readable file: run "
                "`make certs` or point it at an existing file"
            )

        return path

    def names(self, name: str, default: str) -> frozenset[str]:
        raw = self.text(name, default)

        return frozenset(part.strip() for part in raw.split(",") if part)


@dataclass(frozen=True)
class TlsConfig:
    """Certificate files of a service's mutual-TLS identity."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def from_env(cls, env: Environment) -> "TlsConfig":
        return cls(
            ca_file=env.file("ARXIO_TLS_CA"),
            cert_file=env.file("ARXIO_TLS_CERT"),
            key_file=env.file("ARXIO_TLS_KEY"),
        )


@dataclass(frozen=True)
class ServerConfig:
    """Settings every service's gRPC server shares."""

    host: str
    port: int
    tls: TlsConfig
    # Common names of client certificates allowed to call the service.
    allowed_peers: frozenset[str]
    # Seconds that in-flight RPCs get to finish after SIGTERM.
    shutdown_grace: float
    # Plaintext port serving only grpc.health.v1, for probes that cannot
    # present a client certificate (Kubernetes' gRPC probes); None serves
    # no such port.
    health_port: int | None = None

    @classmethod
    def from_env(cls, env: Environment, default_port: int) -> "ServerConfig":
        health_port = None
        if env.optional("ARXIO_HEALTH_PORT") is not None:
            health_port = env.port("ARXIO_HEALTH_PORT")

        return cls(
            host=env.text("ARXIO_HOST", "127.0.0.1"),
            port=env.port("ARXIO_PORT", default_port),
            tls=TlsConfig.from_env(env),
            allowed_peers=env.names("ARXIO_ALLOWED_PEERS", "edge"),
            shutdown_grace=env.number("ARXIO_SHUTDOWN_GRACE_SECONDS", 10.0),
            health_port=health_port,
        )
