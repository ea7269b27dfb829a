"""Time CDS Hooks calls through the real edge, as an EHR makes them.

Starts the local suite (PostgreSQL, the services and Envoy on loopback
ports), creates an organization, and sends each example request of
examples/hooks one at a time over one kept-alive HTTPS connection with
the organization's API key. Each timing is one request's round trip as
the client sees it: TLS, ext_authz, the transcoder, FHIR mapping,
screening and the cards. The model review is off, as it is for hooks
until an organization enables it.

    .venv/bin/python bench/hooks.py [--requests N] [--no-write]

The script prints p50 and p99 in milliseconds per hook with the machine
it ran on and writes them into the "CDS Hooks" section of
docs/benchmarks.md. The CDS Hooks specification expects responses in
about 500 ms.
"""

import argparse
import datetime
import http.client
import json
import os
import platform
import shutil
import ssl
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import cpu_model, percentile, write_section  # noqa: E402
from services.launcher.processes import stop_signals_interrupt  # noqa: E402
from services.launcher.stack import Stack, StackSettings  # noqa: E402
from tests.suite import Organization  # noqa: E402

HOOKS = ("order-select", "order-sign", "patient-view")
TARGET_P99_MS = 500.0
SECTION_HEADING = "## CDS Hooks"
EXAMPLES = REPO_ROOT / "examples" / "hooks"
WARM_UP = 20


def time_hook(
    connection: http.client.HTTPSConnection,
    hook: str,
    api_key: str,
    count: int,
) -> list[float]:
    """Send `count` calls of one hook; return their times in ms, sorted."""
    body = (EXAMPLES / f"{hook}.json").read_bytes()
    headers = {"content-type": "application/json", "x-api-key": api_key}
    timings = []
    for index in range(WARM_UP + count):
        started = time.perf_counter()
        connection.request(
            "POST", f"/cds-services/arxio-{hook}", body, headers
        )
        response = connection.getresponse()
        payload = response.read()
        elapsed = (time.perf_counter() - started) * 1000
        if response.status != 200:
            raise SystemExit(
                f"{hook}: HTTP {response.status}: {payload[:300]!r}"
            )
        if index >= WARM_UP:
            timings.append(elapsed)

    return sorted(timings)


def section(results: dict[str, list[float]], count: int, load: float) -> str:
    rows = [
        f"| {hook} | {percentile(t, 0.5):.1f} ms | "
        f"{percentile(t, 0.99):.1f} ms | "
        f"{'yes' if percentile(t, 0.99) <= TARGET_P99_MS else 'no'} |"
        for hook, t in results.items()
    ]

    return "\n".join(
        [
            SECTION_HEADING,
            "",
            "Round trip of one CDS Hooks call through the local edge, as an "
            "EHR sees it: TLS, the auth decision, the transcoder, FHIR "
            "mapping, screening and the cards, with the model review off. "
            "Each call sends the hook's example request from "
            "examples/hooks (three medications, one condition, one allergy, "
            "three observations) with an API key, one at a time over one "
            "kept-alive connection. Measured by `bench/hooks.py` "
            "(`make bench-hooks`) on the same machine as the suite itself. "
            f"The target is a p99 of at most {TARGET_P99_MS:.0f} ms, the "
            "answer time that the CDS Hooks specification expects.",
            "",
            "| Hook | p50 | p99 | Target met |",
            "| --- | ---: | ---: | --- |",
            *rows,
            "",
            "| Machine | |",
            "| --- | --- |",
            f"| CPU | {cpu_model()}, {os.cpu_count()} CPUs shared by the "
            "suite and the client |",
            f"| Python | {platform.python_implementation()} "
            f"{platform.python_version()} |",
            f"| load average at start | {load:.2f} over 1 minute |",
            f"| timed calls | {count} per hook after {WARM_UP} warm-up |",
            f"| date | {datetime.date.today().isoformat()} |",
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--requests", type=int, default=500, help="timed calls per hook"
    )
    parser.add_argument(
        "--no-write",
        action="store_true",
        help="print the results without updating docs/benchmarks.md",
    )
    args = parser.parse_args()

    load = os.getloadavg()[0]
    (REPO_ROOT / ".run").mkdir(exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-", dir=REPO_ROOT / ".run"))
    run_dir.chmod(0o755)
    stack = Stack(
        StackSettings(
            run_dir=run_dir,
            edge_port=0,
            log_to_files=True,
            model_dir=REPO_ROOT / ".run" / "models",
        )
    ).start()
    try:
        org = Organization(stack, "enterprise")
        context = ssl.create_default_context(
            cafile=str(stack.certs_dir / "ca.crt")
        )
        connection = http.client.HTTPSConnection(
            "localhost", stack.edge_port, context=context, timeout=30
        )
        results = {
            hook: time_hook(connection, hook, org.api_key, args.requests)
            for hook in HOOKS
        }
        connection.close()
    finally:
        stack.stop()
        shutil.rmtree(run_dir, ignore_errors=True)

    text = section(results, args.requests, load)
    print(text)
    if not args.no_write:
        write_section(SECTION_HEADING, text)
    print(json.dumps({h: percentile(t, 0.99) for h, t in results.items()}))

    return 0


if __name__ == "__main__":
    # SIGTERM and SIGHUP stop the suite through main's cleanup, as Ctrl-C does.
    with stop_signals_interrupt():
        status = main()
    raise SystemExit(status)
