"""Per-connection limits where bytes arrive, against a real uvicorn on loopback: refusals answered
without reading the body, request heads that must come whole and in time, floods of tiny chunks
read at a capped rate."""
import socket
import time

import pytest

from api.limits import Bucket
from engine.config import EngineConfig, ServeConfig
from engine.runner import ModelRunner
from engine.serving import EngineLoop
from tests.servers import InProcessServer


@pytest.fixture(scope="module")
def srv(tiny_wrap_ckpt):
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=2))
    server = InProcessServer(EngineLoop(runner, max_waiting=0),
                             ServeConfig(api_key=("k",), head_timeout=0.5, admission_wait=0.0))
    yield server
    server.close()


def connect(srv) -> socket.socket:
    host, port = srv.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=5)
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while data := s.recv(1 << 16):
        out += data
    return out


def test_a_refused_request_is_answered_and_closed_without_its_body(srv):
    for head in (b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
                 b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                 b"POST /v1/sessions/x/audio HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n"):
        with connect(srv) as s:
            s.sendall(head)  # and not one byte of the body
            start = time.monotonic()
            reply = read_all(s)
            assert reply.startswith(b"HTTP/1.1 401") and b"connection: close" in reply.lower()
            assert time.monotonic() - start < 1


def test_a_declared_body_over_the_cap_is_refused_at_once(srv):
    with connect(srv) as s:
        s.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                  b"Content-Length: 1000000000\r\n\r\n")
        assert read_all(s).startswith(b"HTTP/1.1 413")


def test_a_request_head_must_come_whole_and_in_time(srv):
    with connect(srv) as s:  # nothing at all
        start = time.monotonic()
        assert read_all(s).startswith(b"HTTP/1.1 408") and 0.4 < time.monotonic() - start < 3
    with connect(srv) as s:  # a slowloris: a byte at a time, never the end of the head
        start = time.monotonic()
        try:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                s.sendall(bytes([byte]))
                time.sleep(0.05)
        except OSError:
            pass
        assert time.monotonic() - start < 3
        assert read_all(s).startswith(b"HTTP/1.1 408")
    with connect(srv) as s:  # a head too large
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (80 << 10) + b"\r\n\r\n")
        assert read_all(s).startswith(b"HTTP/1.1 431")
    with connect(srv) as s:  # keep-alive: a second request after the first is fine
        for _ in range(2):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while not reply.endswith(b'{"status":"ok"}'):
                reply += s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 200")
            time.sleep(0.7)  # idle between requests is keep-alive's business, not the head timer's
    assert srv.counters["head_timeouts"] >= 2 and srv.counters["head_too_large"] == 1


def test_a_flood_of_tiny_chunks_is_read_at_a_capped_rate(srv):
    """5,000 one-byte chunks sent at once take the server seconds to read (1,000 a second after a
    burst of 2,000, give or take the last slice), not the milliseconds they take to send."""
    throttled = srv.counters["throttled_reads"]
    with connect(srv) as s:
        s.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n" + b"1\r\n \r\n" * 5000 + b"0\r\n\r\n")
        start = time.monotonic()
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 201") and time.monotonic() - start > 1.5
    assert srv.counters["throttled_reads"] > throttled


def test_bucket_spends_a_burst_then_owes_time():
    bucket = Bucket(100.0, 10.0)
    bucket.take(5)
    assert bucket.debt() == 0
    bucket.take(15)  # 10 past the burst: 0.1 s to earn them back, and the next token
    assert 0.09 < bucket.debt() <= 0.11
    time.sleep(0.12)
    assert bucket.debt() == 0
