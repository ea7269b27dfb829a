"""Start, watch and stop the suite's child processes."""

import contextlib
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import structlog

log = structlog.get_logger()

# Signals that end a run from outside: a CI timeout or `kill` sends
# SIGTERM, and a closed terminal sends SIGHUP.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signal_number: int, frame: object) -> None:
    name = signal.Signals(signal_number).name
    raise KeyboardInterrupt(f"received {name}")


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Make SIGTERM and SIGHUP raise KeyboardInterrupt inside the block.

    Children start in sessions of their own, so a signal to the parent
    reaches none of them, and only the parent's `finally` blocks stop them.
    Those blocks run on an exception, as after Ctrl-C, but not when a
    signal's default action ends the process. The exception is
    KeyboardInterrupt, not SystemExit, because pytest reports SystemExit
    as one failed test and goes on. Outside the main thread, where Python
    cannot set handlers, this does nothing.
    """
    if not _in_main_thread():
        yield
        return
    previous = {
        number: signal.signal(number, _raise_interrupt)
        for number in STOP_SIGNALS
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def interrupts_ignored() -> Iterator[None]:
    """Ignore SIGINT, SIGTERM and SIGHUP inside the block.

    Cleanup runs in it, so that a second Ctrl-C or a SIGTERM that follows
    the first cannot stop it halfway and leave children running. Outside
    the main thread this does nothing.
    """
    if not _in_main_thread():
        yield
        return
    numbers = (signal.SIGINT, *STOP_SIGNALS)
    previous = {
        number: signal.signal(number, signal.SIG_IGN) for number in numbers
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


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
    # True from start() until the process group got its SIGKILL; after that
    # the group id may belong to an unrelated process.
    _group_alive: bool = field(default=False, init=False, repr=False)

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
        self._group_alive = True
        log.info("process.started", name=self.name, pid=self.process.pid)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_file is None or not self.log_file.exists():
            return "(output went to the launcher's stderr)"
        text = self.log_file.read_text(errors="replace").splitlines()

        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """Send SIGTERM, wait up to `timeout` seconds, then SIGKILL.

        Whatever the process left in its process group gets SIGKILL too.
        Calling it again once the process has stopped does nothing.
        """
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
        self._kill_group()
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """Stop the process with SIGKILL, as a crash would, and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
            log.info("process.killed", name=self.name)
        self._kill_group()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _kill_group(self) -> None:
        """Send SIGKILL to what is left of the child's process group.

        The child leads a session of its own (start_new_session), so its
        process group id is its pid, and that group lives on while any
        process the child started is in it.
        """
        if self.process is None or not self._group_alive:
            return
        self._group_alive = False
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except PermissionError as error:
            log.warning(
                "process.group_kill_failed",
                name=self.name,
                process_group=self.process.pid,
                error=str(error),
            )
            return
        log.info("process.group_killed", name=self.name)


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
