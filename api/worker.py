"""An API process of `lockstep serve`: HTTP and websockets on the listening socket it shares with
the other API processes, talking to the engine process over api/link.py.

The supervisor starts it as `python -m api.worker RUNTIME_DIR INDEX FD [METRICS_FD]`, the listening
sockets inherited as file descriptors. When it dies, only its own connections are lost: the
supervisor starts another in its place.
"""
from __future__ import annotations

import asyncio
import logging.config
import socket
import sys
from collections import Counter
from pathlib import Path

import uvicorn

from api.app import create_app, metrics_app
from api.limits import guarded_http
from api.link import EngineLink
from engine import host
from engine.config import ServeConfig, from_dict
from engine.process.runtime import HEARTBEAT_NAME, SOCKET_NAME, log_config, read_config


async def report_counters(link: EngineLink, counters: Counter) -> None:
    """What this process refused at the door, for the engine's /metrics, once a second if it changed."""
    sent: dict = {}
    while not link.lost:
        await asyncio.sleep(1.0)
        if dict(counters) != sent:
            sent = dict(counters)
            link.note("counters", values=sent)


def by_port(main_app, metrics, metrics_port: int | None):
    """One ASGI app for both listening sockets: requests to `metrics_port` get `metrics`."""
    if metrics_port is None:
        return main_app

    async def app(scope, receive, send):
        server = scope.get("server")
        target = metrics if server is not None and server[1] == metrics_port else main_app
        await target(scope, receive, send)
    return app


def build_server(link: EngineLink, cfg: ServeConfig, counters: Counter) -> uvicorn.Server:
    app = by_port(create_app(link, cfg, metrics_here=cfg.metrics_port is None), metrics_app(link), cfg.metrics_port)
    return uvicorn.Server(uvicorn.Config(app, http=guarded_http(cfg.head_timeout, counters), log_config=None,
                                         timeout_graceful_shutdown=5, backlog=2048,
                                         ssl_certfile=cfg.ssl_certfile, ssl_keyfile=cfg.ssl_keyfile))


async def serve(runtime: Path, index: int, sockets: list[socket.socket], cfg: ServeConfig) -> None:
    link = await EngineLink.connect(str(runtime / SOCKET_NAME), f"api-{index}", str(runtime / HEARTBEAT_NAME))
    counters: Counter = Counter()
    reporter = asyncio.create_task(report_counters(link, counters))
    try:
        await build_server(link, cfg, counters).serve(sockets=sockets)
    finally:
        reporter.cancel()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    runtime, index, fds = Path(argv[0]), int(argv[1]), [int(fd) for fd in argv[2:]]
    host.die_with_parent()
    host.yield_to_engine()
    logging.config.dictConfig(log_config())
    cfg = from_dict(ServeConfig, read_config(runtime)["serve"])
    sockets = [socket.socket(fileno=fd) for fd in fds]
    asyncio.run(serve(runtime, index, sockets, cfg))


if __name__ == "__main__":
    main()
