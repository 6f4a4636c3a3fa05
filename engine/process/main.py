"""The engine process of `lockstep serve`: loads the model, then ticks on its main thread while it
serves the API processes (engine/process/hub.py) in the time between ticks.

The supervisor (api/server.py) starts it as `python -m engine.process RUNTIME_DIR`. It reads its
configuration from RUNTIME_DIR/config.json, beats in RUNTIME_DIR/heartbeat, and listens on
RUNTIME_DIR/engine.sock once the model is loaded and warmed up: that socket answering is the sign it
is ready. A configuration or checkpoint error ends it with status 2 and the message on stderr.
"""
from __future__ import annotations

import logging
import logging.config
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from engine import capacity, host
from engine.process import wire
from engine.checkpoint import CheckpointError
from engine.config import FRAME_RATE, ConfigError, EngineConfig, ServeConfig, from_dict
from engine.process.hub import Hub
from engine.runner import ModelRunner
from engine.process.runtime import HEARTBEAT_NAME, SOCKET_NAME, log_config, read_config
from engine.serving import EngineLoop
from kernels import linear, stack_cpu


def build_engine(engine_cfg: EngineConfig, serve_cfg: ServeConfig) -> EngineLoop:
    from engine.cli import with_builtin_weights
    engine_cfg = with_builtin_weights(engine_cfg)
    runner = ModelRunner.load(engine_cfg)
    ticks = None
    if not serve_cfg.no_warmup:
        start = time.perf_counter()
        sizes = runner.warm_up()
        print(f"lockstep: warmed up batch sizes {sizes} in {time.perf_counter() - start:.1f} s", flush=True)
        ticks = capacity.probe_ticks(runner)
        print(f"lockstep: {capacity.describe_ticks(ticks, runner.max_sessions, serve_cfg.admit_realtime)}",
              flush=True)
    host.settle()
    lm_dtype = str(engine_cfg.torch_dtype).removeprefix("torch.")
    invariant = " (batch-invariant: every tick steps them all)" if runner.batch_invariant else ""
    products = (f", {torch.get_num_threads()} CPU thread(s), CPU products on {linear.describe()}, "
                f"{stack_cpu.describe(runner.lm, runner.mimi)}"
                if runner.device.type == "cpu" else "")
    adapter = f" + LoRA {runner.lora.path.name} (scaling {runner.lora.scaling:g}, folded in)" if runner.lora else ""
    print(f"lockstep: {engine_cfg.model_dir or engine_cfg.hf_repo}{adapter} on {runner.device} (LM {lm_dtype}, "
          f"kernels {runner.kernel_backend}{products}, CUDA graphs {'on' if runner.graphs else 'off'}), "
          f"{runner.max_sessions} slots{invariant}", flush=True)
    print(f"lockstep: {runner.kv.describe()}; {runner.kv_plan.why}", flush=True)
    loop = EngineLoop(runner, max_buffer_frames=max(1, int(serve_cfg.max_buffer_seconds * FRAME_RATE)),
                      idle_timeout=serve_cfg.idle_timeout, max_waiting=0, max_input_lag=serve_cfg.max_input_lag,
                      session_prefix=serve_cfg.session_prefix)
    if ticks:
        fit = capacity.realtime_sessions(ticks)
        loop.metrics.set_probe(ticks, fit)
        if serve_cfg.admit_realtime:
            if fit == 0:
                raise ConfigError("--admit-realtime: the capacity probe found that even one session runs slower "
                                  "than real time here, so it would admit no one (use a faster device, or drop "
                                  "the flag to serve late)")
            loop.limit_admission(fit)
    return loop


def run(runtime: Path, engine_cfg: EngineConfig, serve_cfg: ServeConfig,
        build: Callable[[EngineConfig, ServeConfig], EngineLoop] = build_engine) -> None:
    torch.set_num_threads(serve_cfg.threads)
    loop = build(engine_cfg, serve_cfg)
    heartbeat = wire.Heartbeat(str(runtime / HEARTBEAT_NAME), create=True)
    heartbeat.beat()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(runtime / SOCKET_NAME))
    listener.listen(64)
    hub = Hub(loop, listener, heartbeat)
    signal.signal(signal.SIGTERM, lambda *_: loop.stop())
    try:
        loop.run_realtime(wait=hub.serve, after_tick=hub.flush)
    finally:
        host.unsettle()


def main(argv: list[str] | None = None,
         build: Callable[[EngineConfig, ServeConfig], EngineLoop] = build_engine) -> None:
    argv = sys.argv[1:] if argv is None else argv
    runtime = Path(argv[0])
    host.die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to act on: it drains
    logging.config.dictConfig(log_config())
    cfgs = read_config(runtime)
    try:
        engine_cfg = from_dict(EngineConfig, cfgs["engine"]).validate()
        run(runtime, engine_cfg, from_dict(ServeConfig, cfgs["serve"]).validate(), build)
    except (ConfigError, CheckpointError) as e:
        print(f"lockstep: error: {e}", file=sys.stderr, flush=True)
        os._exit(2)


if __name__ == "__main__":
    main()
