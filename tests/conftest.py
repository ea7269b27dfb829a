"""Fixtures that start the whole suite once per test session."""

import shutil
import tempfile
from pathlib import Path

import pytest

from services.launcher.stack import REPO_ROOT, Stack, StackSettings
from tests.edge import EdgeClient
from tests.suite import Organization

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
        model_timeout=40.0,
        checkpoint_seconds=1.0,
    )
    running = Stack(settings).start()
    yield running
    running.stop()
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def edge(stack) -> EdgeClient:
    return EdgeClient(stack.edge_port, stack.certs_dir / "ca.crt")


@pytest.fixture
def new_org(stack):
    """Return a factory of fresh organizations on the running suite."""

    def create(plan: str = "free") -> Organization:
        return Organization(stack, plan)

    return create
