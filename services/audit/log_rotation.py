"""Settings and Envoy admin calls of the access-log rotation.

The audit ingester rotates the edge's access-log file so that it does not
fill its volume. Past ARXIO_AUDIT_LOG_MAX_BYTES it renames the file to
`<file>.rotated` and requests that Envoy reopen its access logs, which
creates a new file. Then it reads the renamed file to its end and deletes
it. The steps are in `AuditIngester` (services/audit/ingest.py).
"""

import ipaddress
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.common.config import ConfigError, Environment

# About 160,000 requests: an estimate from lines of 330 bytes (a request
# without a key) to 440 bytes (with an organization and key id).
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# Envoy's admin port in the Kubernetes pod (services/launcher/k8s_render.py).
DEFAULT_ENVOY_ADMIN_URL = "http://127.0.0.1:9901"
REOPEN_TIMEOUT_SECONDS = 2.0


def rotated_path(path: Path) -> Path:
    """Return the name a rotated log file has until it is deleted."""
    return path.with_name(path.name + ".rotated")


def _loopback_admin_url(name: str, url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    try:
        port = parsed.port
        loopback = parsed.hostname == "localhost" or (
            ipaddress.ip_address(parsed.hostname or "").is_loopback
        )
    except ValueError:
        port, loopback = None, False
    if (
        parsed.scheme != "http"
        or not loopback
        or port is None
        or parsed.path not in ("", "/")
        or parsed.query
    ):
        raise ConfigError(
            f"{name}={url!r} is invalid: use http://127.0.0.1:PORT with the "
            "port of Envoy's admin listener, which listens on loopback only"
        )

    return url.rstrip("/")


@dataclass(frozen=True)
class RotationSettings:
    # Size in bytes past which the ingester rotates the file; 0 never
    # rotates it.
    max_bytes: int
    # Envoy's admin interface, where POST /reopen_logs makes Envoy close
    # its access-log files and open them again by name.
    envoy_admin_url: str

    @classmethod
    def from_env(cls, env: Environment) -> "RotationSettings":
        return cls(
            max_bytes=env.integer(
                "ARXIO_AUDIT_LOG_MAX_BYTES", DEFAULT_MAX_BYTES, minimum=0
            ),
            envoy_admin_url=_loopback_admin_url(
                "ARXIO_ENVOY_ADMIN_URL",
                env.text("ARXIO_ENVOY_ADMIN_URL", DEFAULT_ENVOY_ADMIN_URL),
            ),
        )


async def reopen_envoy_logs(admin_url: str) -> None:
    """Ask Envoy to reopen its access logs; raise httpx.HTTPError if not.

    Envoy's flush thread closes the old file and opens the new one after
    this returns, then writes its buffered lines to the new file.
    """
    # trust_env off: a proxy from the environment must not get this call.
    async with httpx.AsyncClient(
        timeout=REOPEN_TIMEOUT_SECONDS, trust_env=False
    ) as client:
        response = await client.post(f"{admin_url}/reopen_logs")
        response.raise_for_status()
