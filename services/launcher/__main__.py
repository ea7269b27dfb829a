"""`make run`: start the whole suite in the foreground; Ctrl-C stops it."""

import os
import signal
import threading

import structlog

from services.common.config import ConfigError, Environment
from services.common.logging import configure_logging
from services.launcher.edge_guards import parse_cors_origins
from services.launcher.stack import REPO_ROOT, Stack, StackSettings

log = structlog.get_logger()


def settings_from_env(env: Environment) -> StackSettings:
    return StackSettings(
        run_dir=REPO_ROOT / ".run",
        edge_port=env.port("ARXIO_EDGE_PORT", 8443),
        database_url=env.optional("DATABASE_URL"),
        service_database_urls={
            service: url
            for service in ("auth", "audit", "billing", "cds")
            if (url := env.optional(f"ARXIO_{service.upper()}_DATABASE_URL"))
        },
        ollama_host=env.optional("OLLAMA_HOST"),
        model=env.text("ARXIO_MODEL", "gemma3:270m"),
        trusted_hops=env.integer(
            "ARXIO_TRUSTED_PROXY_HOPS", 0, minimum=0, maximum=10
        ),
        billing_environment=billing_environment(),
        cors_origins=cors_origins(env),
    )


def cors_origins(env: Environment) -> tuple[str, ...]:
    """Return the origins in ARXIO_CORS_ORIGINS, comma-separated."""
    try:
        return parse_cors_origins(env.text("ARXIO_CORS_ORIGINS", ""))
    except ValueError as error:
        raise ConfigError(f"ARXIO_CORS_ORIGINS: {error}") from None


def billing_environment() -> dict[str, str]:
    """Return the launcher's STRIPE_* and ARXIO_BILLING_* variables."""
    return {
        name: value
        for name, value in os.environ.items()
        if name.startswith(("STRIPE_", "ARXIO_BILLING_")) and value.strip()
    }


def main() -> None:
    configure_logging("launcher")
    try:
        settings = settings_from_env(Environment())
    except ConfigError as error:
        log.error("launcher.config_invalid", error=str(error))
        raise SystemExit(2) from None
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stopping.set())
    stack = Stack(settings).start()
    print(
        f"arxio is running: https://localhost:{stack.edge_port} "
        f"(CA certificate {stack.certs_dir / 'ca.crt'}). Ctrl-C stops it.",
        flush=True,
    )
    try:
        while not stopping.wait(1.0):
            for child in stack.children:
                if not child.running():
                    log.error("launcher.child_exited", name=child.name)
                    stopping.set()
    finally:
        log.info("launcher.stopping")
        stack.stop()


if __name__ == "__main__":
    main()
