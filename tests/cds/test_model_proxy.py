"""A fault-injecting HTTP proxy for the model server, and its own tests.

The proxy listens on 127.0.0.1 on a port the OS picks and forwards each
request to the real model runtime. Per path it can pass the exchange
through, stall, cut the connection before or in the middle of the reply,
or rewrite the reply. It runs its own asyncio loop in a thread, so that
synchronous tests and a service under test can both call it.
"""

import asyncio
import enum
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest

pytest_plugins = ("tests.model_runtime.fixtures",)

CHAT_PATH = "/api/chat"
SHOW_PATH = "/api/show"


class Fault(enum.Enum):
    # Forward the request and return the reply, rewritten if a rewrite is
    # set for the path.
    PASS = "pass"
    # Read the request, forward nothing and never reply.
    STALL = "stall"
    # Read the request and close the connection without a reply.
    CUT_BEFORE_REPLY = "cut before reply"
    # Forward the request, then send the reply's head and half its body
    # and close the connection.
    CUT_MID_REPLY = "cut mid-reply"


@dataclass
class Reply:
    """An HTTP reply the proxy received from upstream or will send."""

    status: int
    body: bytes
    content_type: str = "application/json; charset=utf-8"


Rewrite = Callable[[Reply], Reply]


def _reason_phrase(status: int) -> str:
    try:
        return httpx.codes(status).name.replace("_", " ").title()
    except ValueError:
        return "Unknown"


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 with one fault per path.

    Each connection carries one request and ends after the reply, which
    has the header `Connection: close`. Request bodies are kept in memory,
    in order of arrival, for the test's assertions.
    """

    def __init__(self, upstream: str) -> None:
        parts = httpx.URL(upstream)
        self._upstream = (parts.host, parts.port)
        self.faults: dict[str, Fault] = {}
        self.rewrites: dict[str, Rewrite] = {}
        # Bodies of the requests received, by path, in order of arrival.
        self.requests: dict[str, list[bytes]] = {}
        # While set, requests to these paths wait for `release` before
        # their fault applies.
        self.held_paths: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever)
        self._server: asyncio.Server | None = None
        self._gate: asyncio.Semaphore | None = None
        self._connections: set[asyncio.Task] = set()
        # Number of requests waiting for `release` now.
        self._waiting_at_gate = 0
        self.host = ""

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def set_fault(
        self, path: str, fault: Fault, rewrite: Rewrite | None = None
    ) -> None:
        self.faults[path] = fault
        if rewrite is None:
            self.rewrites.pop(path, None)
        else:
            self.rewrites[path] = rewrite

    def reset(self) -> None:
        """Pass everything through unchanged and forget recorded requests.

        Requests waiting at the gate go on, and a fresh gate stops later
        ones.
        """
        asyncio.run_coroutine_threadsafe(
            self._reset_gate(), self._loop
        ).result(10)
        self.faults.clear()
        self.rewrites.clear()
        self.held_paths.clear()
        self.requests.clear()

    def release(self, count: int = 1) -> None:
        """Let `count` held requests go on."""
        for _ in range(count):
            self._loop.call_soon_threadsafe(self._gate.release)

    def received(self, path: str) -> list[bytes]:
        return list(self.requests.get(path, ()))

    def wait_for_requests(
        self, path: str, count: int, timeout: float = 10.0
    ) -> list[bytes]:
        """Wait until `count` requests to `path` have arrived."""
        deadline = time.monotonic() + timeout
        while len(self.received(path)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(self.received(path))} of {count} requests to "
                    f"{path} arrived within {timeout:g} s"
                )
            time.sleep(0.01)

        return self.received(path)

    async def _start(self) -> None:
        self._gate = asyncio.Semaphore(0)
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.host = f"http://127.0.0.1:{port}"

    async def _reset_gate(self) -> None:
        for _ in range(self._waiting_at_gate):
            self._gate.release()
        self._gate = asyncio.Semaphore(0)

    async def _stop(self) -> None:
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only _stop cancels these tasks. Python 3.11's streams log a
            # cancelled connection task as an error, so it ends quietly.
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", 0)))
        path = target.split("?", 1)[0]
        self.requests.setdefault(path, []).append(body)

        if path in self.held_paths:
            self._waiting_at_gate += 1
            try:
                await self._gate.acquire()
            finally:
                self._waiting_at_gate -= 1
        fault = self.faults.get(path, Fault.PASS)
        if fault is Fault.STALL:
            # Wait until the client gives up and closes the connection.
            await reader.read()
            return
        if fault is Fault.CUT_BEFORE_REPLY:
            return

        raw = await self._forward(method, target, headers, body)
        if fault is Fault.CUT_MID_REPLY:
            head, separator, reply_body = raw.partition(b"\r\n\r\n")
            writer.write(head + separator + reply_body[: len(reply_body) // 2])
            await writer.drain()
            return
        reply = self._parse(raw)
        rewrite = self.rewrites.get(path)
        if rewrite is not None:
            reply = rewrite(reply)
        writer.write(
            (
                f"HTTP/1.1 {reply.status} {_reason_phrase(reply.status)}\r\n"
                f"Content-Type: {reply.content_type}\r\n"
                f"Content-Length: {len(reply.body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode("latin-1")
            + reply.body
        )
        await writer.drain()

    async def _forward(
        self, method: str, target: str, headers: dict, body: bytes
    ) -> bytes:
        reader, writer = await asyncio.open_connection(*self._upstream)
        try:
            forwarded = {**headers, "connection": "close"}
            forwarded["content-length"] = str(len(body))
            head = f"{method} {target} HTTP/1.1\r\n" + "".join(
                f"{name}: {value}\r\n" for name, value in forwarded.items()
            )
            writer.write(head.encode("latin-1") + b"\r\n" + body)
            await writer.drain()

            return await reader.read()
        finally:
            writer.close()

    @staticmethod
    def _parse(raw: bytes) -> Reply:
        head, _, body = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        content_type = "application/json; charset=utf-8"
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                content_type = value.strip()

        return Reply(int(status_line.split(" ")[1]), body, content_type)


def chat_content_rewrite(content: str) -> Rewrite:
    """Return a rewrite that replaces a chat reply's message content.

    The rest of the upstream reply, model name and counts included, stays
    as the runtime sent it, so the client still parses a real response.
    """

    def rewrite(reply: Reply) -> Reply:
        payload = json.loads(reply.body)
        payload["message"]["content"] = content
        payload["done_reason"] = "stop"

        return Reply(reply.status, json.dumps(payload).encode())

    return rewrite


def body_rewrite(status: int, body: bytes) -> Rewrite:
    """Return a rewrite that replaces the whole reply."""

    def rewrite(reply: Reply) -> Reply:
        return Reply(status, body)

    return rewrite


@pytest.fixture(scope="session")
def fault_proxy(model_runtime):
    """Run one proxy in front of the session's model runtime."""
    with FaultProxy(model_runtime.host) as proxy:
        yield proxy


@pytest.fixture
def proxy(fault_proxy):
    """Return the session's proxy with no fault, and reset it afterwards."""
    fault_proxy.reset()
    yield fault_proxy
    fault_proxy.reset()


class TestFaultProxy:
    def test_passes_through_unchanged(self, proxy, model_runtime):
        """Without a fault the runtime's reply arrives as sent."""
        direct = httpx.get(f"{model_runtime.host}/api/tags", timeout=5)
        proxied = httpx.get(f"{proxy.host}/api/tags", timeout=5)

        assert 200 == proxied.status_code
        assert direct.json() == proxied.json()
        assert [b""] == proxy.received("/api/tags")

    def test_rewrite_replaces_reply(self, proxy, model_runtime):
        """A rewrite's status and body replace the runtime's reply."""
        proxy.set_fault(
            SHOW_PATH, Fault.PASS, body_rewrite(404, b'{"error": "gone"}')
        )

        reply = httpx.post(
            f"{proxy.host}{SHOW_PATH}",
            json={"model": model_runtime.model},
            timeout=5,
        )

        assert 404 == reply.status_code
        assert {"error": "gone"} == reply.json()

    def test_cut_mid_reply_truncates(self, proxy, model_runtime):
        """A cut reply ends before its Content-Length is reached."""
        proxy.set_fault("/api/tags", Fault.CUT_MID_REPLY)

        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(f"{proxy.host}/api/tags", timeout=5)

    def test_stall_never_replies(self, proxy):
        """A stalled request gets no reply until the client gives up."""
        proxy.set_fault("/api/tags", Fault.STALL)

        with pytest.raises(httpx.ReadTimeout):
            httpx.get(f"{proxy.host}/api/tags", timeout=0.3)
