"""Benchmark-only stub: the engine process of `lockstep serve` with the model's step replaced by one
that costs nothing, so `lockstep bench host` measures the host side alone (API processes, the hub,
delivery, codecs) at session counts no CPU could step for real.

Everything but the model is the product's: the supervisor, the API processes, the hub, the session
table, the scheduler and the real-time cadence. The stub echoes each session's input frame as its
output audio and gives a text piece every fourth frame, about as often as Moshi speaks a word.

    python -m bench.stub_engine RUNTIME_DIR       # as the supervisor starts an engine
    python -m bench.stub_engine serve PORT API_WORKERS MAX_SESSIONS   # the whole server, stubbed
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from engine.config import FRAME_SIZE, FRAME_RATE, EngineConfig, SamplingConfig, ServeConfig
from engine.kv.pool import KVPool
from engine.runner import StepOutput
from engine.serving import EngineLoop

TEXT_EVERY = 4
DEP_Q = 8


class StubTokenizer:
    def piece(self, token: int) -> str:
        return " word" if token else ""


@dataclass
class StubRunner:
    max_sessions: int
    frame_size: int = FRAME_SIZE
    max_delay: int = 0
    default_sampling: SamplingConfig = SamplingConfig()
    tokenizer: StubTokenizer = StubTokenizer()

    def __post_init__(self) -> None:
        self.frames = [0] * self.max_sessions
        # The product's KV pool and its books (admission, pages per session), with pages of one
        # float: a session holds its one page, as under `reserve`.
        self.kv = KVPool(1, 1, 1, 1, slots=self.max_sessions + 1, pages=self.max_sessions, page_size=1,
                         dtype=torch.float32, device="cpu")

    def join(self, slot: int, sampling: SamplingConfig, owner=None) -> None:
        self.frames[slot] = 0
        self.kv.join(slot, ("slot", slot) if owner is None else owner)

    def step(self, slots: list[int], pcm: torch.Tensor) -> StepOutput:
        tokens = []
        for s in slots:
            self.frames[s] += 1
            tokens.append(1 if self.frames[s] % TEXT_EVERY == 0 else 0)
        return StepOutput(ready=[True] * len(slots), text_tokens=tokens,
                          audio_tokens=[[0] * DEP_Q for _ in slots], pcm={s: pcm[i] for i, s in enumerate(slots)})


def build_stub(engine_cfg: EngineConfig, serve_cfg: ServeConfig) -> EngineLoop:
    print(f"lockstep: STUB engine (bench only: no model), {engine_cfg.max_sessions} slots", flush=True)
    return EngineLoop(StubRunner(engine_cfg.max_sessions),
                      max_buffer_frames=max(1, int(serve_cfg.max_buffer_seconds * FRAME_RATE)),
                      idle_timeout=serve_cfg.idle_timeout, max_waiting=0, max_input_lag=serve_cfg.max_input_lag)


def main(argv: list[str]) -> None:
    if argv[0] == "serve":
        from api.server import serve
        port, workers, sessions = (int(a) for a in argv[1:4])
        serve({"max_sessions": sessions, "device": "cpu"},
              ServeConfig(port=port, api_workers=workers, no_warmup=True).validate(), engine_module="bench.stub_engine")
    else:
        from engine.process.main import main as engine_main
        engine_main(argv, build=build_stub)


if __name__ == "__main__":
    main(sys.argv[1:])
