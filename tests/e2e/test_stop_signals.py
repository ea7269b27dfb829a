"""SIGTERM or a second Ctrl-C to a process running a suite: nothing is left.

The suite's children start in sessions of their own, so a signal to the
process that started them reaches none of them. A driver process starts a
suite through `own_stack`, as pytest and the soak do, and gets the
signals. Afterwards no process of that suite may be alive.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from services.launcher.stack import REPO_ROOT

pytestmark = pytest.mark.e2e

PIDS_PREFIX = "suite-pids "
DRIVER = f"""
import json, time
from tests.suite import own_stack

with own_stack() as stack:
    pids = [child.process.pid for child in stack.children]
    pids.append(stack.database_pid())
    print({PIDS_PREFIX!r} + json.dumps(pids), flush=True)
    while True:
        time.sleep(1)
"""
START_TIMEOUT = 240.0
EXIT_TIMEOUT = 120.0


class DriverOutput:
    """The driver's output lines, read on a thread of their own.

    A thread, because a leftover process that inherited the pipe would
    keep a blocking read waiting after the driver exited.
    """

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(
            target=self._read, args=(stream,), daemon=True
        )
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, marker: str, timeout: float) -> str:
        """Return the first line that contains `marker`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if marker in line:
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"no {marker!r} from the driver in {timeout:.0f} s:"
                        f" {self.tail()}"
                    )
                self._changed.wait(remaining)

    def tail(self) -> str:
        return "".join(self.lines[-30:])


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_leftovers(pids: list[int]) -> None:
    """SIGKILL what a failed run left, by the pids the driver reported."""
    for pid in pids:
        if not alive(pid):
            continue
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize(
    "signals",
    [
        [signal.SIGTERM],
        [signal.SIGHUP],
        # The second Ctrl-C arrives while the first one's cleanup runs.
        [signal.SIGINT, signal.SIGINT],
    ],
    ids=["sigterm", "sighup", "double-sigint"],
)
def test_stop_signal_leaves_no_process(signals):
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Signals from this test only, not from the terminal's group.
        start_new_session=True,
    )
    output = DriverOutput(driver.stdout)
    pids: list[int] = []
    try:
        line = output.wait_for(PIDS_PREFIX, START_TIMEOUT)
        pids = json.loads(line.split(PIDS_PREFIX, 1)[1])
        pids += [p.pid for p in psutil.Process(driver.pid).children(True)]
        pids = sorted(set(pids))
        assert all(alive(pid) for pid in pids), "a child died before the test"
        driver.send_signal(signals[0])
        for number in signals[1:]:
            output.wait_for("process.stopped", EXIT_TIMEOUT)
            driver.send_signal(number)
        driver.wait(EXIT_TIMEOUT)
        left = [pid for pid in pids if alive(pid)]
        assert [] == [
            " ".join(psutil.Process(pid).cmdline())[:100] for pid in left
        ], f"driver output:\n{output.tail()}"
        assert driver.returncode != 0
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        kill_leftovers(pids)
