"""Measure the auth decision: `Check` latency and what it costs the edge.

    .venv/bin/python bench/auth.py [--seconds N] [--rate N] [--no-write]

1. `Check` for a known key, called directly on the auth service over
   mutual TLS at a fixed rate (default 500 a second): p50, p99 and the
   auth process's CPU seconds per thousand checks. Target: p99 under 2 ms.
2. The same rules-only REST review through two edges in one run: the
   suite's own, and a second Envoy rendered from the same template with
   ext_authz left out. Both write access logs that an audit ingester
   stores. Target: the edge with auth reaches at least 75% of the other's
   throughput. The CPU time per request of every process is reported for
   both edges.

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
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from envoy.service.auth.v3 import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
)

# Run as a script from any folder: the tests' helpers live in the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    cpu_model,
    percentile,
    process_cpu_seconds,
    process_tree_cpu_seconds,
    run_folder,
    write_section,
)
from services.launcher.processes import (  # noqa: E402
    free_port,
    stop_signals_interrupt,
)
from services.launcher.stack import (  # noqa: E402
    REPO_ROOT,
    Stack,
    StackSettings,
)
from tests.suite import Organization  # noqa: E402

SECTION_HEADING = "## Auth"
REVIEW_PATH = "/v1/cds/clinical-review"
BODY = json.dumps(
    {
        "medications": [{"name": "warfarin"}, {"name": "ibuprofen"}],
        "options": {"modelReview": False},
    }
).encode()
TARGET_CHECK_P99_MS = 2.0
TARGET_EDGE_RATIO = 0.75


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
        cpu_before = process_cpu_seconds(pid)
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
        cpu = process_cpu_seconds(pid) - cpu_before

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


def _cpu_by_process(stack: Stack, processes) -> dict:
    """Return CPU seconds so far of every process either edge uses."""
    seconds = {
        child.name: process_cpu_seconds(child.process.pid)
        for child in [*stack.children, *processes.children]
        if child.running()
    }
    postmaster = stack.database_pid()
    if postmaster is not None:
        seconds["postgres"] = process_tree_cpu_seconds(postmaster)
    seconds["load generator"] = process_cpu_seconds(os.getpid())

    return seconds


def time_edges(stack: Stack, api_key: str, seconds: float) -> dict:
    """Compare the edge with and without ext_authz, in one run.

    The edge without ext_authz is rendered from the same settings, in front
    of the same services, and its access log has an audit ingester of its
    own, so the two differ in the ext_authz filter alone. Each side's CPU
    time per request is recorded by process, to show where the difference
    goes.
    """
    # Imported here: the harness's modules import this one.
    from bench.suite_setup import BenchProcesses

    folder = run_folder("bench-auth-edge-")
    processes = BenchProcesses(stack, folder)
    try:
        baseline = processes.start_edge(
            "edge-without-ext-authz",
            stack.edge_settings().upstreams,
            authorization=False,
        )
        ca_file = stack.certs_dir / "ca.crt"
        rates: dict[str, float] = {}
        cpu: dict[str, dict[str, float]] = {}
        # Alternate twice, so that a drift in machine load hits both.
        for name, port in [
            ("with_auth", stack.edge_port),
            ("without_auth", baseline.port),
        ] * 2:
            before = _cpu_by_process(stack, processes)
            started = time.monotonic()
            rate = _edge_load(port, ca_file, api_key, seconds / 2)
            requests = rate * (time.monotonic() - started)
            after = _cpu_by_process(stack, processes)
            rates[name] = rates.get(name, 0.0) + rate / 2
            side = cpu.setdefault(name, {})
            for process, total in after.items():
                used = (total - before.get(process, total)) / requests
                side[process] = side.get(process, 0.0) + used * 1e6 / 2
    finally:
        processes.stop()
        shutil.rmtree(folder, ignore_errors=True)

    return rates | {
        "ratio": rates["with_auth"] / rates["without_auth"],
        "cpu_us_per_request": {
            name: {
                process: round(us)
                for process, us in sorted(side.items())
                if us >= 5
            }
            for name, side in cpu.items()
        },
    }


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
            "CPU microseconds per request, by process (each edge has its "
            "own audit ingester; processes under 5 µs left out):",
            "",
            "| process | with auth | without ext_authz |",
            "| --- | --- | --- |",
            *_cpu_rows(edges["cpu_us_per_request"]),
            "",
        ]
    )


def _cpu_rows(cpu: dict[str, dict[str, int]]) -> list[str]:
    with_auth, without = cpu["with_auth"], cpu["without_auth"]
    names = sorted(set(with_auth) | set(without))
    rows = [
        f"| {name} | {with_auth.get(name, 0)} | {without.get(name, 0)} |"
        for name in names
    ]
    rows.append(
        f"| total | {sum(with_auth.values())} | {sum(without.values())} |"
    )

    return rows


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
        write_section(SECTION_HEADING, text)


if __name__ == "__main__":
    # SIGTERM and SIGHUP stop the suite through main's cleanup, as Ctrl-C does.
    with stop_signals_interrupt():
        main()
