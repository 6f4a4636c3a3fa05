"""Decode attention over per-slot ring-buffer KV caches: the public entry point and its torch path.

Semantics follow kyutai's `RingKVCache`: the T new keys are written first, then every query
attends over the whole ring, where each ring entry's absolute position is derived from the slot's
offset; entries not yet written, in the future, or `context` or more positions back are masked.
`backend="triton"` runs `kernels.attention_triton` (same contract, cost proportional to each
slot's valid length, rows whose slot is < 0 skipped).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def ring_positions(offsets: torch.Tensor, T: int, capacity: int) -> torch.Tensor:
    """Absolute position held by each ring entry after writing T steps at `offsets` ([B] -> [B, cap]);
    -1 marks entries never written."""
    idx = torch.arange(capacity, device=offsets.device, dtype=torch.long)
    last = offsets.view(-1, 1) + T - 1
    delta = idx - last % capacity
    pos = torch.where(delta <= 0, last + delta, last + delta - capacity)
    return torch.where(idx >= offsets.view(-1, 1) + T, torch.full_like(pos, -1), pos)


def _run_start(slots: torch.Tensor) -> int | None:
    """The first slot when `slots` are a contiguous run (the scheduler's usual batch), else None.
    Only checked on CPU, where reading `slots` costs no sync."""
    if slots.device.type == "cpu" and len(slots):
        first = int(slots[0])
        if torch.equal(slots, torch.arange(first, first + len(slots), dtype=slots.dtype)):
            return first
    return None


class RingPlan(NamedTuple):
    """Where a step writes and what each query may see; the same for every layer of a step."""
    write: torch.Tensor  # [B, T] ring index of each new position
    mask: torch.Tensor | None  # [B or 1, 1, T, n_keys] bool; None: every query sees every key
    n_keys: int  # ring entries [0, n_keys) are attended over; the rest were never written
    run_start: int | None  # slots are run_start + [0, B): the caches' rows are read as a view
    position: int | None = None  # every row writes at ring entries [position, position + T)


def ring_plan(offsets: torch.Tensor, T: int, capacity: int, context: int | None,
              slots: torch.Tensor | None = None, trim: bool = True) -> RingPlan:
    write = (offsets.view(-1, 1) + torch.arange(T, device=offsets.device)) % capacity
    # A ring fills from index 0, so entries at or past the batch's longest history were never
    # written: skipping them (`trim`) makes a young conversation's cost follow its length. Only on
    # CPU, where reading the offsets costs no device sync; on GPU the Triton path does this per slot.
    n_keys = capacity
    if trim and offsets.device.type == "cpu" and len(offsets):
        n_keys = min(capacity, int(offsets.max()) + T)
    pos_k = ring_positions(offsets, T, capacity)[:, None, :n_keys]  # [B, 1, n_keys]
    pos_q = offsets.view(-1, 1, 1) + torch.arange(T, device=offsets.device).view(-1, 1)  # [B, T, 1]
    delta = pos_q - pos_k
    mask = (pos_k >= 0) & (delta >= 0)
    if context is not None:
        mask = mask & (delta < context)
    return RingPlan(write, mask[:, None], n_keys, None if slots is None else _run_start(slots))


def ring_plan_at(position: int, T: int, capacity: int, slots: torch.Tensor) -> RingPlan:
    """The plan when every row is at the same `position` of a ring that has not wrapped and has no
    context limit (the depth transformer within a frame): no per-row positions to work out, and no
    mask for a single new query."""
    if position < 0 or position + T > capacity:
        raise ValueError(f"positions {position}..{position + T - 1} do not fit a ring of {capacity} unwrapped")
    n_keys = position + T
    write = torch.arange(position, n_keys, device=slots.device).expand(len(slots), T)
    mask = None
    if T > 1:
        keys = torch.arange(n_keys, device=slots.device)
        mask = (keys.view(1, -1) <= write[:1].view(-1, 1))[None, None]
    return RingPlan(write, mask, n_keys, _run_start(slots), position)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor,
                   context: int | None, backend: str = "torch", plan: RingPlan | None = None) -> torch.Tensor:
    """q, k, v: [B, H, T, D] for slots `slots` at positions offsets[b] + t; caches [S, H, cap, D].
    Writes k, v into the caches and returns the attention output [B, H, T, D]. `plan` (torch path)
    is `ring_plan(...)` for this step, shared by the layers; computed here when not given."""
    if backend == "triton":
        from kernels import attention_triton
        return attention_triton.ring_attention(q, k, v, k_cache, v_cache, slots, offsets, context)
    if backend != "torch":
        raise ValueError(f"unknown kernel backend {backend!r}")
    B, H, T, D = q.shape
    capacity = k_cache.shape[2]
    assert k_cache.shape[1:] == (H, capacity, D) and v_cache.shape == k_cache.shape
    assert slots.shape == (B,) and offsets.shape == (B,)
    plan = plan or ring_plan(offsets, T, capacity, context, slots)
    if plan.run_start is not None and plan.position is not None:
        for cache, new in ((k_cache, k), (v_cache, v)):
            cache.narrow(0, plan.run_start, B)[:, :, plan.position:plan.position + T] = new
    else:
        rows = slots.view(-1, 1).expand(B, T)
        k_cache[rows, :, plan.write] = k.transpose(1, 2).to(k_cache.dtype)
        v_cache[rows, :, plan.write] = v.transpose(1, 2).to(v_cache.dtype)
    if plan.run_start is not None:
        keys, values = (c.narrow(0, plan.run_start, B) for c in (k_cache, v_cache))
    else:
        keys, values = k_cache.index_select(0, slots), v_cache.index_select(0, slots)
    keys, values = keys[:, :, :plan.n_keys].to(q.dtype), values[:, :, :plan.n_keys].to(q.dtype)
    return F.scaled_dot_product_attention(q, keys, values, plan.mask, dropout_p=0.0)
