"""Per-connection limits, applied where a connection's bytes arrive: in uvicorn's HTTP protocol,
before any byte reaches a handler.

A client can make an API process do work faster than any handler can refuse it: 1-byte chunks
(~300,000 a second on one connection), pipelined requests, a request head sent a byte a second.
So each connection has a budget, and bytes past it wait in the kernel (reading pauses, TCP pushes
back on the client) instead of in the parser:
- bytes a second (`BYTES_PER_SECOND`, after a burst of as much);
- parser events a second (`EVENTS_PER_SECOND`): body chunks and requests, the work a flood of tiny
  pieces costs; data is parsed in slices of `SLICE` bytes, so one read of 256 KB of 1-byte chunks
  cannot run 40,000 callbacks before the budget is checked;
- a request head must be whole within `--head-timeout` seconds of its first byte (or of the
  connection, for the first request) and within `MAX_HEAD_BYTES`, else the connection is closed.
What each limit refused is counted per API process (`lockstep:api_*` metrics).
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

BYTES_PER_SECOND = 8 << 20  # 170x a real-time upload's 48 KB/s
EVENTS_PER_SECOND = 1000.0  # a real-time client sends 12.5 chunks a second
MAX_HEAD_BYTES = 64 << 10
SLICE = 4 << 10


class Bucket:
    """A token bucket: `take` spends, `debt` says how long until it is back in credit."""

    def __init__(self, per_second: float, burst: float):
        self.per_second, self.burst = per_second, burst
        self.tokens, self.at = burst, time.monotonic()

    def take(self, n: float) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_second) - n
        self.at = now

    def debt(self) -> float:
        """Seconds until the bucket holds a token again (0 when it does)."""
        now = time.monotonic()
        tokens = min(self.burst, self.tokens + (now - self.at) * self.per_second)
        return 0.0 if tokens > 0 else (1 - tokens) / self.per_second


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above. `head_timeout` and `counters` are set
    on the subclass `guarded_http` makes."""
    head_timeout: float = 5.0
    counters: Counter = Counter()

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._bytes = Bucket(BYTES_PER_SECOND, BYTES_PER_SECOND)
        self._events = Bucket(EVENTS_PER_SECOND, 2 * EVENTS_PER_SECOND)
        self._held: list[bytes] = []
        self._release_at: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.head_timeout, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._release_at):
            if timer is not None:
                timer.cancel()
        self._held = []
        super().connection_lost(exc)

    # ---- the budget ---------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._held:  # uvicorn's own flow control resumed reading while the budget had not
            self._held.append(data)
            self.transport.pause_reading()
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        for at in range(0, len(data), SLICE):
            if self.transport.is_closing():
                return
            wait = max(self._bytes.debt(), self._events.debt())
            if wait > 0:
                self.counters["throttled_reads"] += 1
                self._held.append(data[at:])
                self.transport.pause_reading()
                self._release_at = self.loop.call_later(wait, self._release)
                return
            piece = data[at:at + SLICE]
            self._bytes.take(len(piece))
            if self._head_timer is not None:
                self._head_bytes += len(piece)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self.counters["head_too_large"] += 1
                    self.send_431()
                    return
            super().data_received(piece)

    def _release(self) -> None:
        self._release_at = None
        held, self._held = b"".join(self._held), []
        if held:
            self._feed(held)
        if not self._held and not self.transport.is_closing():
            self.transport.resume_reading()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._events.take(1)
        if self._head_timer is None:
            self._head_bytes = 0
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_late)

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._events.take(1)
        super().on_body(body)

    # ---- refusals -----------------------------------------------------------------------------------
    def _head_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.counters["head_timeouts"] += 1
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()

    def send_431(self) -> None:
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
                             b"connection: close\r\n\r\n")
        self.transport.close()


def guarded_http(head_timeout: float, counters: Counter) -> type:
    """The protocol class to give uvicorn (`Config(http=...)`)."""
    return type("GuardedHttp", (GuardedHttp,), {"head_timeout": head_timeout, "counters": counters})


class RefuseUnread:
    """ASGI middleware: a response that starts before its request's body was read (a refusal: 401,
    413, 404...) closes the connection after it, so the body is never read and parsed (without it,
    uvicorn reads and discards the rest of the body to keep the connection alive)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        read = {"done": headers.get(b"content-length", b"0") in (b"0", b"") and b"transfer-encoding" not in headers}

        async def receive_() -> dict:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                read["done"] = True
            return message

        async def send_(message: dict) -> None:
            if message["type"] == "http.response.start" and not read["done"]:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_, send_)
