"""Per-slot host bookkeeping and sampling settings, mirrored into device tensors at join time."""
from __future__ import annotations

import secrets

import torch

from engine.config import SamplingConfig
from engine.sampling import SamplingParams


# A step's top-k bounds are static (they size topk and the noise), so on CUDA each distinct pair is
# a graph of its own, captured in the tick that first meets it; rounded up to this ladder, the set
# stays small whatever values callers pick. A larger bound samples the same tokens: each row still
# keeps only its own top-k, and a candidate's noise depends on its rank, not on the bound. The
# defaults (250, 25) are rungs, so the graphs the warm-up captures are the ones default sessions use.
TOP_K_LADDER = tuple(sorted({1 << i for i in range(16)} | {25, 250}))


def round_bound(k: int) -> int:
    """A top-k bound rounded up to the ladder; 0 ("whole vocabulary") past its top."""
    return next((rung for rung in TOP_K_LADDER if rung >= k), 0) if k > 0 else 0


class SlotTable:
    """Sampling settings of every slot as [max_sessions] device tensors, plus each slot's frame
    count on the host (so which slots have output is known without asking the device).
    `vocab`: the (audio, text) vocabulary sizes, past which a bound is the whole vocabulary."""

    def __init__(self, max_sessions: int, device: torch.device | str, vocab: tuple[int, int] | None = None):
        self.max_sessions = max_sessions
        self.vocab = vocab
        self.greedy = torch.zeros(max_sessions, dtype=torch.bool, device=device)
        self.temperature = torch.zeros(max_sessions, device=device)
        self.top_k = torch.zeros(max_sessions, dtype=torch.long, device=device)
        self.text_temperature = torch.zeros(max_sessions, device=device)
        self.text_top_k = torch.zeros(max_sessions, dtype=torch.long, device=device)
        self.seeds = torch.zeros(max_sessions, dtype=torch.long, device=device)
        self.frames = [0] * max_sessions
        self._top_k = [0] * max_sessions
        self._text_top_k = [0] * max_sessions

    def assign(self, slot: int, cfg: SamplingConfig) -> None:
        cfg.validate()
        if not 0 <= slot < self.max_sessions:
            raise IndexError(f"slot {slot} out of range 0..{self.max_sessions - 1}")
        seed = cfg.seed if cfg.seed is not None else secrets.randbits(63)
        self.greedy[slot] = cfg.greedy
        self.temperature[slot] = cfg.temperature
        self.top_k[slot] = cfg.top_k
        self.text_temperature[slot] = cfg.text_temperature
        self.text_top_k[slot] = cfg.text_top_k
        self.seeds[slot] = seed
        self.frames[slot] = 0
        self._top_k[slot] = cfg.top_k
        self._text_top_k[slot] = cfg.text_top_k

    def top_k_bounds(self, host_slots: list[int]) -> tuple[int, int]:
        """Static (audio, text) top-k bounds over the given slots, on `TOP_K_LADDER`; 0 ("whole
        vocabulary") dominates, and stands for every bound at or past the vocabulary, which samples
        the same tokens, so that top_k=5000 and 10000 on a 2048-code vocabulary share one graph."""
        return self.bounds_of([(self._top_k[s], self._text_top_k[s]) for s in host_slots])

    def bounds_of(self, settings: list[tuple[int, int]]) -> tuple[int, int]:
        """The bounds a batch of rows with these (audio top-k, text top-k) settings steps with."""
        def bound(vals: list[int], vocab: int | None) -> int:
            k = 0 if any(v == 0 for v in vals) else round_bound(max(vals, default=1))
            return 0 if vocab is not None and k >= vocab else k

        audio_vocab, text_vocab = self.vocab or (None, None)
        return bound([a for a, _ in settings], audio_vocab), bound([t for _, t in settings], text_vocab)

    def params(self, slots: torch.Tensor, max_top_k: int, max_text_top_k: int,
               backend: str = "torch") -> SamplingParams:
        """Device-side gather only, so it can be captured in a CUDA graph."""
        return SamplingParams(
            greedy=self.greedy.index_select(0, slots), temperature=self.temperature.index_select(0, slots),
            top_k=self.top_k.index_select(0, slots),
            text_temperature=self.text_temperature.index_select(0, slots),
            text_top_k=self.text_top_k.index_select(0, slots), seeds=self.seeds.index_select(0, slots),
            counters=torch.zeros_like(slots), max_top_k=max_top_k, max_text_top_k=max_text_top_k,
            backend=backend)
