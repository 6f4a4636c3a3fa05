"""What the processes of `lockstep serve` share: the runtime folder's files and the logging format.

The supervisor makes the folder (private to the user) and writes the configuration there; the
engine process listens on its socket and beats in its heartbeat file; the API processes read both.
Nothing here imports torch: the supervisor and the API processes never load it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

SOCKET_NAME, HEARTBEAT_NAME, CONFIG_NAME = "engine.sock", "heartbeat", "config.json"


def write_config(runtime: Path, engine_args: dict, serve_cfg) -> None:
    (runtime / CONFIG_NAME).write_text(json.dumps({"engine": engine_args, "serve": dataclasses.asdict(serve_cfg)}))


def read_config(runtime: Path) -> dict:
    return json.loads((runtime / CONFIG_NAME).read_text())


def log_config() -> dict:
    """uvicorn's logging setup plus the engine's logger (sessions joining and ending, late ticks),
    in the same format on the same stream, in every process of the server."""
    import uvicorn.config
    cfg = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    cfg["loggers"]["lockstep"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return cfg
