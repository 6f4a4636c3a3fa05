"""Triton decode attention over per-slot ring KV caches (flash-decoding with a fused KV write).

One program per (row, head, split). A program walks only the absolute positions its slot actually
holds, ``[start, offset + T)``, where ``start`` drops never-written entries, entries overwritten by
the ring and (with a context) entries too far back; that range is cut into ``num_splits`` chunks so
a batch of long contexts still fills the GPU, and a second kernel merges the partial softmaxes.
The split count depends only on (batch, heads, capacity), never on offsets, so the grid and the
partial buffers have fixed shapes per batch size and the launch can be captured in a CUDA graph.

The T new keys/values are written to the ring by split 0, but every program reads the new
positions straight from k/v instead of the ring: old entries it reads sit at ring indices distinct
from the T being written (T <= capacity), so no split races the write.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels.launch import Launch, checker, run_all, same_device

# Elements of the [BLOCK_T, BLOCK_N, BLOCK_D] product a program keeps in registers per tile: 4096
# fp32 over 4 warps is 32 registers per thread, leaving room for the K/V tiles without spills.
_TILE_ELEMS = 4096
_NUM_WARPS = 4
_MAX_SPLITS = 16
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima, so empty chunks never produce NaN


@triton.jit
def _ring_attn_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, offsets_ptr, out_ptr,
                      part_ptr, ml_ptr,
                      s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_cs, s_ch,
                      H, capacity, context, scale_log2,
                      T: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_CONTEXT: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    if slot < 0:
        return
    off = tl.load(offsets_ptr + b).to(tl.int32)
    last = off + (T - 1)
    start = tl.maximum(last - capacity + 1, 0)
    if HAS_CONTEXT:
        start = tl.maximum(start, off - context + 1)
    chunk = tl.cdiv(tl.cdiv(last + 1 - start, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, last + 1)

    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < T
    d_ok = d < D
    td_ok = t_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * s_qb + h * s_qh + t[:, None] * s_qt + d[None, :], mask=td_ok, other=0.0)
    q = q.to(tl.float32) * scale_log2
    k_new = k_ptr + b * s_kb + h * s_kh
    v_new = v_ptr + b * s_vb + h * s_vh
    k_ring = kc_ptr + slot * s_cs + h * s_ch
    v_ring = vc_ptr + slot * s_cs + h * s_ch
    if split == 0:
        rows = (off + t) % capacity
        kn = tl.load(k_new + t[:, None] * s_kt + d[None, :], mask=td_ok)
        vn = tl.load(v_new + t[:, None] * s_vt + d[None, :], mask=td_ok)
        tl.store(k_ring + rows[:, None] * D + d[None, :], kn.to(kc_ptr.dtype.element_ty), mask=td_ok)
        tl.store(v_ring + rows[:, None] * D + d[None, :], vn.to(vc_ptr.dtype.element_ty), mask=td_ok)

    q_pos = off + t
    m_i = tl.full([BLOCK_T], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for p0 in range(lo, hi, BLOCK_N):
        p = p0 + tl.arange(0, BLOCK_N)
        in_rng = p < hi
        fresh = (p >= off)[:, None]
        tile_ok = in_rng[:, None] & d_ok[None, :]
        ring_off = (p % capacity)[:, None] * D + d[None, :]
        new_t = (p - off)[:, None]
        kt = tl.load(tl.where(fresh, k_new + new_t * s_kt + d[None, :], k_ring + ring_off), mask=tile_ok,
                     other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * kt[None, :, :], axis=2)
        ok = in_rng[None, :] & (p[None, :] <= q_pos[:, None])
        if HAS_CONTEXT:
            ok = ok & (q_pos[:, None] - p[None, :] < context)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        vt = tl.load(tl.where(fresh, v_new + new_t * s_vt + d[None, :], v_ring + ring_off), mask=tile_ok,
                     other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(pr[:, :, None] * vt[None, :, :], axis=1)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        dst = out_ptr + ((b * T + t[:, None]) * H + h) * D + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=td_ok)
    else:
        row = ((b * H + h) * NUM_SPLITS + split) * T + t
        tl.store(part_ptr + row[:, None] * D + d[None, :], acc, mask=td_ok)
        tl.store(ml_ptr + row * 2, m_i, mask=t_ok)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=t_ok)


@triton.jit
def _ring_attn_merge_kernel(slots_ptr, out_ptr, part_ptr, ml_ptr, H,
                            T: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                            NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    t = tl.program_id(2)
    if tl.load(slots_ptr + b) < 0:
        return
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < NUM_SPLITS
    row = ((b * H + h) * NUM_SPLITS + s) * T + t
    m = tl.load(ml_ptr + row * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(ml_ptr + row * 2 + 1, mask=s_ok, other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))
    part = tl.load(part_ptr + row[:, None] * D + d[None, :], mask=s_ok[:, None] & (d < D)[None, :], other=0.0)
    out = tl.sum(w[:, None] * part, axis=0) / tl.sum(w * l, axis=0)
    tl.store(out_ptr + ((b * T + t) * H + h) * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits keep the merge path exercised by default
    return torch.cuda.get_device_properties(device).multi_processor_count


def block_sizes(T: int, D: int, capacity: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, BLOCK_N) for a specialization."""
    block_t = triton.next_power_of_2(T)
    block_d = triton.next_power_of_2(D)
    block_n = max(1, min(_TILE_ELEMS // (block_t * block_d), triton.next_power_of_2(capacity)))
    return block_t, block_d, block_n


def plan_splits(batch: int, heads: int, capacity: int, block_n: int, num_sms: int) -> int:
    """Splits per (row, head): enough programs for ~2 waves, each split keeping >= 2 full tiles of a
    full ring. Depends on shapes only, so a CUDA graph captured per batch size stays valid."""
    want = -(-2 * num_sms // (batch * heads))
    tiles = -(-capacity // block_n)
    return max(1, min(want, tiles // 2, _MAX_SPLITS))


_check = checker("ring_attention")


def plan(q, k, v, k_cache, v_cache, slots, offsets, context, num_splits=None, num_sms=None):
    """Validates the operands; returns the launches and the [B, T, H, D] output they fill."""
    _check(q.dim() == 4 and q.shape == k.shape == v.shape, f"q/k/v must be [B, H, T, D] alike, got "
           f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    _check(q.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {q.dtype}")
    _check(k.dtype == v.dtype == q.dtype, "q, k, v must share a dtype")
    _check(q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "q/k/v last dim must be contiguous")
    _check(k_cache.dim() == 4 and k_cache.shape[1] == H and k_cache.shape[3] == D,
           f"cache must be [S, {H}, capacity, {D}], got {tuple(k_cache.shape)}")
    _check(v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype, "k/v caches differ")
    _check(k_cache.dtype in (torch.float32, torch.float16, torch.bfloat16), f"cache dtype {k_cache.dtype}")
    _check(k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous")
    capacity = k_cache.shape[2]
    _check(1 <= T <= capacity, f"T={T} new positions do not fit a ring of {capacity}")
    _check(slots.shape == (B,) and offsets.shape == (B,), "slots/offsets must be [B]")
    _check(slots.dtype in (torch.int32, torch.int64) and offsets.dtype in (torch.int32, torch.int64),
           "slots/offsets must be integer tensors")
    _check(slots.is_contiguous() and offsets.is_contiguous(), "slots/offsets must be contiguous")
    _check(context is None or context >= 1, f"context must be None or >= 1, got {context}")
    _check(same_device(q, k, v, k_cache, v_cache, slots, offsets), "operands on several devices")
    block_t, block_d, block_n = block_sizes(T, D, capacity)
    if num_splits is None:
        num_splits = plan_splits(B, H, capacity, block_n, num_sms or _sm_count(q.device))
    _check(1 <= num_splits <= 64, f"num_splits must be in 1..64, got {num_splits}")
    out = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype)
    if num_splits > 1:
        part = torch.empty(B, H, num_splits, T, D, device=q.device, dtype=torch.float32)
        ml = torch.empty(B, H, num_splits, T, 2, device=q.device, dtype=torch.float32)
    else:
        part = ml = out  # never touched: the kernel writes `out` directly
    args = [q, k, v, k_cache, v_cache, slots, offsets, out, part, ml,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), k_cache.stride(0), k_cache.stride(1),
            H, capacity, context or 0, math.log2(math.e) / math.sqrt(D)]
    consts = dict(T=T, BLOCK_T=block_t, D=D, BLOCK_D=block_d, BLOCK_N=block_n, NUM_SPLITS=num_splits,
                  HAS_CONTEXT=context is not None)
    launches = [Launch(_ring_attn_kernel, (B, H, num_splits), args, consts, _NUM_WARPS)]
    if num_splits > 1:
        launches.append(Launch(_ring_attn_merge_kernel, (B, H, T), [slots, out, part, ml, H],
                               dict(T=T, D=D, BLOCK_D=block_d, NUM_SPLITS=num_splits,
                                    BLOCK_S=triton.next_power_of_2(num_splits)), _NUM_WARPS))
    return launches, out


def ring_attention(q, k, v, k_cache, v_cache, slots, offsets, context, num_splits=None):
    """Same contract as `kernels.attention.ring_attention`; rows whose slot is < 0 are skipped
    (their output rows are left unwritten)."""
    launches, out = plan(q, k, v, k_cache, v_cache, slots, offsets, context, num_splits)
    run_all(launches)
    return out.transpose(1, 2)
