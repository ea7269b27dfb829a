"""Start, watch and stop the suite's child processes."""

import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import structlog

log = structlog.get_logger()


def raise_open_file_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit.

    Children started afterwards inherit the limit, which Envoy needs for
    one descriptor per client connection. Returns the soft limit in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as error:
            log.warning(
                "process.open_file_limit_unchanged",
                soft=soft,
                hard=hard,
                error=str(error),
            )
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]

    return soft


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))

        return probe.getsockname()[1]


@dataclass
class ChildProcess:
    name: str
    command: list[str]
    environment: dict[str, str]
    # None: inherit the launcher's stderr, as `make run` does.
    log_file: Path | None = None
    process: subprocess.Popen | None = field(default=None, init=False)
    _log: IO | None = field(default=None, init=False, repr=False)

    def start(self) -> None:
        output = None
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_file.open("ab")
            output = self._log
        self.process = subprocess.Popen(
            self.command,
            env=self.environment,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT if output is not None else None,
            # Ctrl-C in `make run` reaches the launcher, which stops the
            # children in order, instead of every child at once.
            start_new_session=True,
        )
        log.info("process.started", name=self.name, pid=self.process.pid)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_file is None or not self.log_file.exists():
            return "(output went to the launcher's stderr)"
        text = self.log_file.read_text(errors="replace").splitlines()

        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("process.killed", name=self.name, timeout=timeout)
                self.process.kill()
                self.process.wait()
            log.info(
                "process.stopped",
                name=self.name,
                exit_code=self.process.returncode,
            )
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """Stop the process with SIGKILL, as a crash would, and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
            log.info("process.killed", name=self.name)
        if self._log is not None:
            self._log.close()
            self._log = None


def wait_until(
    child: ChildProcess,
    ready: Callable[[], bool],
    timeout: float,
    what: str,
) -> None:
    """Poll `ready` until it is true; fail early if the child exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.running():
            raise RuntimeError(
                f"{child.name} exited before it was {what}; its last output:"
                f"\n{child.log_tail()}"
            )
        try:
            if ready():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError(
        f"{child.name} was not {what} within {timeout:.0f} s; its last "
        f"output:\n{child.log_tail()}"
    )


def base_environment() -> dict[str, str]:
    """Return the launcher's environment without what children must not see."""
    environment = dict(os.environ)
    for name in ("ARXIO_OPERATOR_TOKEN", "DATABASE_URL", "OLLAMA_HOST"):
        environment.pop(name, None)

    return environment
