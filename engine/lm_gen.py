"""Per-slot generation state around the LM: acoustic delays, initial tokens and frame alignment.

Follows the reference `LMGen._step`: a small ring of tokens per slot holds the user's codes
(written `delay` frames ahead) and the generated ones; a stream reads the initial token until the
slot's frame index passes that stream's delay, and outputs are re-aligned by undoing the delays,
so the first `max_delay` frames of a session produce nothing.
"""
from __future__ import annotations

import dataclasses

import torch

from engine.lm import MoshiLM, TokenProbe
from engine.profiling import StageTimer
from engine.sampling import SamplingParams, sample

UNGENERATED = -2
_NO_TIMER = StageTimer("cpu")


class LMGen:
    def __init__(self, lm: MoshiLM, max_sessions: int, pool=None):
        cfg = lm.cfg
        self.lm = lm
        self.cfg = cfg
        device = next(lm.parameters()).device
        self.ring = cfg.max_delay + 2
        self.delays = torch.tensor(cfg.delays, device=device, dtype=torch.long)
        self.initial = torch.tensor([cfg.text_card] + [cfg.card] * cfg.n_q, device=device, dtype=torch.long)
        self.cache = torch.full((max_sessions, cfg.num_codebooks, self.ring), UNGENERATED, device=device,
                                dtype=torch.long)
        self.offsets = torch.zeros(max_sessions, device=device, dtype=torch.long)
        lm.init_state(max_sessions, pool)

    def reset(self, slots: torch.Tensor) -> None:
        self.offsets.index_fill_(0, slots, 0)
        self.cache.index_fill_(0, slots, UNGENERATED)
        self.lm.reset(slots)

    @torch.no_grad()
    def step(self, slots: torch.Tensor, user_tokens: torch.Tensor, params: SamplingParams,
             timer: StageTimer | None = None, probe: TokenProbe | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """user_tokens [B, n_q - dep_q] for `slots` -> (tokens [B, dep_q + 1], ready [B]).

        tokens[:, 0] is the text token and tokens[:, 1:] the audio codes of one aligned output
        frame; rows where `ready` is False are still inside the initial delay and hold -2.
        `probe` sees every stream's logits and chooses the tokens kept (`TokenProbe`)."""
        cfg = self.cfg
        B = slots.shape[0]
        user_tokens = user_tokens[:, : cfg.num_user_codebooks]
        cache = self.cache.index_select(0, slots)
        offsets = self.offsets.index_select(0, slots)
        ar = torch.arange(B, device=slots.device)

        user_cb = torch.arange(cfg.dep_q + 1, cfg.num_codebooks, device=slots.device)
        write = (offsets.view(-1, 1) + self.delays[user_cb].view(1, -1)) % self.ring
        cache[ar.view(-1, 1), user_cb.view(1, -1), write] = user_tokens

        read = (offsets % self.ring).view(-1, 1, 1).expand(B, cfg.num_codebooks, 1)
        inputs = cache.gather(2, read)[..., 0]
        is_init = offsets.view(-1, 1) <= self.delays.view(1, -1)
        inputs = torch.where(is_init, self.initial.view(1, -1), inputs)

        params = dataclasses.replace(params, counters=offsets)
        timer = timer or _NO_TIMER
        with timer("lm_temporal"):
            transformer_out, text_logits = self.lm.forward_text(inputs, slots)
            text_token = sample(text_logits, params, stream=0)
            if probe is not None:
                text_token = probe(0, text_logits, text_token)
        with timer("lm_depth"):
            audio_tokens = self.lm.depth_step(text_token, transformer_out, slots, params, probe)

        offsets = offsets + 1
        gen = torch.cat([text_token[:, None], audio_tokens], dim=1)  # [B, dep_q + 1]
        cache[ar, : cfg.dep_q + 1, offsets % self.ring] = gen

        gen_delays = self.delays[: cfg.dep_q + 1]
        index = (offsets.view(-1, 1) - cfg.max_delay + gen_delays.view(1, -1)) % self.ring
        out = cache[ar.view(-1, 1), torch.arange(cfg.dep_q + 1, device=slots.device).view(1, -1), index]
        ready = offsets > cfg.max_delay
        out = torch.where(ready.view(-1, 1), out, torch.full_like(out, UNGENERATED))

        self.cache.index_copy_(0, slots, cache)
        self.offsets.index_copy_(0, slots, offsets)
        return out, ready
