"""Decode attention through page tables over a shared KV pool: the public entry point, its torch
path and the fp8 quantizer both paths share.

The pool holds a layer's keys and values as pages [pages, heads, page_size, head_dim]; a slot's
position p lives at row p % page_size of page `page_table[slot, (p // page_size) % pages_per_slot]`.
Semantics are the ring's (`kernels.attention`) with a per-slot window: the T new keys are written
first; query t (position offsets[b] + t) then attends to the positions the slot's ring of `context`
entries holds that are no later than it and less than `window[slot]` back. With every window equal
to the context this is exactly `ring_attention` over a ring of `context` entries (tested bit for bit).

fp8 (e4m3) pages carry a scale per (position, head): decode writes one position at a time, so a
scale must come from that position alone (a page- or tensor-wide one would need calibration, or
rewriting a page's earlier rows when a larger value arrives). Each scale is a power of two, the
smallest with |x| / scale <= 448 over the head's D values (as the OCP MX formats' shared scales):
division and dequantization by it are exact, so the torch, Triton and C paths agree to the bit, and
it costs no precision (e4m3 is floating point: the scale only places the values' range).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels.attention import ring_positions

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


class PagedKV(NamedTuple):
    """One layer's view of the pool, and the slots' page tables and windows (shared by the layers)."""
    k: torch.Tensor  # [pages, heads, page_size, head_dim] in the cache dtype (FP8 for fp8)
    v: torch.Tensor
    k_scale: torch.Tensor | None  # [pages, heads, page_size] float32 powers of two (fp8 only)
    v_scale: torch.Tensor | None
    page_table: torch.Tensor  # [slots, pages_per_slot] int32
    window: torch.Tensor  # [slots] int32


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The smallest power of two s >= amax / 448 (1 for amax 0), from amax's float32 bits: a
    mantissa above 448's (1.75) needs the next exponent."""
    bits = amax.to(torch.float32).contiguous().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) - 127
    exp = exp - 8 + (bits & 0x7FFFFF > 0x600000).to(torch.int32)
    exp = torch.where(amax > 0, exp.clamp(min=-126), torch.zeros_like(exp))
    return ((exp + 127) << 23).view(torch.float32)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (e4m3 values [..., D], power-of-two scales [...]) with x ~= values * scales."""
    x = x.to(torch.float32)
    scale = fp8_scale(x.abs().amax(-1))
    return (x / scale[..., None]).to(FP8), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return values.to(dtype)
    return (values.to(torch.float32) * scale[..., None]).to(dtype)


class PagedPlan(NamedTuple):
    """Where a step writes and what each query sees; the same for every layer of a step."""
    write_page: torch.Tensor  # [B, T] page of each new position
    write_row: torch.Tensor  # [B, T] its row
    read_page: torch.Tensor  # [B, n_keys] page of each key, in ring order (a ring of `context` entries)
    read_row: torch.Tensor
    mask: torch.Tensor  # [B, 1, T, n_keys] bool


def paged_plan(offsets: torch.Tensor, T: int, context: int, cache: PagedKV, slots: torch.Tensor,
               trim: bool = True) -> PagedPlan:
    """Keys are gathered in the order a ring of `context` entries would hold them, so that the
    product below is the ring's to the bit; where each sits is the page table's business."""
    page_size, per_slot = cache.k.shape[2], cache.page_table.shape[1]
    span = page_size * per_slot
    table = cache.page_table.index_select(0, slots).long()  # [B, pages_per_slot]
    pos_new = (offsets.view(-1, 1) + torch.arange(T, device=offsets.device)) % span
    write_page = table.gather(1, pos_new // page_size)
    n_keys = context
    if trim and offsets.device.type == "cpu" and len(offsets):  # as `ring_plan`: no sync on CPU
        n_keys = min(context, int(offsets.max()) + T)
    pos_k = ring_positions(offsets, T, context)[:, :n_keys]  # [B, n_keys], -1 never written
    ring = pos_k.clamp(min=0) % span
    read_page = table.gather(1, ring // page_size)
    pos_q = offsets.view(-1, 1, 1) + torch.arange(T, device=offsets.device).view(-1, 1)  # [B, T, 1]
    delta = pos_q - pos_k[:, None, :]
    window = cache.window.index_select(0, slots).view(-1, 1, 1)
    mask = (pos_k[:, None, :] >= 0) & (delta >= 0) & (delta < context) & (delta < window)
    return PagedPlan(write_page, pos_new % page_size, read_page, ring % page_size, mask[:, None])


def _store(pool: torch.Tensor, scales: torch.Tensor | None, pages: torch.Tensor, rows: torch.Tensor,
           new: torch.Tensor) -> None:
    """new [B, H, T, D] into pool[pages, :, rows] ([B, T] each)."""
    new = new.transpose(1, 2)  # [B, T, H, D]
    if scales is not None:
        new, scale = quantize_fp8(new)
        scales[pages, :, rows] = scale
    pool[pages, :, rows] = new.to(pool.dtype)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PagedKV, slots: torch.Tensor,
                    offsets: torch.Tensor, context: int, backend: str = "torch",
                    plan: PagedPlan | None = None) -> torch.Tensor:
    """q, k, v: [B, H, T, D] for slots `slots` at positions offsets[b] + t. Writes k, v into the
    pool and returns the attention output [B, H, T, D]. `plan` (torch path) is `paged_plan(...)`
    for this step, shared by the layers; computed here when not given."""
    if backend == "triton":
        from kernels import paged_attention_triton
        return paged_attention_triton.paged_attention(q, k, v, cache, slots, offsets, context)
    if backend != "torch":
        raise ValueError(f"unknown kernel backend {backend!r}")
    B, H, T, D = q.shape
    assert cache.k.shape[1] == H and cache.k.shape[3] == D and cache.v.shape == cache.k.shape
    assert slots.shape == (B,) and offsets.shape == (B,) and 1 <= T <= context
    assert (cache.k_scale is None) == (cache.k.dtype != FP8)
    plan = plan or paged_plan(offsets, T, context, cache, slots)
    _store(cache.k, cache.k_scale, plan.write_page, plan.write_row, k)
    _store(cache.v, cache.v_scale, plan.write_page, plan.write_row, v)
    pages, rows = plan.read_page, plan.read_row
    # [B, n_keys, H, D] -> [B, H, n_keys, D], contiguous as a ring's rows are.
    keys = dequantize(cache.k[pages, :, rows], None if cache.k_scale is None else cache.k_scale[pages, :, rows], q.dtype)
    values = dequantize(cache.v[pages, :, rows], None if cache.v_scale is None else cache.v_scale[pages, :, rows],
                        q.dtype)
    keys, values = keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous()
    return F.scaled_dot_product_attention(q, keys, values, plan.mask, dropout_p=0.0)

