"""`make bench` fails on a missed target or a failed request."""

import subprocess

from bench.common import REPO_ROOT


def test_make_bench_passes_check():
    # -n prints the recipe without running the benchmark.
    completed = subprocess.run(
        ["make", "-n", "bench"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    commands = [
        line.split()
        for line in completed.stdout.splitlines()
        if "bench/harness.py" in line
    ]

    assert len(commands) == 1
    assert "--check" in commands[0]
