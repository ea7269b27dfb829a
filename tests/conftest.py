"""Fixtures that start the whole suite once per test session."""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from services.launcher.stack import REPO_ROOT, Stack, StackSettings
from tests.edge import EdgeClient

RUN_ROOT = REPO_ROOT / ".run"


@pytest.fixture(scope="session")
def stack():
    """Start PostgreSQL, the model runtime, the services and Envoy."""
    RUN_ROOT.mkdir(exist_ok=True)
    # Under .run rather than /tmp: the embedded PostgreSQL runs as its own
    # system user, which needs to traverse every parent folder.
    run_dir = Path(tempfile.mkdtemp(prefix="test-", dir=RUN_ROOT))
    run_dir.chmod(0o755)
    settings = StackSettings(
        run_dir=run_dir,
        edge_port=0,
        log_to_files=True,
        model_dir=RUN_ROOT / "models",
        model_timeout=60.0,
    )
    running = Stack(settings).start()
    yield running
    running.stop()
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def edge(stack) -> EdgeClient:
    return EdgeClient(stack.edge_port, stack.certs_dir / "ca.crt")


def run_cli(stack, *arguments: str) -> dict:
    """Run the installed `arxio` command against the test suite."""
    environment = {
        "PATH": str(Path(sys.executable).parent),
        "ARXIO_EDGE_PORT": str(stack.edge_port),
        "ARXIO_CA_FILE": str(stack.certs_dir / "ca.crt"),
        "ARXIO_OPERATOR_TOKEN": stack.operator_token,
    }
    completed = subprocess.run(
        [str(Path(sys.executable).with_name("arxio")), *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr

    return json.loads(completed.stdout)


class Organization:
    """An organization created through the CLI, with its first key."""

    def __init__(self, stack, plan: str = "free") -> None:
        name = f"Test Hospital {time.monotonic_ns()}"
        created = run_cli(
            stack, "orgs", "create", "--name", name, "--plan", plan
        )
        self.org_id = created["orgId"]
        key = run_cli(stack, "keys", "create", "--org", self.org_id)
        self.api_key = key["apiKey"]
        self.key_id = key["keyId"]


@pytest.fixture
def new_org(stack):
    """Return a factory of fresh organizations on the running suite."""

    def create(plan: str = "free") -> Organization:
        return Organization(stack, plan)

    return create
