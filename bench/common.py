"""Helpers that the benchmarks under bench/ share.

Percentiles, the machine's description, the CPU time of processes, run
folders under .run and the sections of docs/benchmarks.md. Scripts run as
`python bench/NAME.py` put the checkout on sys.path and import this module
as `bench.common`.
"""

import http.client
import math
import os
import platform
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from services.common.markdown import replace_section

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_ROOT = REPO_ROOT / ".run"
BENCHMARKS_DOC = REPO_ROOT / "docs" / "benchmarks.md"
ENVOY = Path(sys.executable).with_name("envoy")


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of already sorted values."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))

    return sorted_values[rank - 1]


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the platform's."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass

    return platform.processor() or platform.machine()


def memory_total_gib() -> float:
    """Return the machine's memory in GiB, from /proc/meminfo."""
    return psutil.virtual_memory().total / 2**30


def envoy_version() -> str:
    """Return the version of the venv's Envoy, as `envoy --version` prints
    it: the release number and the TLS library."""
    completed = subprocess.run(
        [str(ENVOY), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    # "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    fields = completed.stdout.split("version:", 1)[-1].strip().split("/")
    if len(fields) < 5:
        return completed.stdout.strip()

    return f"{fields[1]} ({fields[4]})"


def process_cpu_seconds(pid: int) -> float:
    """Return a process's user and system CPU time from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")

    return (int(fields[11]) + int(fields[12])) / ticks


def process_tree_cpu_seconds(pid: int) -> float:
    """Return the CPU seconds of a process and of every child it started.

    Children that still run are read one by one. Those that exited are in
    the parent's children times once the parent has reaped them, as
    PostgreSQL's postmaster does with its backends.
    """
    parent = psutil.Process(pid)
    times = parent.cpu_times()
    total = (
        times.user + times.system + times.children_user + times.children_system
    )
    for child in parent.children():
        try:
            child_times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += child_times.user + child_times.system

    return total


def run_folder(prefix: str) -> Path:
    """Create a folder under .run that the embedded PostgreSQL can enter.

    The server runs as its own system user when started as root, so the
    folder and its parents must be traversable by others.
    """
    RUN_ROOT.mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=RUN_ROOT))
    folder.chmod(0o755)

    return folder


def write_section(
    heading: str, section: str, path: Path = BENCHMARKS_DOC
) -> None:
    """Replace one section of a benchmarks page, or add it at the end.

    The file is read right before it is written, because other benchmarks
    write their own sections of it.
    """
    document = "# Benchmarks\n"
    if path.exists():
        document = path.read_text(encoding="utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        replace_section(document, heading, section), encoding="utf-8"
    )


class KeptAliveClient:
    """One HTTPS connection to the edge, reopened if the edge closes it."""

    def __init__(self, port: int, ca_file: Path, timeout: float = 30) -> None:
        self._context = ssl.create_default_context(cafile=str(ca_file))
        self._port = port
        self._timeout = timeout
        self._connection = self._connect()

    def _connect(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "localhost",
            self._port,
            context=self._context,
            timeout=self._timeout,
        )

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """Send one request; return the response's status and body."""
        try:
            return self._request(method, path, body, headers or {})
        except (http.client.HTTPException, ConnectionError):
            # The edge closed an idle connection: one retry on a new one.
            self._connection.close()
            self._connection = self._connect()

            return self._request(method, path, body, headers or {})

    def get(self, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        return self.request("GET", path, None, headers)

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
    ) -> tuple[int, bytes]:
        self._connection.request(method, path, body=body, headers=headers)
        response = self._connection.getresponse()

        return response.status, response.read()

    def close(self) -> None:
        self._connection.close()
