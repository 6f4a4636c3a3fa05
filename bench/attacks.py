"""The attacks `lockstep bench abuse` runs against a server, each in a process of its own for a
given number of seconds, as a hostile client beside the server would.

`lockstep bench abuse` runs each one as `python -m bench.attacks NAME URL SECONDS [KEY]`, which
prints that dict as JSON: this module imports nothing heavy, so starting an attacker costs the
two-core machine ~60 ms of CPU instead of the ~1.5 s a torch import would steal from the server.

Each attack returns a dict of what it saw (requests made, status codes, reconnections), so the report
says both what the witnesses suffered and how the server answered the attacker.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time
from collections import Counter
from typing import Callable
from urllib.parse import urlsplit

CHUNK = b"1\r\n \r\n"  # one byte of body in HTTP chunked encoding


def _addr(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def _head(method: str, path: str, key: str | None, extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return f"{method} {path} HTTP/1.1\r\nHost: lockstep\r\n{auth}{extra}\r\n".encode("latin-1")


def _status(data: bytes) -> str:
    """The status code of the first response in `data`, or what happened instead."""
    if data.startswith(b"HTTP/1.1 "):
        return data[9:12].decode()
    return "closed" if not data else "garbage"


def chunk_flood(url: str, seconds: float, path: str = "/v1/sessions", key: str | None = None,
                bytes_per_second: float | None = None) -> dict:
    """1-byte HTTP chunks to `path` as fast as the server takes them (or at `bytes_per_second`),
    reconnecting whenever the server closes."""
    end = time.monotonic() + seconds
    blob = CHUNK * 8192
    head = _head("POST", path, key, "Transfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n")
    sent, connections, answers = 0, 0, Counter()
    while time.monotonic() < end:
        connections += 1
        try:
            with socket.create_connection(_addr(url), timeout=2) as s:
                s.sendall(head)
                start, conn_sent = time.monotonic(), 0
                while time.monotonic() < end:
                    if bytes_per_second is not None:
                        wait = start + conn_sent / bytes_per_second - time.monotonic()
                        if wait > 0:
                            time.sleep(min(wait, end - time.monotonic()))
                            continue
                    s.sendall(blob)
                    sent += len(blob) // len(CHUNK)
                    conn_sent += len(blob)
                s.settimeout(0.5)
                answers[_status(s.recv(64))] += 1
        except (OSError, socket.timeout) as e:
            answers[type(e).__name__] += 1
    return {"chunks_sent": sent, "connections": connections, "answers": dict(answers)}


def pipelined(url: str, seconds: float, path: str = "/healthz", connections: int = 1) -> dict:
    """GET `path` pipelined as fast as the server reads them, on `connections` connections."""
    end = time.monotonic() + seconds
    batch = _head("GET", path, None) * 500
    requests, reconnects = 0, 0
    socks = []
    for _ in range(connections):
        s = socket.create_connection(_addr(url), timeout=2)
        s.setblocking(False)
        socks.append(s)
    while time.monotonic() < end:
        for i, s in enumerate(socks):
            try:
                s.send(batch)
                requests += 500
            except BlockingIOError:
                pass
            except OSError:
                reconnects += 1
                s = socks[i] = socket.create_connection(_addr(url), timeout=2)
                s.setblocking(False)
            try:
                while s.recv(1 << 20):
                    pass
            except (BlockingIOError, OSError):
                pass
        time.sleep(0.001)
    for s in socks:
        s.close()
    return {"requests_sent": requests, "reconnects": reconnects}


def slowloris(url: str, seconds: float, connections: int = 100) -> dict:
    """`connections` requests whose head arrives one byte a second: how many the server closes."""
    end = time.monotonic() + seconds
    head = _head("GET", "/healthz", None, "X-Padding: " + "a" * 4096 + "\r\n")
    socks = []
    for _ in range(connections):
        try:
            socks.append(socket.create_connection(_addr(url), timeout=2))
        except OSError:
            break
    closed, i = 0, 0
    while time.monotonic() < end and i < len(head):
        for s in list(socks):
            try:
                s.send(head[i:i + 1])
            except OSError:
                socks.remove(s)
                closed += 1
        i += 1
        time.sleep(1.0)
    for s in socks:
        s.close()
    return {"connections": connections, "closed_by_server": closed, "open_at_end": len(socks)}


def big_declared_body(url: str, seconds: float, key: str | None = None) -> dict:
    """A 1 GB Content-Length to the audio routes: how long until the server answers."""
    answers, waited = Counter(), []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for path in ("/v1/chat", "/v1/sessions"):
            start = time.monotonic()
            try:
                with socket.create_connection(_addr(url), timeout=5) as s:
                    s.sendall(_head("POST", path, key, "Content-Length: 1000000000\r\n"))
                    s.settimeout(5)
                    answers[f"{path} {_status(s.recv(64))}"] += 1
            except (OSError, socket.timeout) as e:
                answers[f"{path} {type(e).__name__}"] += 1
            waited.append(time.monotonic() - start)
    return {"answers": dict(answers), "worst_answer_s": round(max(waited), 3) if waited else None}


def non_ascii_key(url: str, seconds: float) -> dict:
    """Requests whose bearer key is not ASCII, to every protected route."""
    answers = Counter()
    end = time.monotonic() + seconds
    routes = [("POST", "/v1/sessions", "Content-Length: 2\r\n", b"{}"), ("GET", "/v1/sessions", "", b""),
              ("POST", "/v1/chat", "Content-Length: 0\r\n", b"")]
    while time.monotonic() < end:
        for method, path, extra, body in routes:
            head = (f"{method} {path} HTTP/1.1\r\nHost: lockstep\r\n{extra}").encode() + \
                b"Authorization: Bearer cl\xe9\r\n\r\n" + body
            try:
                with socket.create_connection(_addr(url), timeout=5) as s:
                    s.sendall(head)
                    s.settimeout(5)
                    answers[f"{path} {_status(s.recv(64))}"] += 1
            except (OSError, socket.timeout) as e:
                answers[f"{path} {type(e).__name__}"] += 1
    return {"answers": dict(answers)}


def _ws_handshake(url: str, path: str) -> socket.socket:
    s = socket.create_connection(_addr(url), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: lockstep\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        data = s.recv(4096)
        if not data:
            raise ConnectionError("closed during the websocket handshake")
        reply += data
    if not reply.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"handshake refused: {reply[:40]!r}")
    return s


def _ws_frame(payload: bytes) -> bytes:
    """A masked binary frame (clients must mask)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x82, 0x80 | len(payload)) + mask + masked


def ws_flood(url: str, seconds: float, key: str | None = None) -> dict:
    """Tiny websocket messages (Moshi-protocol text kind, ignored by the server) as fast as taken."""
    path = "/api/chat" + (f"?api_key={key}" if key else "")
    end = time.monotonic() + seconds
    batch = _ws_frame(b"\x02") * 4096
    sent, connections, errors = 0, 0, Counter()
    while time.monotonic() < end:
        connections += 1
        try:
            s = _ws_handshake(url, path)
            s.setblocking(False)
            with s:
                while time.monotonic() < end:
                    try:
                        s.send(batch)
                        sent += 4096
                    except BlockingIOError:
                        time.sleep(0.001)
                    try:
                        s.recv(1 << 16)
                    except BlockingIOError:
                        pass
        except OSError as e:
            errors[type(e).__name__] += 1
            time.sleep(0.05)
    return {"messages_sent": sent, "connections": connections, "errors": dict(errors)}


def admission_storm(url: str, seconds: float, key: str | None = None, posts: int = 200, sockets: int = 100) -> dict:
    """Waves of `posts` session requests and `sockets` websocket calls at once, on a full server."""
    import aiohttp
    answers = Counter()
    headers = {"authorization": f"Bearer {key}"} if key else {}

    async def post(http):
        try:
            async with http.post(url + "/v1/sessions", json={}, headers=headers) as r:
                answers[f"POST {r.status}"] += 1
                if r.status == 201:  # a slot was free after all: give it back
                    sid = (await r.json())["id"]
                    async with http.delete(f"{url}/v1/sessions/{sid}", headers=headers):
                        pass
        except aiohttp.ClientError as e:
            answers[f"POST {type(e).__name__}"] += 1

    async def websocket(http):
        try:
            async with http.ws_connect(url + "/api/chat", params={"api_key": key} if key else {}) as ws:
                msg = await ws.receive()
                answers[f"ws {ws.close_code or msg.type.name}"] += 1
        except aiohttp.ClientError as e:
            answers[f"ws {type(e).__name__}"] += 1

    async def main():
        end = time.monotonic() + seconds
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            while time.monotonic() < end:
                await asyncio.gather(*[post(http) for _ in range(posts)], *[websocket(http) for _ in range(sockets)])

    asyncio.run(main())
    return {"answers": dict(answers)}


def resets(url: str, seconds: float, key: str | None = None, calls: int = 50) -> dict:
    """`calls` /v1/chat calls that send audio and then reset their connection mid-call."""
    answers = Counter()
    end = time.monotonic() + seconds
    audio = b"\x00\x01" * 1920
    made = 0
    while made < calls and time.monotonic() < end:
        made += 1
        try:
            s = socket.create_connection(_addr(url), timeout=5)
            s.sendall(_head("POST", "/v1/chat", key, "Transfer-Encoding: chunked\r\n"))
            for _ in range(5):
                s.sendall(b"%x\r\n" % len(audio) + audio + b"\r\n")
                time.sleep(0.08)
            s.settimeout(0.5)
            try:
                answers[_status(s.recv(64))] += 1
            except socket.timeout:
                answers["no answer yet"] += 1
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
            s.close()
        except OSError as e:
            answers[type(e).__name__] += 1
    return {"calls": made, "answers": dict(answers)}


def parallel(n: int, attack: Callable[..., dict], *args, **kwargs) -> dict:
    """`n` copies of `attack` at once, on threads (each mostly waits in socket calls)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: attack(*args, **kwargs), range(n)))
    return {f"#{i}": r for i, r in enumerate(results)}


def none(url: str, seconds: float) -> dict:
    """The control: no attack, so a row says what the witnesses get from the machine alone."""
    time.sleep(seconds)
    return {}


ATTACKS: dict[str, Callable[..., dict]] = {
    "none": lambda url, s, key: none(url, s),
    "chunks-unauth-sessions": lambda url, s, key: chunk_flood(url, s, "/v1/sessions"),
    "chunks-auth-sessions": lambda url, s, key: chunk_flood(url, s, "/v1/sessions", key),
    "chunks-unauth-chat": lambda url, s, key: chunk_flood(url, s, "/v1/chat"),
    "chunks-auth-chat": lambda url, s, key: chunk_flood(url, s, "/v1/chat", key),
    "chunks-slow-x3": lambda url, s, key: parallel(3, chunk_flood, url, s, "/v1/sessions",
                                                   bytes_per_second=0.5e6),
    "pipelined-healthz": lambda url, s, key: pipelined(url, s),
    "ws-flood": lambda url, s, key: ws_flood(url, s, key),
    "admission-storm": lambda url, s, key: admission_storm(url, s, key),
    "slowloris": lambda url, s, key: slowloris(url, s),
    "resets": lambda url, s, key: resets(url, s, key),
    "big-declared-body": lambda url, s, key: big_declared_body(url, s, key),
    "non-ascii-key": lambda url, s, key: non_ascii_key(url, s),
}


if __name__ == "__main__":
    import sys
    name, url, seconds, *key = sys.argv[1:]
    print(json.dumps(ATTACKS[name](url, float(seconds), key[0] if key else None)), flush=True)
