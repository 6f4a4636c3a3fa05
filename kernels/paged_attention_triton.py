"""Triton decode attention through page tables (flash-decoding, the KV write fused, fp8 pages
dequantized inside the loop).

One program per (row, head, split), as `kernels.attention_triton`: a program walks the positions its
slot still holds in the pool, ``[start, offset)`` with ``start`` past entries the context or the
slot's window leave out, looking each up in the page table (the table and windows are device
buffers, so a step stays one CUDA-graph replay), in ``num_splits`` chunks fixed by shapes alone; the
ring kernel's merge kernel combines them. The T new positions are not read back from the pool:
each program holds them in registers as the pool will store them (rounded to its dtype, or fp8 with
their scales), split 0 writes them and adds them to its softmax, so no program races the write.

fp8: e4m3 values and a power-of-two scale per (position, head) (see `kernels.paged_attention`).
A key's scale multiplies its score and a value's its probability, so the loop loads bytes and one
float per position. Values are rounded to e4m3 by integer arithmetic before the conversion, so the
pool's bytes are those the torch path writes, compiled or interpreted.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.attention_triton import _NUM_WARPS, _ring_attn_merge_kernel, _sm_count, block_sizes, plan_splits
from kernels.launch import Launch, checker, run_all, same_device
from kernels.paged_attention import FP8

_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima, so empty chunks never produce NaN


@triton.jit
def _fp8_round(x):
    """(x rounded to e4m3 values times its power-of-two scale per row, the scales): the scale is the
    smallest power of two s with max|x| / s <= 448, from the float bits as `fp8_scale` does."""
    amax = tl.max(tl.abs(x), axis=1)
    bits = amax.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    exp = tl.where(amax > 0, tl.maximum(exp, -126), 0)
    scale = ((exp + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((127 - exp) << 23).to(tl.float32, bitcast=True)
    y = x * inverse[:, None]  # exact: a power of two
    ay = tl.abs(y)
    yb = ay.to(tl.int32, bitcast=True)
    normal = ((yb + 0x7FFFF + ((yb >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)  # 3 mantissa bits, to even
    sub = (ay + 24576.0) - 24576.0  # below 2^-6: to a multiple of 2^-9, to even (24576's ulp)
    r = tl.where(ay >= 0.015625, normal, sub)
    return tl.where(y < 0, -r, r), scale


@triton.jit
def _paged_attn_kernel(q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, ks_ptr, vs_ptr, table_ptr, window_ptr,
                       slots_ptr, offsets_ptr, out_ptr, part_ptr, ml_ptr,
                       s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                       H, pages_per_slot, context, scale_log2,
                       T: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_N: tl.constexpr, PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr,
                       IS_FP8: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    if slot < 0:
        return
    off = tl.load(offsets_ptr + b).to(tl.int32)
    win = tl.load(window_ptr + slot)
    last = off + (T - 1)
    start = tl.maximum(tl.maximum(last - context + 1, off - win + 1), 0)
    chunk = tl.cdiv(tl.cdiv(tl.maximum(off - start, 0), NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, off)
    span = pages_per_slot * PAGE
    page_stride = H * (PAGE * D)
    table = table_ptr + slot * pages_per_slot

    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < T
    d_ok = d < D
    td_ok = t_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * s_qb + h * s_qh + t[:, None] * s_qt + d[None, :], mask=td_ok, other=0.0)
    q = q.to(tl.float32) * scale_log2
    kn = tl.load(k_ptr + b * s_kb + h * s_kh + t[:, None] * s_kt + d[None, :], mask=td_ok, other=0.0).to(tl.float32)
    vn = tl.load(v_ptr + b * s_vb + h * s_vh + t[:, None] * s_vt + d[None, :], mask=td_ok, other=0.0).to(tl.float32)
    # The new rows as the pool holds them.
    if IS_FP8:
        kn, kn_scale = _fp8_round(kn)
        vn, vn_scale = _fp8_round(vn)
    else:
        kn = kn.to(kp_ptr.dtype.element_ty).to(tl.float32)
        vn = vn.to(vp_ptr.dtype.element_ty).to(tl.float32)
    if split == 0:
        r = (off + t) % span
        page = tl.load(table + r // PAGE, mask=t_ok, other=0).to(tl.int64)
        row = page * page_stride + h * (PAGE * D) + (r % PAGE) * D
        tl.store(kp_ptr + row[:, None] + d[None, :], kn.to(kp_ptr.dtype.element_ty), mask=td_ok)
        tl.store(vp_ptr + row[:, None] + d[None, :], vn.to(vp_ptr.dtype.element_ty), mask=td_ok)
        if IS_FP8:
            srow = page * (H * PAGE) + h * PAGE + r % PAGE
            tl.store(ks_ptr + srow, kn_scale, mask=t_ok)
            tl.store(vs_ptr + srow, vn_scale, mask=t_ok)
            kn = kn * kn_scale[:, None]
            vn = vn * vn_scale[:, None]

    q_pos = off + t
    m_i = tl.full([BLOCK_T], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for p0 in range(lo, hi, BLOCK_N):
        p = p0 + tl.arange(0, BLOCK_N)
        in_rng = p < hi
        r = p % span
        page = tl.load(table + r // PAGE, mask=in_rng, other=0).to(tl.int64)
        row = page * page_stride + h * (PAGE * D) + (r % PAGE) * D
        tile_ok = in_rng[:, None] & d_ok[None, :]
        kt = tl.load(kp_ptr + row[:, None] + d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * kt[None, :, :], axis=2)
        if IS_FP8:
            srow = page * (H * PAGE) + h * PAGE + r % PAGE
            s = s * tl.load(ks_ptr + srow, mask=in_rng, other=0.0)[None, :]
        ok = in_rng[None, :] & (q_pos[:, None] - p[None, :] < win)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        if IS_FP8:
            pr = pr * tl.load(vs_ptr + srow, mask=in_rng, other=0.0)[None, :]
        vt = tl.load(vp_ptr + row[:, None] + d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(pr[:, :, None] * vt[None, :, :], axis=1)
        m_i = m_new
    if split == 0:  # the new positions, from registers
        s = tl.sum(q[:, None, :] * kn[None, :, :], axis=2)  # [BLOCK_T, BLOCK_T]
        back = t[:, None] - t[None, :]
        s = tl.where(t_ok[None, :] & (back >= 0) & (back < win), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        acc = acc * alpha[:, None] + tl.sum(pr[:, :, None] * vn[None, :, :], axis=1)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        dst = out_ptr + ((b * T + t[:, None]) * H + h) * D + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=td_ok)
    else:
        prow = ((b * H + h) * NUM_SPLITS + split) * T + t
        tl.store(part_ptr + prow[:, None] * D + d[None, :], acc, mask=td_ok)
        tl.store(ml_ptr + prow * 2, m_i, mask=t_ok)
        tl.store(ml_ptr + prow * 2 + 1, l_i, mask=t_ok)


_check = checker("paged_attention")
POOL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, FP8)


def plan(q, k, v, cache, slots, offsets, context, num_splits=None, num_sms=None):
    """Validates the operands; returns the launches and the [B, T, H, D] output they fill."""
    _check(q.dim() == 4 and q.shape == k.shape == v.shape, f"q/k/v must be [B, H, T, D] alike, got "
           f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    _check(q.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {q.dtype}")
    _check(k.dtype == v.dtype == q.dtype, "q, k, v must share a dtype")
    _check(q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "q/k/v last dim must be contiguous")
    kp, vp, ks, vs, table, window = cache
    _check(kp.dim() == 4 and kp.shape[1] == H and kp.shape[3] == D,
           f"pool must be [pages, {H}, page_size, {D}], got {tuple(kp.shape)}")
    _check(vp.shape == kp.shape and vp.dtype == kp.dtype, "k/v pools differ")
    _check(kp.dtype in POOL_DTYPES, f"pool dtype {kp.dtype}")
    _check(kp.is_contiguous() and vp.is_contiguous(), "pools must be contiguous")
    fp8 = kp.dtype == FP8
    _check((ks is not None, vs is not None) == (fp8, fp8), "scales go with fp8 pools, and only with them")
    if fp8:
        _check(ks.shape == vs.shape == kp.shape[:3] and ks.dtype == vs.dtype == torch.float32
               and ks.is_contiguous() and vs.is_contiguous(), f"scales must be float32 {tuple(kp.shape[:3])}")
    page_size = kp.shape[2]
    _check(table.dim() == 2 and table.dtype == torch.int32 and table.is_contiguous(), "page table must be int32 [S, n]")
    _check(window.shape == (table.shape[0],) and window.dtype == torch.int32, "window must be int32 [S]")
    _check(context >= 1 and 1 <= T <= context, f"T={T} new positions and a context of {context}")
    _check(table.shape[1] * page_size >= context, f"{table.shape[1]} pages of {page_size} cannot hold {context}")
    _check(slots.shape == (B,) and offsets.shape == (B,), "slots/offsets must be [B]")
    _check(slots.dtype in (torch.int32, torch.int64) and offsets.dtype in (torch.int32, torch.int64),
           "slots/offsets must be integer tensors")
    _check(slots.is_contiguous() and offsets.is_contiguous(), "slots/offsets must be contiguous")
    _check(same_device(q, k, v, kp, vp, table, window, slots, offsets), "operands on several devices")
    block_t, block_d, block_n = block_sizes(T, D, context)
    if fp8:  # the bytes' conversion and the scales hold more registers: half the tile (no spills at sm_90)
        block_n = max(1, block_n // 2)
    if num_splits is None:
        num_splits = plan_splits(B, H, context, block_n, num_sms or _sm_count(q.device))
    _check(1 <= num_splits <= 64, f"num_splits must be in 1..64, got {num_splits}")
    out = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype)
    if num_splits > 1:
        part = torch.empty(B, H, num_splits, T, D, device=q.device, dtype=torch.float32)
        ml = torch.empty(B, H, num_splits, T, 2, device=q.device, dtype=torch.float32)
    else:
        part = ml = out  # never touched: the kernel writes `out` directly
    scales = (ks, vs) if fp8 else (window, window)  # unused pointers when not fp8
    args = [q, k, v, kp, vp, *scales, table, window, slots, offsets, out, part, ml,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), H, table.shape[1], context, math.log2(math.e) / math.sqrt(D)]
    consts = dict(T=T, BLOCK_T=block_t, D=D, BLOCK_D=block_d, BLOCK_N=block_n, PAGE=page_size,
                  NUM_SPLITS=num_splits, IS_FP8=fp8)
    launches = [Launch(_paged_attn_kernel, (B, H, num_splits), args, consts, _NUM_WARPS)]
    if num_splits > 1:
        launches.append(Launch(_ring_attn_merge_kernel, (B, H, T), [slots, out, part, ml, H],
                               dict(T=T, D=D, BLOCK_D=block_d, NUM_SPLITS=num_splits,
                                    BLOCK_S=triton.next_power_of_2(num_splits)), _NUM_WARPS))
    return launches, out


def paged_attention(q, k, v, cache, slots, offsets, context, num_splits=None):
    """Same contract as `kernels.paged_attention.paged_attention`; rows whose slot is < 0 are
    skipped (their output rows are left unwritten)."""
    launches, out = plan(q, k, v, cache, slots, offsets, context, num_splits)
    run_all(launches)
    return out.transpose(1, 2)
