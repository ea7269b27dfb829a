"""Fixtures that start the whole suite once per test session."""

import pytest

from tests.edge import EdgeClient
from tests.suite import RUN_ROOT, Organization, own_stack


@pytest.fixture(scope="session")
def stack():
    """Start PostgreSQL, the model runtime, the services and Envoy."""
    with own_stack(
        rules_only=False,
        model_dir=RUN_ROOT / "models",
        # Generous: the first review also loads the model on a slow CPU.
        model_timeout=90.0,
        checkpoint_seconds=1.0,
    ) as running:
        yield running


@pytest.fixture(scope="session")
def edge(stack) -> EdgeClient:
    return EdgeClient(stack.edge_port, stack.certs_dir / "ca.crt")


@pytest.fixture
def new_org(stack):
    """Return a factory of fresh organizations on the running suite."""

    def create(plan: str = "free") -> Organization:
        return Organization(stack, plan)

    return create
