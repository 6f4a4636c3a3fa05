"""`lockstep serve`: a supervisor, one engine process and `--api-workers` API processes.

    supervisor (this process: signals, health, restarts; no model, no connections)
    ├── engine process (engine/process/main.py): the device, the scheduler, the 80 ms tick; between
    │   ticks it serves the API processes over a Unix socket (engine/process/hub.py)
    └── API processes (api/worker.py): HTTP, websockets and codecs on one shared listening socket

The engine ticks on a core, an interpreter and a GIL of its own: no connection, however hostile,
runs on it. An API process that dies loses only its own connections and is started again; an engine
process that dies, or stops beating for `--engine-timeout` seconds, ends the server with status 1
(its /healthz already fails after 5 s), so whatever supervises lockstep restarts it.

On the first SIGTERM/SIGINT the engine refuses new sessions and running ones get
`--shutdown-timeout` seconds to finish; then the API processes close their connections (5 s grace)
and everything stops. A second signal stops everything at once.
"""
from __future__ import annotations

import logging
import logging.config
import signal
import socket
import subprocess
import sys
import time

from api.engine_process import EngineFailed, EngineProcess
from engine.config import ServeConfig
from engine.process.runtime import log_config

log = logging.getLogger("lockstep")
POLL_SECONDS = 0.1


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(self, engine_args: dict, cfg: ServeConfig, engine_module: str = "engine.process"):
        self.cfg = cfg
        self.sockets = [listen(cfg.host, cfg.port)]
        if cfg.metrics_port is not None:
            self.sockets.append(listen(cfg.host, cfg.metrics_port))
        self.engine = EngineProcess(engine_args, cfg, engine_module)
        self.workers: list[subprocess.Popen] = []
        self.signals = 0

    def _spawn_worker(self, index: int) -> subprocess.Popen:
        fds = [str(s.fileno()) for s in self.sockets]
        return subprocess.Popen([sys.executable, "-m", "api.worker", str(self.engine.runtime), str(index), *fds],
                                pass_fds=[s.fileno() for s in self.sockets], start_new_session=True)

    def _on_signal(self, sig, frame) -> None:
        self.signals += 1

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            self.engine.wait_ready()
        except EngineFailed as e:
            return e.code
        n = self.cfg.workers
        self.workers = [self._spawn_worker(i) for i in range(n)]
        metrics = f", /metrics on port {self.cfg.metrics_port}" if self.cfg.metrics_port else ", /metrics"
        page = "--static page" if self.cfg.static else "web page"
        print(f"lockstep: serving {self.cfg.url} ({page} at /, v1 API, /v1/chat, ws /api/chat, ws /v1/realtime"
              f"{metrics}) "
              f"from {n} API process(es); the engine ticks in process {self.engine.proc.pid}", flush=True)
        try:
            return self._watch()
        finally:
            self._stop_all()

    def _watch(self) -> int:
        while True:
            if self.signals:
                return self._drain()
            problem = self._engine_problem()
            if problem:
                log.error("%s: stopping the server", problem)
                return 1
            for i, proc in enumerate(self.workers):
                if proc.poll() is not None:
                    log.error("API process %d ended with status %s: starting another in its place", i, proc.returncode)
                    self.workers[i] = self._spawn_worker(i)
            self.engine.skim()
            time.sleep(POLL_SECONDS)

    def _engine_problem(self) -> str | None:
        code = self.engine.proc.poll()
        if code is not None:
            return f"the engine process ended with status {code}"
        age = self.engine.beat_age()
        if age is not None and age > self.cfg.engine_timeout:
            self.engine.proc.kill()
            return f"the engine loop has not come round for {age:.0f} s (--engine-timeout)"
        return None

    def _drain(self) -> int:
        """Refuse new sessions, let running ones finish, then stop; a second signal cuts it short."""
        try:
            self.engine.note("drain")
            sessions = self.engine.request("list")["sessions"]
            log.info("draining: %d running session(s), up to %.0f s", len(sessions), self.cfg.shutdown_timeout)
            deadline = time.monotonic() + self.cfg.shutdown_timeout
            while sessions and time.monotonic() < deadline and self.signals < 2 and not self._engine_problem():
                time.sleep(POLL_SECONDS)
                sessions = self.engine.request("list")["sessions"]
            if sessions and self.signals < 2:
                self.engine.note("end_all", reason="server_shutdown")
                time.sleep(0.5)  # the end events reach their streams
        except (OSError, EngineFailed) as e:
            log.error("the engine went away while draining (%s)", e)
            return 1
        return 0

    def _stop_all(self) -> None:
        """API processes first (5 s for their connections, less after a second signal), then the engine."""
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if self.signals < 2 else signal.SIGKILL)
        deadline = time.monotonic() + 7
        for proc in self.workers:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        self.engine.stop()
        for sock in self.sockets:
            sock.close()


def serve(engine_args: dict, cfg: ServeConfig, engine_module: str = "engine.process") -> None:
    logging.config.dictConfig(log_config())
    sys.exit(Supervisor(engine_args, cfg, engine_module).run())
