"""A second Envoy in front of the running suite, with its own settings.

Tests of load limits and CORS need an edge configured differently from the
suite's own (a tiny connection limit, allowed origins). This one is
rendered by the same code, listens on free loopback ports, and forwards to
the suite's services.
"""

import dataclasses
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from services.launcher.envoy_config import render
from services.launcher.processes import free_port

ENVOY = Path(sys.executable).with_name("envoy")
START_TIMEOUT = 30.0


class EdgeInstance:
    """An Envoy process started from the suite's edge settings."""

    def __init__(
        self,
        stack,
        folder: Path,
        change_config: Callable[[dict], None] | None = None,
        **settings,
    ) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        edge_settings = dataclasses.replace(
            stack.edge_settings(),
            edge_port=self.port,
            admin_port=self.admin_port,
            # Not the file the audit ingester reads: these requests are
            # outside the suite's audit trail.
            access_log_path=folder / "access.log",
            **settings,
        )
        config = render(edge_settings)
        if change_config is not None:
            change_config(config)
        self.config_path = folder / "envoy.json"
        self.config_path.write_text(json.dumps(config))
        self.log_path = folder / "envoy.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "EdgeInstance":
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [
                    str(ENVOY),
                    "--config-path",
                    str(self.config_path),
                    "--disable-hot-restart",
                    "--log-level",
                    "warning",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"envoy exited: {self.log_path.read_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("envoy was not ready in time")
            time.sleep(0.1)

        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.admin_port}/ready", timeout=1
            ) as response:
                return response.status == 200
        except OSError:
            return False

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stats(self, prefix: str) -> dict[str, int]:
        """Return Envoy's counters and gauges whose names start with prefix."""
        url = f"http://127.0.0.1:{self.admin_port}/stats?format=json"
        with urllib.request.urlopen(url, timeout=5) as response:
            stats = json.load(response)["stats"]

        return {
            stat["name"]: stat["value"]
            for stat in stats
            if "value" in stat and stat["name"].startswith(prefix)
        }

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def overloaded_edge(stack, folder: Path) -> EdgeInstance:
    """Start an edge whose overload manager sheds every request, with a
    503, but no connection, and that writes the suite's own access log,
    which the ingester stores."""

    def overloaded_into_suite_log(config: dict) -> None:
        actions = config["overload_manager"]["actions"]
        config["overload_manager"]["actions"] = [
            action
            for action in actions
            if not action["name"].endswith("stop_accepting_connections")
        ]
        listener = config["static_resources"]["listeners"][0]
        manager = listener["filter_chains"][0]["filters"][0]
        [access_log] = manager["typed_config"]["access_log"]
        access_log["typed_config"]["path"] = str(stack.access_log_path)

    # A heap maximum of 1 MB: Envoy's heap is always larger.
    return EdgeInstance(
        stack, folder, overloaded_into_suite_log, max_heap_bytes=10**6
    ).start()
