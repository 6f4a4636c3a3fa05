"""The engine process seen from the process that started it: start it, know when it is ready, watch
its heartbeat, tell it to drain or stop. Used by `lockstep serve`'s supervisor.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.process import wire
from engine.config import ServeConfig
from engine.process.runtime import HEARTBEAT_NAME, SOCKET_NAME, write_config


class EngineFailed(RuntimeError):
    """The engine process ended; `code` is its exit status."""

    def __init__(self, code: int):
        super().__init__(f"the engine process ended with status {code}")
        self.code = code


class EngineProcess:
    """`engine_args`: EngineConfig's fields as given (the engine resolves and checks them, so this
    process never imports torch). `module` runs the engine: engine.process, or a benchmark's stub."""

    def __init__(self, engine_args: dict, serve_cfg: ServeConfig, module: str = "engine.process"):
        self.runtime = Path(tempfile.mkdtemp(prefix="lockstep-"))
        os.chmod(self.runtime, 0o700)  # the engine socket takes any API process that can reach it
        write_config(self.runtime, engine_args, serve_cfg)
        self.socket_path = str(self.runtime / SOCKET_NAME)
        self.heartbeat_path = str(self.runtime / HEARTBEAT_NAME)
        self.proc = subprocess.Popen([sys.executable, "-m", module, str(self.runtime)],
                                     start_new_session=True)
        self._control: socket.socket | None = None
        self._reader = wire.Reader()
        self._ids = itertools.count(1)
        self.heartbeat: wire.Heartbeat | None = None

    def wait_ready(self) -> None:
        """Returns once the engine has loaded, warmed up and listens; raises EngineFailed if it ended."""
        while True:
            code = self.proc.poll()
            if code is not None:
                raise EngineFailed(code)
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(self.socket_path)
                break
            except OSError:
                sock.close()
                time.sleep(0.1)
        self._control = sock
        self.heartbeat = wire.Heartbeat(self.heartbeat_path)
        self.request("hello", name="supervisor")

    def request(self, op: str, timeout: float = 10.0, **fields) -> dict:
        """A request over the control connection; what the engine broadcasts meanwhile is skipped."""
        rid = next(self._ids)
        self._control.settimeout(timeout)
        self._control.sendall(wire.control(wire.REQUEST, {"id": rid, "op": op, **fields}))
        while True:
            msg = self._reader.next()
            if msg is None:
                data = self._control.recv(1 << 16)
                if not data:
                    raise EngineFailed(self.proc.wait())
                self._reader.feed(data)
                continue
            kind, payload = msg
            if kind == wire.REPLY:
                body = json.loads(bytes(payload))
                if body.get("id") == rid:
                    return body

    def note(self, op: str, **fields) -> None:
        self._control.sendall(wire.control(wire.NOTE, {"op": op, **fields}))

    def skim(self) -> None:
        """Reads and drops the state broadcasts the control connection gets, so they never pile up."""
        self._control.setblocking(False)
        try:
            while data := self._control.recv(1 << 16):
                self._reader.feed(data)
        except (BlockingIOError, OSError):
            pass
        finally:
            self._control.setblocking(True)
        while self._reader.next() is not None:
            pass

    def beat_age(self) -> float | None:
        return None if self.heartbeat is None else self.heartbeat.age()

    def stop(self, timeout: float = 10.0) -> int:
        """Asks the engine to stop (SIGTERM), kills it past `timeout`; its exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = self.proc.wait()
        if self._control is not None:
            self._control.close()
        shutil.rmtree(self.runtime, ignore_errors=True)
        return code
