"""Servers for the tests: `lockstep serve` as a process (the layout users run), and the same parts
in the test's own process (the engine loop and its hub on one thread, an API process's app under
uvicorn on another), so a test can hold slots, drain or patch either side."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | bytes | None = None, headers: dict | None = None,
         timeout: float = 10, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


async def read_events(http, url: str, events: list[dict]) -> None:
    """Appends a session stream's NDJSON events (with tokens) to `events`, up to its end event."""
    async with http.get(url, params={"tokens": "1"}) as r:
        assert r.status == 200
        async for line in r.content:
            events.append(json.loads(line))
            if events[-1]["type"] == "end":
                return


class LiveServer:
    """`lockstep serve` in a process of its own, once it answers /healthz; its output (start-up
    lines and log) in `log()`. With --ssl-certfile it is reached over HTTPS, its certificate unchecked
    (the tests' are self-signed)."""

    def __init__(self, ckpt, *flags: str, key: str | None = None):
        self.port = free_port()
        https = "--ssl-certfile" in flags
        self.url = f"{'https' if https else 'http'}://127.0.0.1:{self.port}"
        self.context = ssl._create_unverified_context() if https else None
        self.headers = {"authorization": f"Bearer {key}"} if key else {}
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--device", "cpu", "--model-dir",
                                      str(ckpt), "--port", str(self.port), *flags], cwd=ROOT,
                                     stdout=self.stderr, stderr=subprocess.STDOUT)
        for _ in range(600):
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1, context=self.context)
                return
            except OSError:
                if self.proc.poll() is not None:
                    pytest.fail(self.log()[-3000:])
                time.sleep(0.1)
        self.stop()
        pytest.fail("the server did not start")

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def get(self, path: str) -> tuple[int, bytes]:
        return http("GET", self.url + path, headers=self.headers, context=self.context)

    def sessions(self) -> list[dict]:
        return json.loads(self.get("/v1/sessions")[1])["sessions"]

    def metric(self, name: str) -> float:
        text = self.get("/metrics")[1].decode()
        return float(re.search(rf"^lockstep:{name} (\S+)$", text, re.M).group(1))

    def wait_idle(self, timeout: float = 10) -> bool:
        """Whether every session has ended within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.sessions():
                return True
            time.sleep(0.05)
        return False

    def pids(self) -> dict[str, list[int]]:
        """The server's processes by role, from /proc."""
        out: dict[str, list[int]] = {"engine": [], "api": []}
        for child in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            out["engine" if b"engine.process" in cmd else "api"].append(int(child))
        return out

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


class InProcessServer:
    """The engine loop ticking on a thread with its hub, and an API process's app (api/worker.py)
    under uvicorn on another thread, in the test's process."""

    def __init__(self, loop, cfg):
        from api.link import EngineLink
        from api.worker import build_server
        from engine.process import wire
        from engine.process.hub import Hub
        self.engine, self.cfg = loop, cfg
        self.runtime = Path(tempfile.mkdtemp(prefix="lockstep-test-"))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.runtime / "engine.sock"))
        listener.listen(16)
        heartbeat = wire.Heartbeat(str(self.runtime / "heartbeat"), create=True)
        self.hub = Hub(loop, listener, heartbeat)
        self._engine_thread = threading.Thread(
            target=loop.run_realtime, kwargs={"wait": self.hub.serve, "after_tick": self.hub.flush}, daemon=True)
        self._engine_thread.start()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.counters: Counter = Counter()
        started = threading.Event()

        async def serve():
            self.link = await EngineLink.connect(str(self.runtime / "engine.sock"), "test",
                                                 str(self.runtime / "heartbeat"))
            self.server = build_server(self.link, cfg, self.counters)
            started.set()
            await self.server.serve(sockets=[sock])

        self._api_thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
        self._api_thread.start()
        started.wait(10)
        while not self.server.started:
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self._api_thread.join(10)
        self.engine.stop()
        self._engine_thread.join(10)
