"""Pull the configured model into every Ollama pod, then load it.

The `ollama-pull` Job runs this with the suite's image:

    python /etc/arxio/ollama-job/pull_model.py

Each pod of the Ollama StatefulSet keeps models on its own volume, so the
job calls every pod by its stable name under the headless Service
ollama-pods, through the pod's TLS proxy. It waits for each of the
OLLAMA_REPLICAS pods in turn: a pod that is still being scheduled has no
address and so no DNS record yet. A pod's readiness probe passes once its
model is loaded.

The pull streams Ollama's progress lines, so a proxy's idle timeout does
not cut it while bytes arrive. An attempt that fails (the stream cut, no
byte for OLLAMA_PULL_READ_TIMEOUT_SECONDS, an error from Ollama) is
retried after a growing pause, and Ollama resumes the download where it
stopped.

Environment:
- ARXIO_MODEL: the model, for example gemma3:270m (required).
- OLLAMA_REPLICAS: the number of pods, the StatefulSet's replicas
  (required).
- OLLAMA_POD_HOST: host name of pod {index} in {namespace} (default
  ollama-{index}.ollama-pods.{namespace}.svc).
- OLLAMA_POD_PORT: the TLS proxy's port (default 11443).
- POD_NAMESPACE: the namespace (default arxio).
- OLLAMA_CA_FILE: CA of the proxies' certificates (default
  /etc/arxio/tls/ca.crt).
- OLLAMA_WAIT_SECONDS: how long to wait for each pod to resolve and
  answer (default 1800).
- OLLAMA_PULL_ATTEMPTS: attempts of the pull, and of the load, per pod
  (default 8).
- OLLAMA_PULL_READ_TIMEOUT_SECONDS: seconds without a byte from the pod
  before an attempt is abandoned (default 600).
- OLLAMA_RETRY_MAX_SECONDS: the longest pause between attempts (default
  60); pauses start at 2 s and double.

Exits 0 once every pod has the model loaded, 1 when a pod failed (the Job
then runs it again, up to its backoffLimit) and 2 on invalid settings.

    python /etc/arxio/ollama-job/pull_model.py keep-loaded

runs in each Ollama pod, beside Ollama, and never exits. It loads the
model again whenever Ollama has it on disk but not in memory, as after a
restart of the pod or of Ollama. It calls Ollama on loopback
(OLLAMA_LOCAL_URL, default http://127.0.0.1:11434), checks every
OLLAMA_CHECK_SECONDS (default 30), and retries a failed load after a pause
of 2 s that doubles to OLLAMA_RETRY_MAX_SECONDS.
"""

import http.client
import json
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

log = structlog.get_logger()

DEFAULT_HOST = "ollama-{index}.ollama-pods.{namespace}.svc"
# Seconds that loading a model into memory may take.
LOAD_TIMEOUT = 600.0
# Seconds of one readiness call to a pod's proxy while waiting for it.
VERSION_TIMEOUT = 10.0
FIRST_PAUSE = 2.0
# Errors of one attempt that a later attempt may not meet: network and
# HTTP failures (urllib's errors are OSErrors, a cut chunked stream is an
# http.client.IncompleteRead), a malformed line, an error from Ollama.
RETRIED_ERRORS = (
    OSError,
    http.client.HTTPException,
    json.JSONDecodeError,
    RuntimeError,
)


class SettingsError(ValueError):
    pass


class PullFailed(RuntimeError):
    """One attempt of a pull or load ended without success."""


class PodUnavailable(RuntimeError):
    """A pod did not resolve or respond within OLLAMA_WAIT_SECONDS."""


@dataclass(frozen=True)
class Settings:
    model: str
    hosts: tuple[str, ...]
    port: str
    ca_file: str
    wait_seconds: float
    attempts: int
    read_timeout: float
    retry_max_seconds: float


def _number(
    environment: Mapping[str, str], name: str, default: float, minimum: float
) -> float:
    text = environment.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise SettingsError(
            f"{name}={text!r} is invalid: expected a number"
        ) from None
    if value < minimum:
        raise SettingsError(f"{name}={text} is below the minimum {minimum}")

    return value


def _whole_number(
    environment: Mapping[str, str], name: str, default: int | None
) -> int:
    text = environment.get(name, "").strip()
    if not text:
        if default is None:
            raise SettingsError(
                f"{name} is missing: set it to the StatefulSet's replicas"
            )
        return default
    try:
        value = int(text)
    except ValueError:
        raise SettingsError(
            f"{name}={text!r} is invalid: expected a whole number"
        ) from None
    if value < 1:
        raise SettingsError(f"{name}={value} is below the minimum 1")

    return value


def pod_hosts(pattern: str, namespace: str, replicas: int) -> list[str]:
    """Return the host name of each of the `replicas` Ollama pods."""
    if "{index}" not in pattern and replicas > 1:
        raise SettingsError(
            f"OLLAMA_POD_HOST={pattern!r} has no {{index}}: name each pod "
            "by its index, or set OLLAMA_REPLICAS=1"
        )

    return [
        pattern.format(index=index, namespace=namespace)
        for index in range(replicas)
    ]


def settings_from(environment: Mapping[str, str]) -> Settings:
    model = environment.get("ARXIO_MODEL", "").strip()
    if not model:
        raise SettingsError("ARXIO_MODEL is missing: set the model to pull")
    replicas = _whole_number(environment, "OLLAMA_REPLICAS", None)
    hosts = pod_hosts(
        environment.get("OLLAMA_POD_HOST", DEFAULT_HOST),
        environment.get("POD_NAMESPACE", "arxio"),
        replicas,
    )

    return Settings(
        model=model,
        hosts=tuple(hosts),
        port=environment.get("OLLAMA_POD_PORT", "11443"),
        ca_file=environment.get("OLLAMA_CA_FILE", "/etc/arxio/tls/ca.crt"),
        wait_seconds=_number(environment, "OLLAMA_WAIT_SECONDS", 1800.0, 0),
        attempts=_whole_number(environment, "OLLAMA_PULL_ATTEMPTS", 8),
        read_timeout=_number(
            environment, "OLLAMA_PULL_READ_TIMEOUT_SECONDS", 600.0, 0.1
        ),
        retry_max_seconds=_number(
            environment, "OLLAMA_RETRY_MAX_SECONDS", 60.0, 0
        ),
    )


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False

    return True


def untrusted(error: BaseException) -> bool:
    """Return whether `error` is a failed certificate check, which a retry
    cannot heal. urllib wraps it in a URLError."""
    if isinstance(error, urllib.error.URLError):
        error = error.reason

    return isinstance(error, ssl.SSLCertVerificationError)


def _request(url: str, body: dict | None = None) -> urllib.request.Request:
    if body is None:
        return urllib.request.Request(url, method="GET")

    return urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )


class PodClient:
    """Calls to one Ollama pod's TLS proxy."""

    def __init__(
        self,
        context: ssl.SSLContext,
        host: str,
        settings: Settings,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        resolves: Callable[[str], bool] = _resolves,
    ) -> None:
        self._context = context
        self.host = host
        self._base_url = f"https://{host}:{settings.port}"
        self._settings = settings
        self._sleep = sleep
        self._clock = clock
        self._resolves = resolves

    def _pauses(self):
        """Yield the pause before each retry: 2 s, doubling to the max."""
        pause = FIRST_PAUSE
        while True:
            yield min(pause, self._settings.retry_max_seconds)
            pause *= 2

    def wait_until_up(self) -> None:
        """Wait until the pod's name resolves and its proxy responds.

        Raises PodUnavailable after OLLAMA_WAIT_SECONDS.
        """
        deadline = self._clock() + self._settings.wait_seconds
        pauses = self._pauses()
        while True:
            problem = self._check_up()
            if problem is None:
                return
            if self._clock() >= deadline:
                raise PodUnavailable(
                    f"{self.host} is not up after "
                    f"{self._settings.wait_seconds:g} s: {problem}"
                )
            pause = next(pauses)
            log.info(
                "ollama.waiting_for_pod",
                host=self.host,
                problem=problem,
                retry_in_seconds=pause,
            )
            self._sleep(pause)

    def _check_up(self) -> str | None:
        """Return what keeps the pod from being up, or None when it is."""
        if not self._resolves(self.host):
            return "its name does not resolve (no address yet)"
        try:
            with urllib.request.urlopen(
                _request(f"{self._base_url}/api/version"),
                timeout=VERSION_TIMEOUT,
                context=self._context,
            ) as response:
                response.read()
        except (OSError, http.client.HTTPException) as error:
            if untrusted(error):
                raise
            return f"{type(error).__name__}: {error}"

        return None

    def pull(self) -> None:
        """Pull the model, streaming Ollama's progress, in one attempt.

        Raises PullFailed when Ollama reports an error or the stream ends
        before its "success" line, and OSError when no byte arrives for
        OLLAMA_PULL_READ_TIMEOUT_SECONDS.
        """
        model = self._settings.model
        status = None
        with urllib.request.urlopen(
            _request(
                f"{self._base_url}/api/pull", {"model": model, "stream": True}
            ),
            timeout=self._settings.read_timeout,
            context=self._context,
        ) as response:
            for line in response:
                if not line.strip():
                    continue
                progress = json.loads(line)
                if "error" in progress:
                    raise PullFailed(f"Ollama reported: {progress['error']}")
                if progress.get("status") != status:
                    status = progress.get("status")
                    log.info(
                        "ollama.pull_progress", host=self.host, status=status
                    )
                if status == "success":
                    return
        raise PullFailed(f"the stream ended at status {status!r}")

    def load(self) -> None:
        """Load the model into memory until the server stops.

        An empty generate request only loads the model; keep_alive -1 keeps
        it loaded.
        """
        with urllib.request.urlopen(
            _request(
                f"{self._base_url}/api/generate",
                {
                    "model": self._settings.model,
                    "keep_alive": -1,
                    "stream": False,
                },
            ),
            timeout=LOAD_TIMEOUT,
            context=self._context,
        ) as response:
            reply = json.loads(response.read() or b"{}")
        if "error" in reply:
            raise PullFailed(f"Ollama reported: {reply['error']}")

    def retried(self, step: str, action: Callable[[], None]) -> None:
        """Run `action` up to OLLAMA_PULL_ATTEMPTS times."""
        pauses = self._pauses()
        attempts = self._settings.attempts
        for attempt in range(1, attempts + 1):
            try:
                action()
                return
            except RETRIED_ERRORS as error:
                if attempt == attempts or untrusted(error):
                    raise
                pause = next(pauses)
                log.warning(
                    "ollama.attempt_failed",
                    host=self.host,
                    step=step,
                    attempt=attempt,
                    attempts=attempts,
                    error=f"{type(error).__name__}: {error}",
                    retry_in_seconds=pause,
                )
                self._sleep(pause)


def prepare_pod(pod: PodClient) -> None:
    pod.wait_until_up()
    pod.retried("pull", pod.pull)
    pod.retried("load", pod.load)


def run_pods(
    settings: Settings,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    resolves: Callable[[str], bool] = _resolves,
) -> int:
    """Prepare each pod in turn; return the exit code."""
    context = ssl.create_default_context(cafile=settings.ca_file)
    failed = 0
    for host in settings.hosts:
        pod = PodClient(context, host, settings, sleep, clock, resolves)
        try:
            prepare_pod(pod)
        except (*RETRIED_ERRORS, PodUnavailable) as error:
            failed += 1
            log.error(
                "ollama.pull_failed",
                host=host,
                model=settings.model,
                error=f"{type(error).__name__}: {error}",
            )
            continue
        log.info("ollama.model_loaded", host=host, model=settings.model)

    return 1 if failed else 0


LOCAL_URL = "http://127.0.0.1:11434"
# Seconds of a status call (/api/ps, /api/show) to the local Ollama.
STATUS_TIMEOUT = 10.0


def tagged(model: str) -> str:
    """Return `model` with Ollama's implicit `:latest` tag when it has none.

    A colon before the last slash belongs to a registry's port, not a tag.
    """
    if ":" in model.rsplit("/", 1)[-1]:
        return model

    return f"{model}:latest"


class LocalLoader:
    """Keeps the model loaded in the Ollama server of its own pod."""

    def __init__(
        self,
        model: str,
        base_url: str = LOCAL_URL,
        retry_max_seconds: float = 60.0,
    ) -> None:
        self.model = model
        self._base_url = base_url.rstrip("/")
        self._retry_max_seconds = retry_max_seconds
        self._state = ""

    def _call(self, path: str, body: dict | None, timeout: float) -> dict:
        # No proxy from the environment: the server is on loopback.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(
            _request(f"{self._base_url}{path}", body), timeout=timeout
        ) as response:
            return json.loads(response.read() or b"{}")

    def loaded(self) -> bool:
        """Return whether the model is in memory, by Ollama's /api/ps."""
        running = self._call("/api/ps", None, STATUS_TIMEOUT)
        expected = tagged(self.model)

        return any(
            tagged(entry.get("name") or entry.get("model") or "") == expected
            for entry in running.get("models") or []
        )

    def on_disk(self) -> bool:
        """Return whether Ollama has the model pulled (404 when not)."""
        try:
            self._call("/api/show", {"model": self.model}, STATUS_TIMEOUT)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return False
            raise

        return True

    def load(self) -> None:
        """Load the model until the server stops: an empty generate request
        with keep_alive -1, as Ollama's documentation describes."""
        reply = self._call(
            "/api/generate",
            {"model": self.model, "keep_alive": -1, "stream": False},
            LOAD_TIMEOUT,
        )
        if "error" in reply:
            raise PullFailed(f"Ollama reported: {reply['error']}")

    def _report(self, state: str, event: str, **fields) -> None:
        """Log `event` when the state changes, so a steady state logs once."""
        if state != self._state:
            self._state = state
            log.info(event, model=self.model, **fields)

    def check_once(self) -> None:
        """Load the model if Ollama has it on disk but not in memory.

        Raises the errors in RETRIED_ERRORS when a call fails.
        """
        if self.loaded():
            self._report("loaded", "ollama.model_in_memory")
            return
        if not self.on_disk():
            self._report(
                "missing",
                "ollama.model_not_pulled",
                next_step="run the ollama-pull Job",
            )
            return
        log.info("ollama.model_loading", model=self.model)
        started = time.monotonic()
        self.load()
        self._state = "loaded"
        log.info(
            "ollama.model_loaded",
            model=self.model,
            duration_s=round(time.monotonic() - started, 1),
        )

    def run_forever(
        self,
        check_seconds: float,
        sleep: Callable[[float], None] = time.sleep,
        rounds: int | None = None,
    ) -> None:
        """Check every `check_seconds`; stop after `rounds` when given."""
        failures = 0
        done = 0
        while rounds is None or done < rounds:
            done += 1
            try:
                self.check_once()
            except RETRIED_ERRORS as error:
                pause = min(FIRST_PAUSE * 2**failures, self._retry_max_seconds)
                failures += 1
                self._state = "failed"
                log.warning(
                    "ollama.load_check_failed",
                    model=self.model,
                    attempt=failures,
                    error=f"{type(error).__name__}: {error}"[:300],
                    retry_in_seconds=pause,
                )
                sleep(pause)
                continue
            failures = 0
            sleep(check_seconds)


def keep_loaded(environment: Mapping[str, str]) -> None:
    model = environment.get("ARXIO_MODEL", "").strip()
    if not model:
        raise SettingsError("ARXIO_MODEL is missing: set the model to load")
    loader = LocalLoader(
        model,
        environment.get("OLLAMA_LOCAL_URL", LOCAL_URL),
        _number(environment, "OLLAMA_RETRY_MAX_SECONDS", 60.0, 0),
    )
    check_seconds = _number(environment, "OLLAMA_CHECK_SECONDS", 30.0, 1)
    log.info("ollama.keep_loaded_started", model=model)
    loader.run_forever(check_seconds)


def run(
    environment: Mapping[str, str],
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    return run_pods(settings_from(environment), sleep)


def main() -> int:
    from services.common.logging import configure_logging

    if sys.argv[1:] == ["keep-loaded"]:
        configure_logging("ollama-keep-loaded")
        try:
            keep_loaded(os.environ)
        except SettingsError as error:
            log.error("ollama.settings_invalid", error=str(error))
            return 2
        return 0
    configure_logging("ollama-pull")
    try:
        return run(os.environ)
    except SettingsError as error:
        log.error("ollama.settings_invalid", error=str(error))
        return 2


if __name__ == "__main__":
    sys.exit(main())
