"""Triton rotary embedding: q and k of one step rotated in one launch, one program per (row,
position) and block of heads, reading the projection's strided views and writing contiguous
[B, H, T, D] outputs (what the attention kernel takes)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import Launch, checker, run_all, same_device

_check = checker("rope")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, T, H,
                 s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * T + t
    b = row // T
    t = row % T
    h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    ok = (h < H) & (i < HALF)
    c = tl.load(cos_ptr + row * HALF + i, mask=i < HALF, other=0.0)
    s = tl.load(sin_ptr + row * HALF + i, mask=i < HALF, other=0.0)
    out = ((b * H + h) * T + t) * (2 * HALF) + 2 * i
    src = q_ptr + b * s_qb + h * s_qh + t * s_qt + 2 * i * s_qd
    xr = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    xi = tl.load(src + s_qd, mask=ok, other=0.0).to(tl.float32)
    tl.store(qo_ptr + out, (xr * c - xi * s).to(qo_ptr.dtype.element_ty), mask=ok)
    tl.store(qo_ptr + out + 1, (xr * s + xi * c).to(qo_ptr.dtype.element_ty), mask=ok)
    src = k_ptr + b * s_kb + h * s_kh + t * s_kt + 2 * i * s_kd
    xr = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    xi = tl.load(src + s_kd, mask=ok, other=0.0).to(tl.float32)
    tl.store(ko_ptr + out, (xr * c - xi * s).to(ko_ptr.dtype.element_ty), mask=ok)
    tl.store(ko_ptr + out + 1, (xr * s + xi * c).to(ko_ptr.dtype.element_ty), mask=ok)


def plan_rope(q, k, cos, sin):
    """Launches rotating q and k ([B, H, T, D]) by cos/sin ([B, 1, T, D/2] fp32 contiguous);
    returns (launches, q', k') with q', k' contiguous in q's dtype."""
    _check(q.dim() == 4 and k.shape == q.shape, f"q and k must be [B, H, T, D] alike, got {tuple(q.shape)} "
                                                 f"and {tuple(k.shape)}")
    _check(q.dtype in _FLOATS and k.dtype == q.dtype, f"unsupported dtypes {q.dtype} / {k.dtype}")
    B, H, T, D = q.shape
    _check(D % 2 == 0, f"head dim {D} must be even")
    half = D // 2
    for name, t in (("cos", cos), ("sin", sin)):
        _check(t.shape == (B, 1, T, half) and t.dtype == torch.float32 and t.is_contiguous(),
               f"{name} must be contiguous float32 [{B}, 1, {T}, {half}], got {t.dtype} {tuple(t.shape)}")
    _check(same_device(q, k, cos, sin), "operands on several devices")
    q_out = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
    k_out = torch.empty_like(q_out)
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(H), max(1, 4096 // block_half))
    args = [q, k, cos, sin, q_out, k_out, T, H, *q.stride(), *k.stride()]
    consts = dict(HALF=half, BLOCK_H=block_h, BLOCK_HALF=block_half)
    return [Launch(_rope_kernel, (B * T, triton.cdiv(H, block_h)), args, consts, 4)], q_out, k_out


def apply_rope(q, k, cos, sin):
    launches, q_out, k_out = plan_rope(q, k, cos, sin)
    if q_out.numel():
        run_all(launches)
    return q_out, k_out
