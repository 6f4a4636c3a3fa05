"""Batched top-k / temperature sampling with per-slot settings and per-slot seeded noise.

The reference samples `argmax(p / q)` with q ~ Exp(1) over the top-k probabilities. We draw q from
a counter-based hash of (slot seed, frame, stream, candidate rank) instead of a stateful generator,
so a seeded session draws the same noise whichever sessions share its batch, with no per-slot
Python loop and no host sync (graph-capturable). (Its logits still round by the batch's shape, so a
near-tie may fall another way in another batch: docs/sampling.md.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.noise import uniform_noise

@dataclass
class SamplingParams:
    """Per-row sampling settings as tensors ([B] each), gathered from the slot table."""
    greedy: torch.Tensor  # bool
    temperature: torch.Tensor  # float, audio codebooks
    top_k: torch.Tensor  # long, 0 = whole vocabulary
    text_temperature: torch.Tensor
    text_top_k: torch.Tensor
    seeds: torch.Tensor  # long
    counters: torch.Tensor  # long, the slot's frame index
    max_top_k: int  # static upper bounds over the rows (0 = whole vocabulary), so shapes stay fixed
    max_text_top_k: int
    backend: str = "torch"  # kernels for the noise hash ('torch' | 'triton')


def _candidates(max_k: int, vocab: int) -> int:
    return min(max_k, vocab) if max_k > 0 else vocab


def race_noise(params: "SamplingParams", stream: int, n_streams: int, vocab: int) -> torch.Tensor:
    """The Exp(1) draws [B, n_streams, k] that `sample` divides by, for several streams at once
    (the depth transformer's codebooks share one hash evaluation)."""
    k = _candidates(params.max_text_top_k if stream == 0 else params.max_top_k, vocab)
    return -torch.log(uniform_noise(params.seeds, params.counters, stream, k, n_streams, params.backend))


@dataclass
class StreamRule:
    """The per-row parts of sampling one kind of stream (text, or the audio codebooks) that do not
    depend on the logits: computed once per step and shared by that kind's streams, which spares
    the depth transformer's eight codebooks ~10 small kernels each."""
    k: int  # candidates per row (the static bound)
    temperature: torch.Tensor  # [B, 1]; 1 where the row takes the argmax anyway
    drop: torch.Tensor  # [B, k] bool: candidate ranks past the row's own top-k
    use_argmax: torch.Tensor  # [B] bool


def stream_rule(params: SamplingParams, stream: int, vocab: int) -> StreamRule:
    if stream == 0:
        temperature, top_k, max_k = params.text_temperature, params.text_top_k, params.max_text_top_k
    else:
        temperature, top_k, max_k = params.temperature, params.top_k, params.max_top_k
    k = _candidates(max_k, vocab)
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    row_k = torch.where(top_k > 0, top_k.clamp(max=k), torch.full_like(top_k, k))
    drop = torch.arange(k, device=top_k.device).view(1, -1) >= row_k.view(-1, 1)
    return StreamRule(k, temp.view(-1, 1), drop, params.greedy | (temperature <= 0))


_BF16_MAX = torch.finfo(torch.bfloat16).max


def top_candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits [B, k] (as float32) and their token ids, largest first. Half-precision
    logits tie by the dozen, and topk orders (and at the k-th place, picks) tied ones differently for
    different k, which would move a row's draws with the batch's bound; there ties go to the lower
    token id. float32 logits practically never tie and take the plain top-k."""
    V = logits.shape[-1]
    if logits.dtype == torch.float32:
        return torch.topk(logits, k, dim=-1)
    x = logits.float()
    ids = torch.arange(V, device=logits.device, dtype=torch.int32)
    if logits.dtype == torch.bfloat16 and V <= 1 << 16:
        # A bf16 is the top half of a float32: the bottom half holds the tie-break (growing toward
        # the lower id, whichever the sign), so one float32 top-k decides, as fast as before.
        # Clamped first (an infinity with low bits set would be a NaN): infinities rank with the
        # largest finite logits.
        high = logits.clamp(-_BF16_MAX, _BF16_MAX).view(torch.int16).int() << 16
        low = ((~high) >> 31) & 0xFFFF ^ ids  # 0xFFFF - id where the logit is positive, id where negative
        top_i = torch.topk((high | low).view(torch.float32), k, dim=-1).indices
    else:  # other half formats: each float32's order-preserving int32 and the id, in one int64 key
        bits = x.view(torch.int32)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        top_i = torch.topk((ordered.long() << 32) + (V - 1 - ids), k, dim=-1).indices
    return x.gather(-1, top_i), top_i


def sample(logits: torch.Tensor, params: SamplingParams, stream: int,
           noise: torch.Tensor | None = None, rule: StreamRule | None = None) -> torch.Tensor:
    """logits [B, V] -> tokens [B] (long); stream 0 is text, 1.. the audio codebooks. `noise`:
    this stream's slice of `race_noise`, and `rule`: `stream_rule(...)`, when computed ahead for
    several streams."""
    V = logits.shape[-1]
    rule = rule or stream_rule(params, stream, V)
    argmax = logits.argmax(dim=-1)
    # Top-k of the logits, not of the probabilities: the same candidates in the same order, but
    # free of the exact ties that underflowed probabilities create (which slow topk down 7x).
    top_l, top_i = top_candidates(logits, rule.k)
    # Probabilities up to each row's softmax normalizer, which argmax(p / q) does not see.
    top_p = torch.exp((top_l - top_l[:, :1]) / rule.temperature)
    if noise is None:
        noise = race_noise(params, stream, 1, V)[:, 0]
    choice = (top_p / noise).masked_fill_(rule.drop, -1.0).argmax(dim=-1, keepdim=True)
    sampled = top_i.gather(-1, choice)[:, 0]
    return torch.where(rule.use_argmax, argmax, sampled)
