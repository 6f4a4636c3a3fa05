"""lockstep's side of `bench.fidelity`: the engine's own LM step (`LMGen.step`, the runner's weights,
kernels and, on CUDA, a CUDA graph of the step) with a teacher-forcing probe, and its Mimi encoder.

`TeacherForcing` is an `engine.lm.TokenProbe` made of device ops on static buffers: it records the
logits of every stream and the engine's own greedy choice, and hands back the token to force, so the
same object works eagerly and inside a captured graph.
"""
from __future__ import annotations

import torch

from bench.fidelity_reference import StepLogits
from engine.config import LMConfig, SamplingConfig
from engine.graphs import capture
from engine.runner import ModelRunner


class TeacherForcing:
    """A `TokenProbe` for `rows` rows: forces `tokens` [rows, 1 + dep_q] (text first) and keeps
    each stream's logits (float32) and the sampler's choice."""

    def __init__(self, rows: int, cfg: LMConfig, device: torch.device):
        self.tokens = torch.zeros(rows, 1 + cfg.dep_q, dtype=torch.long, device=device)
        self.sampled = torch.zeros_like(self.tokens)
        self.text = torch.zeros(rows, cfg.text_card, device=device)
        self.audio = torch.zeros(rows, cfg.dep_q, cfg.card, device=device)

    def __call__(self, stream: int, logits: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
        (self.text if stream == 0 else self.audio[:, stream - 1]).copy_(logits)
        self.sampled[:, stream].copy_(sampled)
        return self.tokens[:, stream]


class LockstepStepper:
    """One session in slot 0 of a one-slot runner, sampling greedily (the sampler's choice is then
    the engine's top-1, tie-break included), its LM step teacher-forced. `graphed` (default: on
    CUDA, as the engine serves) replays the step from a CUDA graph."""

    def __init__(self, runner: ModelRunner, graphed: bool | None = None):
        if runner.max_sessions != 1:
            raise ValueError("the fidelity stepper drives a runner of one slot")
        self.runner = runner
        cfg, dev = runner.lm.cfg, runner.device
        self.probe = TeacherForcing(1, cfg, dev)
        self.greedy = SamplingConfig(greedy=True)
        self.bounds = runner.slots.bounds_of([(self.greedy.top_k, self.greedy.text_top_k)])
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.user = torch.zeros(1, cfg.n_q - cfg.dep_q, dtype=torch.long, device=dev)
        self.replay = None
        if dev.type == "cuda" if graphed is None else graphed:
            # Captured on the scratch slot (the warm-up runs write its state), then pointed at slot 0.
            runner.slots.assign(runner.scratch_slot, self.greedy)
            self.slot.fill_(runner.scratch_slot)
            self.replay, _ = capture(self._lm_step, runner.graphs.pool if runner.graphs else None)
            self.slot.fill_(0)

    def _lm_step(self):
        params = self.runner.slots.params(self.slot, *self.bounds, self.runner.kernel_backend)
        return self.runner.gen.step(self.slot, self.user, params, probe=self.probe)

    def start(self) -> None:
        """A fresh session in slot 0 (Mimi's and the LM's state reset)."""
        self.runner.join(0, self.greedy)

    @torch.no_grad()
    def encode(self, frame: torch.Tensor) -> torch.Tensor:
        """frame [frame_size] float32 -> the engine's Mimi codes [num_codebooks] for it."""
        pcm = frame.to(self.runner.device, torch.float32).view(1, 1, -1)
        return self.runner.mimi.encode_step(pcm, self.slot)[0]

    @torch.no_grad()
    def step(self, user_codes: torch.Tensor, forced: torch.Tensor) -> StepLogits:
        """user_codes [1, n_user], forced [1, 1 + dep_q] -> this frame's logits and greedy choices."""
        self.user.copy_(user_codes[:, : self.user.shape[1]])
        self.probe.tokens.copy_(forced)
        if self.replay is not None:
            self.replay()
        else:
            self._lm_step()
        p = self.probe
        return StepLogits(p.text.clone(), p.audio.clone(), p.sampled.clone())
