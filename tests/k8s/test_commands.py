"""The commands that the manifests run exist and start."""

import importlib.util
import os
import subprocess
import sys

from services.launcher.processes import free_port
from tests.k8s.manifests import WORKLOAD_KINDS, pod_spec, rendered


def python_modules() -> set[str]:
    """Return every module that a container runs with `python -m`."""
    modules = set()
    for item in rendered("prod"):
        if item["kind"] not in WORKLOAD_KINDS:
            continue
        spec = pod_spec(item)
        for container in spec["containers"] + spec.get("initContainers", []):
            command = container.get("command", [])
            if command[:2] == ["python", "-m"]:
                modules.add(command[2])

    return modules


def run_migrations(environment: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.common.migrations"],
        env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        | environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_every_module_importable():
    """Each `python -m` module in the manifests is in the package."""
    modules = python_modules()

    assert "services.common.migrations" in modules
    assert "services.audit.retention" in modules
    assert [] == [m for m in modules if importlib.util.find_spec(m) is None]


def test_migrations_without_url_exit_2():
    """The migration command exits 2 when DATABASE_URL is missing."""
    completed = run_migrations({})

    assert 2 == completed.returncode
    assert "DATABASE_URL is missing" in completed.stderr


def test_migrations_unreachable_database_exit_1():
    """The migration command exits 1 when PostgreSQL is unreachable."""
    # Nothing listens on this loopback port.
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/arxio"

    completed = run_migrations({"DATABASE_URL": url})

    assert 1 == completed.returncode
    assert "migrations.failed" in completed.stderr
