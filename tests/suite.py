"""Helpers that act on a running suite as an operator would."""

import json
import subprocess
import sys
import time
from pathlib import Path


def cli_process(stack, *arguments: str) -> subprocess.CompletedProcess:
    """Run the installed `arxio` command against the test suite."""
    environment = {
        "PATH": str(Path(sys.executable).parent),
        "ARXIO_EDGE_PORT": str(stack.edge_port),
        "ARXIO_CA_FILE": str(stack.certs_dir / "ca.crt"),
        "ARXIO_OPERATOR_TOKEN": stack.operator_token,
    }

    return subprocess.run(
        [str(Path(sys.executable).with_name("arxio")), *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run_cli(stack, *arguments: str) -> dict:
    """Run `arxio`, expect success and return its JSON output."""
    completed = cli_process(stack, *arguments)
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
