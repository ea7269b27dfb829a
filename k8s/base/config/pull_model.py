"""Pull the configured model into every Ollama pod, then load it.

The `ollama-pull` Job runs this with the suite's image:

    python /etc/arxio/ollama-job/pull_model.py

Each pod of the Ollama StatefulSet keeps models on its own volume, so the
job calls every pod by its name under the headless Service, through the
pod's TLS proxy. A pod's readiness probe passes once the model is loaded.

Environment:
- ARXIO_MODEL: the model, for example gemma3:270m (required).
- OLLAMA_POD_HOST: host name of pod {index} in {namespace} (default
  ollama-{index}.ollama-pods.{namespace}.svc).
- OLLAMA_POD_PORT: the TLS proxy's port (default 11443).
- POD_NAMESPACE: the namespace (default arxio).
- OLLAMA_REPLICAS: the number of pods; by default, every pod whose name
  resolves, from index 0 until the first that does not.
- OLLAMA_CA_FILE: CA of the proxies' certificates (default
  /etc/arxio/tls/ca.crt).

Exits 0 once every pod has the model loaded, 1 when a pod failed (the Job
then retries) and 2 on invalid settings.
"""

import itertools
import json
import os
import socket
import ssl
import sys
import urllib.request
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger()

DEFAULT_HOST = "ollama-{index}.ollama-pods.{namespace}.svc"
# Seconds one pull may take without a byte of response: the API responds to a
# non-streamed pull only when the download ends.
PULL_TIMEOUT = 3600.0
LOAD_TIMEOUT = 600.0


class SettingsError(ValueError):
    pass


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False

    return True


def pod_hosts(
    pattern: str,
    namespace: str,
    replicas: int | None,
    resolves: Callable[[str], bool] = _resolves,
) -> list[str]:
    """Return the host name of every Ollama pod to call."""
    if replicas is not None:
        return [
            pattern.format(index=index, namespace=namespace)
            for index in range(replicas)
        ]
    if "{index}" not in pattern:
        raise SettingsError(
            f"OLLAMA_POD_HOST={pattern!r} has no {{index}}: set "
            "OLLAMA_REPLICAS, or name each pod by its index"
        )
    hosts = []
    for index in itertools.count():
        host = pattern.format(index=index, namespace=namespace)
        if not resolves(host):
            break
        hosts.append(host)

    return hosts


def _post(
    context: ssl.SSLContext, url: str, body: dict, timeout: float
) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(
        request, timeout=timeout, context=context
    ) as response:
        return json.loads(response.read() or b"{}")


def pull_and_load(context: ssl.SSLContext, base_url: str, model: str) -> None:
    """Pull `model` on one Ollama server, then load it into memory.

    An empty generate request only loads the model; keep_alive -1 keeps it
    loaded until the server stops.
    """
    reply = _post(
        context,
        f"{base_url}/api/pull",
        {"model": model, "stream": False},
        PULL_TIMEOUT,
    )
    if reply.get("status") != "success":
        raise RuntimeError(f"pull of {model} ended with {reply!r}")
    _post(
        context,
        f"{base_url}/api/generate",
        {"model": model, "keep_alive": -1, "stream": False},
        LOAD_TIMEOUT,
    )


def run(environment: Mapping[str, str]) -> int:
    model = environment.get("ARXIO_MODEL", "").strip()
    if not model:
        raise SettingsError("ARXIO_MODEL is missing: set the model to pull")
    replicas_text = environment.get("OLLAMA_REPLICAS", "").strip()
    try:
        replicas = int(replicas_text) if replicas_text else None
    except ValueError:
        raise SettingsError(
            f"OLLAMA_REPLICAS={replicas_text!r} is invalid: expected a whole "
            "number"
        ) from None
    hosts = pod_hosts(
        environment.get("OLLAMA_POD_HOST", DEFAULT_HOST),
        environment.get("POD_NAMESPACE", "arxio"),
        replicas,
    )
    if not hosts:
        log.error("ollama.no_pods", hint="is the StatefulSet running?")
        return 1
    port = environment.get("OLLAMA_POD_PORT", "11443")
    context = ssl.create_default_context(
        cafile=environment.get("OLLAMA_CA_FILE", "/etc/arxio/tls/ca.crt")
    )
    failed = 0
    for host in hosts:
        try:
            pull_and_load(context, f"https://{host}:{port}", model)
        except (OSError, RuntimeError, json.JSONDecodeError) as error:
            # urllib's HTTPError and URLError are OSErrors.
            failed += 1
            log.error(
                "ollama.pull_failed", host=host, model=model, error=str(error)
            )
            continue
        log.info("ollama.model_loaded", host=host, model=model)

    return 1 if failed else 0


def main() -> int:
    from services.common.logging import configure_logging

    configure_logging("ollama-pull")
    try:
        return run(os.environ)
    except SettingsError as error:
        log.error("ollama.settings_invalid", error=str(error))
        return 2


if __name__ == "__main__":
    sys.exit(main())
