"""Executes one batched frame step for a set of slots: Mimi encode -> LM -> Mimi decode."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.checkpoint import CheckpointFiles, load_weights, resolve
from engine.config import EngineConfig, SamplingConfig
from engine.lm import MoshiLM
from engine.lm_gen import LMGen
from engine.mimi import Mimi
from engine.profiling import StageTimer
from engine.slots import SlotTable
from engine.tokenizer import TextTokenizer


@dataclass
class StepOutput:
    """Host-side results of one step, rows in the order of the stepped slots."""
    ready: list[bool]  # False while a session is inside the LM's initial delay
    text_tokens: list[int]
    audio_tokens: list[list[int]]
    pcm: dict[int, torch.Tensor]  # slot -> [frame_size] float32 for ready rows


class ModelRunner:
    def __init__(self, lm: MoshiLM, mimi: Mimi, tokenizer: TextTokenizer, max_sessions: int):
        self.lm = lm.eval()
        self.mimi = mimi.eval()
        self.tokenizer = tokenizer
        self.max_sessions = max_sessions
        self.device = next(lm.parameters()).device
        self.frame_size = mimi.frame_size
        self.max_delay = lm.cfg.max_delay
        mimi.set_num_codebooks(lm.cfg.mimi_codebooks)
        mimi.init_state(max_sessions)
        self.gen = LMGen(lm, max_sessions)
        self.slots = SlotTable(max_sessions, self.device)
        self.timer = StageTimer(self.device)

    @staticmethod
    def load(cfg: EngineConfig, files: CheckpointFiles | None = None) -> "ModelRunner":
        cfg.validate()
        files = files or resolve(cfg)
        with torch.device("meta"):
            lm = MoshiLM(files.lm)
            mimi = Mimi(files.mimi)
        load_weights(lm, files.moshi_weights, cfg.torch_dtype, cfg.device)
        # Mimi stays in fp32 whatever the LM dtype, as in kyutai's server.
        load_weights(mimi, files.mimi_weights, torch.float32, cfg.device)
        return ModelRunner(lm, mimi, TextTokenizer(files.tokenizer), cfg.max_sessions)

    def join(self, slot: int, sampling: SamplingConfig) -> None:
        """Starts a fresh session in `slot`; other slots are untouched."""
        self.slots.assign(slot, sampling)
        idx = torch.tensor([slot], device=self.device)
        self.mimi.reset(idx)
        self.gen.reset(idx)

    @torch.no_grad()
    def step(self, slots: list[int], pcm: torch.Tensor) -> StepOutput:
        """pcm [B, frame_size] (float32, one frame per slot) -> the slots' next output frame."""
        if len(set(slots)) != len(slots):
            raise ValueError(f"duplicate slots in one step: {slots}")
        idx = torch.tensor(slots, device=self.device, dtype=torch.long)
        with self.timer("mimi_encode"):
            codes = self.mimi.encode_step(pcm.to(self.device, torch.float32).view(len(slots), 1, -1), idx)
        out, _ = self.gen.step(idx, codes, self.slots.params(idx, slots), self.timer)
        ready = []
        for s in slots:
            self.slots.frames[s] += 1
            ready.append(self.slots.frames[s] > self.max_delay)
        rows = [i for i, r in enumerate(ready) if r]
        pcm_out: dict[int, torch.Tensor] = {}
        if rows:
            sel = torch.tensor(rows, device=self.device)
            with self.timer("mimi_decode"):
                audio = self.mimi.decode_step(out.index_select(0, sel)[:, 1:], idx.index_select(0, sel))
            audio = audio[:, 0].float().cpu()
            for j, i in enumerate(rows):
                pcm_out[slots[i]] = audio[j]
        tokens = out.cpu()
        return StepOutput(ready=ready, text_tokens=tokens[:, 0].tolist(), audio_tokens=tokens[:, 1:].tolist(),
                          pcm=pcm_out)
