"""Measure the auth decision: `Check` latency and what it costs the edge.

    .venv/bin/python bench/auth.py [--seconds N] [--rate N] [--no-write]

1. `Check` for a known key, called directly on the auth service over
   mutual TLS at a fixed rate (default 500 a second): p50, p99 and the
   auth process's CPU seconds per thousand checks. Target: p99 under 2 ms.
2. The same rules-only REST review through two edges in one run: the
   suite's own, and a second Envoy rendered from the same template with
   ext_authz left out, both writing their access logs. Target: the edge
   with auth reaches at least 75% of the other's throughput.

Both are written into the "Auth" section of docs/benchmarks.md with the
machine they ran on. Load comes from this process and the services share
the same cores, so figures are for comparison within one run.
"""

import argparse
import asyncio
import concurrent.futures
import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
from envoy.service.auth.v3 import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
)

# Run as a script from any folder: the tests' helpers live in the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.screening import cpu_model, percentile  # noqa: E402
from services.common.markdown import replace_section  # noqa: E402
from services.launcher.envoy_config import render_text  # noqa: E402
from services.launcher.processes import free_port  # noqa: E402
from services.launcher.stack import (  # noqa: E402
    REPO_ROOT,
    Stack,
    StackSettings,
)
from tests.suite import Organization  # noqa: E402

SECTION_HEADING = "## Auth"
BENCHMARKS_DOC = REPO_ROOT / "docs" / "benchmarks.md"
REVIEW_PATH = "/v1/cds/clinical-review"
BODY = json.dumps(
    {
        "medications": [{"name": "warfarin"}, {"name": "ibuprofen"}],
        "options": {"modelReview": False},
    }
).encode()
TARGET_CHECK_P99_MS = 2.0
TARGET_EDGE_RATIO = 0.75


def cpu_seconds(pid: int) -> float:
    """Return a process's user and system CPU time from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")

    return (int(fields[11]) + int(fields[12])) / ticks


def check_request(api_key: str) -> external_auth_pb2.CheckRequest:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST",
        path=REVIEW_PATH,
        headers={
            "x-api-key": api_key,
            "content-type": "application/json",
            "x-request-id": "bench",
            "x-arxio-client-address": "127.0.0.1",
        },
        raw_body=BODY,
    )

    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


async def time_checks(
    stack: Stack, api_key: str, rate: float, seconds: float
) -> dict:
    certs = stack.certs_dir
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.crt").read_bytes(),
        private_key=(certs / "envoy.key").read_bytes(),
        certificate_chain=(certs / "envoy.crt").read_bytes(),
    )
    request = check_request(api_key)
    latencies: list[float] = []
    errors: list[str] = []
    failures = 0
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{stack.ports['auth']}",
        credentials,
        options=[("grpc.ssl_target_name_override", "auth")],
    ) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for _ in range(50):
            await stub.Check(request)
        pid = stack.child("auth").process.pid
        cpu_before = cpu_seconds(pid)
        total = int(rate * seconds)
        interval = 1 / rate
        start = time.perf_counter()

        async def one(due: float) -> None:
            nonlocal failures
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            sent = time.perf_counter()
            try:
                reply = await stub.Check(request, timeout=5)
            except grpc.aio.AioRpcError as error:
                errors.append(error.code().name)
                return
            latencies.append((time.perf_counter() - sent) * 1000)
            if reply.status.code != 0:
                failures += 1

        await asyncio.gather(
            *(one(start + index * interval) for index in range(total))
        )
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(pid) - cpu_before

    return {
        "checks": total,
        "achieved_rate": total / elapsed,
        "p50_ms": percentile(sorted(latencies), 0.50),
        "p99_ms": percentile(sorted(latencies), 0.99),
        "cpu_s_per_1000": cpu / total * 1000,
        "denied": failures,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
    }


def _edge_load(port: int, ca_file: Path, api_key: str, seconds: float):
    """Send reviews on 16 keep-alive connections; return the rate."""
    context = ssl.create_default_context(cafile=str(ca_file))
    stop = time.monotonic() + seconds
    counts = []
    lock = threading.Lock()

    def worker() -> None:
        connection = http.client.HTTPSConnection(
            "localhost", port, context=context, timeout=30
        )
        done = 0
        while time.monotonic() < stop:
            connection.request(
                "POST",
                REVIEW_PATH,
                body=BODY,
                headers={
                    "x-api-key": api_key,
                    "content-type": "application/json",
                },
            )
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(
                    f"edge returned {response.status}: expected 200"
                )
            done += 1
        connection.close()
        with lock:
            counts.append(done)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for future in [pool.submit(worker) for _ in range(16)]:
            future.result()

    return sum(counts) / (time.monotonic() - started)


def time_edges(stack: Stack, api_key: str, seconds: float) -> dict:
    """Compare the edge with and without ext_authz, in one run."""
    open_dir = Path(tempfile.mkdtemp(prefix="bench-edge-"))
    settings = replace(
        stack.edge_settings(),
        edge_port=free_port(),
        admin_port=free_port(),
        access_log_path=open_dir / "access.log",
        authorization=False,
    )
    config = open_dir / "envoy.yaml"
    config.write_text(render_text(settings))
    envoy = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("envoy")),
            "--config-path",
            str(config),
            "--disable-hot-restart",
            "--log-level",
            "error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(2)
        ca_file = stack.certs_dir / "ca.crt"
        rates = {}
        # Alternate twice, so that a drift in machine load hits both.
        for name, port in [
            ("with_auth", stack.edge_port),
            ("without_auth", settings.edge_port),
        ] * 2:
            rate = _edge_load(port, ca_file, api_key, seconds / 2)
            rates[name] = rates.get(name, 0.0) + rate / 2
    finally:
        envoy.terminate()
        envoy.wait(10)
        shutil.rmtree(open_dir, ignore_errors=True)

    return rates | {"ratio": rates["with_auth"] / rates["without_auth"]}


def machine() -> str:
    return (
        f"{os.cpu_count()} CPUs, {cpu_model()}, Python "
        f"{sys.version.split()[0]}"
    )


def report(checks: dict, edges: dict, rate: float) -> str:
    check_ok = checks["p99_ms"] < TARGET_CHECK_P99_MS
    edge_ok = edges["ratio"] >= TARGET_EDGE_RATIO
    return "\n".join(
        [
            SECTION_HEADING,
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {machine()} by "
            "`make bench-auth`; load generator and suite share the cores.",
            "",
            "| measure | value | target | met |",
            "| --- | --- | --- | --- |",
            f"| `Check` p50 at {rate:.0f}/s | {checks['p50_ms']:.2f} ms | | |",
            f"| `Check` p99 at {rate:.0f}/s | {checks['p99_ms']:.2f} ms | "
            f"< {TARGET_CHECK_P99_MS} ms | {'yes' if check_ok else 'no'} |",
            f"| `Check` CPU per 1,000 | {checks['cpu_s_per_1000']:.2f} s | "
            "| |",
            f"| edge with auth | {edges['with_auth']:.0f} requests/s | | |",
            f"| edge without ext_authz | {edges['without_auth']:.0f} "
            "requests/s | | |",
            f"| ratio | {edges['ratio']:.2f} | >= {TARGET_EDGE_RATIO} | "
            f"{'yes' if edge_ok else 'no'} |",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="bench-", dir=REPO_ROOT / ".run"))
    run_dir.chmod(0o755)
    stack = Stack(
        StackSettings(
            run_dir=run_dir,
            edge_port=0,
            log_to_files=True,
            # A port with nothing behind it: the benchmark is rules-only.
            ollama_host=f"http://127.0.0.1:{free_port()}",
        )
    ).start()
    try:
        org = Organization(stack, "enterprise")
        checks = asyncio.run(
            time_checks(stack, org.api_key, args.rate, args.seconds)
        )
        edges = time_edges(stack, org.api_key, args.seconds)
    finally:
        stack.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    text = report(checks, edges, args.rate)
    print(text)
    print(json.dumps({"check": checks, "edge": edges}, indent=2))
    if not args.no_write:
        document = (
            BENCHMARKS_DOC.read_text() if BENCHMARKS_DOC.exists() else ""
        )
        BENCHMARKS_DOC.write_text(
            replace_section(document, SECTION_HEADING, text)
        )


if __name__ == "__main__":
    main()
