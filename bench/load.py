"""Client load for `make bench`: closed-loop and fixed-rate request runs.

A sender is a callable that sends one request and raises when the
response is not the expected one. A factory makes one sender per client
thread, so each thread can keep its own connection. Latencies are
client round trips in milliseconds.
"""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Sender = Callable[[], None]
SenderFactory = Callable[[], Sender]


@dataclass
class LoadResult:
    """Outcome of the requests that the client threads of one run sent."""

    # Requests that returned the expected response, and those that did not.
    requests: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    # Wall time of the run, from the first send to the last response.
    seconds: float = 0.0
    first_error: str = ""

    def add(self, other: "LoadResult") -> None:
        """Add another run's figures to this one's."""
        self.requests += other.requests
        self.errors += other.errors
        self.latencies_ms += other.latencies_ms
        self.seconds += other.seconds
        self.first_error = self.first_error or other.first_error


class _Tally:
    """A LoadResult that client threads add to under a lock."""

    def __init__(self) -> None:
        self.result = LoadResult()
        self._lock = threading.Lock()

    def record(self, started: float, error: Exception | None) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000
        with self._lock:
            if error is None:
                self.result.requests += 1
                self.result.latencies_ms.append(elapsed_ms)
            else:
                self.result.errors += 1
                if not self.result.first_error:
                    self.result.first_error = (
                        f"{type(error).__name__}: {error}"
                    )


def _send_timed(send: Sender, started: float, tally: _Tally) -> None:
    try:
        send()
    except Exception as error:
        # A failed request is a figure of the run, not the end of it: the
        # report gives the count and the first error's text.
        tally.record(started, error)
    else:
        tally.record(started, None)


def _run_threads(targets: list[Callable[[], None]]) -> float:
    """Run each target in a thread of its own; return the wall seconds."""
    threads = [threading.Thread(target=target) for target in targets]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    return time.perf_counter() - started


def closed_loop(
    factory: SenderFactory, concurrency: int, seconds: float
) -> LoadResult:
    """Send from `concurrency` threads, each as fast as its responses come.

    Every thread sends at least one request, so a run shorter than one
    round trip still measures one.
    """
    senders = [factory() for _ in range(concurrency)]
    tally = _Tally()
    deadline = time.perf_counter() + seconds

    def worker(send: Sender) -> None:
        while True:
            _send_timed(send, time.perf_counter(), tally)
            if time.perf_counter() >= deadline:
                return

    tally.result.seconds = _run_threads(
        [lambda send=send: worker(send) for send in senders]
    )

    return tally.result


def open_loop(
    factory: SenderFactory, rate: float, seconds: float, threads: int
) -> LoadResult:
    """Send `rate` requests a second for `seconds`, whatever the responses.

    Request i is due at start + i / rate. A free thread takes the next due
    request, and its latency runs from the due time. So a request that
    waits for a free thread counts its wait, and a slow server cannot lower
    the rate it is measured at without showing it in the latencies.
    """
    senders = [factory() for _ in range(threads)]
    tally = _Tally()
    total = max(1, round(rate * seconds))
    lock = threading.Lock()
    next_index = 0
    start = time.perf_counter() + 0.1

    def worker(send: Sender) -> None:
        nonlocal next_index
        while True:
            with lock:
                index = next_index
                next_index += 1
            if index >= total:
                return
            due = start + index / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            _send_timed(send, due, tally)

    _run_threads([lambda send=send: worker(send) for send in senders])
    tally.result.seconds = time.perf_counter() - start

    return tally.result
