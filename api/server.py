"""`lockstep serve`: the engine thread plus uvicorn, with a graceful drain on SIGTERM."""
from __future__ import annotations

import copy
import logging
import threading
import time

import uvicorn

from api.app import create_app
from engine import capacity, host
from engine.config import FRAME_RATE, ConfigError, EngineConfig, ServeConfig
from engine.runner import ModelRunner
from engine.serving import EngineLoop
from kernels import linear, stack_cpu

log = logging.getLogger("lockstep")


class DrainingServer(uvicorn.Server):
    """First SIGTERM/SIGINT: refuse new sessions and give running ones `shutdown_timeout` seconds
    to finish; then stop. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, engine: EngineLoop, shutdown_timeout: float):
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:  # the second signal, whichever: stop now, open connections or not
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        self.engine.drain()
        log.info("draining: %d running session(s), up to %.0f s", len(self.engine.sessions), self.shutdown_timeout)
        threading.Thread(target=self._wait_then_exit, daemon=True).start()

    def _wait_then_exit(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        while self.engine.sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        for sid in list(self.engine.sessions):
            self.engine.end_session(sid, "server_shutdown")
        time.sleep(0.3)  # let the end events reach their streams
        self.should_exit = True


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
    products = (f", CPU products on {linear.describe()}, {stack_cpu.describe(runner.lm, runner.mimi)}"
                if runner.device.type == "cpu" else "")
    adapter = f" + LoRA {runner.lora.path.name} (scaling {runner.lora.scaling:g}, folded in)" if runner.lora else ""
    print(f"lockstep: {engine_cfg.model_dir or engine_cfg.hf_repo}{adapter} on {runner.device} (LM {lm_dtype}, "
          f"kernels {runner.kernel_backend}{products}, CUDA graphs {'on' if runner.graphs else 'off'}), "
          f"{runner.max_sessions} slots{invariant}, http://{serve_cfg.host}:{serve_cfg.port} "
          "(v1 API, /v1/chat, ws /api/chat, /metrics)", flush=True)
    loop = EngineLoop(runner, max_buffer_frames=max(1, int(serve_cfg.max_buffer_seconds * FRAME_RATE)),
                      idle_timeout=serve_cfg.idle_timeout, max_waiting=0)
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


def log_config() -> dict:
    """uvicorn's logging setup plus the engine's logger (sessions joining and ending, late ticks),
    in the same format on the same stream."""
    cfg = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    cfg["loggers"]["lockstep"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return cfg


def serve(engine_cfg: EngineConfig, serve_cfg: ServeConfig) -> None:
    # The model is loaded, warmed up and ticked on the engine's own thread (`EngineLoop.spawn`
    # says why); this thread only serves HTTP.
    engine = EngineLoop.spawn(lambda: build_engine(engine_cfg, serve_cfg))
    # Once the sessions have ended, connections still open (an upload trickling in, say) get a few
    # seconds, not forever.
    config = uvicorn.Config(create_app(engine, serve_cfg), host=serve_cfg.host, port=serve_cfg.port,
                            log_level="info", log_config=log_config(), timeout_graceful_shutdown=5)
    try:
        DrainingServer(config, engine, serve_cfg.shutdown_timeout).run()
    finally:
        engine.stop()
        host.unsettle()
