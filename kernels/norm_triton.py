"""Triton row norms (RMSNorm / LayerNorm, fp32 math) with an optional fused residual add, and the
SiLU gate of the gated feed-forward.

`add_norm` computes ``x + scale * update`` once, rounds it to the residual dtype (what the next
residual add sees, as in the torch path) and normalizes that rounded row, so the residual stream
is read once and written once per sub-layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import Launch, checker, run_all, same_device

_check = checker("norm")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _norm_kernel(x_ptr, upd_ptr, scale_ptr, w_ptr, b_ptr, y_ptr, xo_ptr, T, C, eps,
                 s_xb, s_xt, s_xc, s_ub, s_ut, s_uc,
                 RMS: tl.constexpr, ADD: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    # Inputs are read through [B, T, C] strides (Mimi's transformer sees a transposed view);
    # outputs are packed rows.
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    c = tl.arange(0, BLOCK_C)
    ok = c < C
    x = tl.load(x_ptr + b * s_xb + t * s_xt + c * s_xc, mask=ok, other=0.0).to(tl.float32)
    if ADD:
        u = tl.load(upd_ptr + b * s_ub + t * s_ut + c * s_uc, mask=ok, other=0.0).to(tl.float32)
        if HAS_SCALE:
            u = u * tl.load(scale_ptr + c, mask=ok, other=0.0).to(tl.float32)
        xr = (x + u).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + row * C + c, xr, mask=ok)
        x = xr.to(tl.float32)
    w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
    if RMS:
        y = x * (w * tl.rsqrt(eps + tl.sum(x * x, axis=0) / C))
    else:
        xc = tl.where(ok, x - tl.sum(x, axis=0) / C, 0.0)
        y = xc * tl.rsqrt(tl.sum(xc * xc, axis=0) / C + eps) * w
        if HAS_BIAS:
            y += tl.load(b_ptr + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * C + c, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_gate_kernel(h_ptr, out_ptr, H, s_h, s_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < H
    a = tl.load(h_ptr + row * s_h + c, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(h_ptr + row * s_h + H + c, mask=ok, other=0.0).to(tl.float32)
    out = a / (1.0 + tl.exp(-a)) * g
    tl.store(out_ptr + row * s_o + c, out.to(out_ptr.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    _check(t.dtype in _FLOATS, f"{name}: unsupported dtype {t.dtype}")
    _check(t.dim() >= 1 and t.stride(-1) == 1, f"{name}: last dim must be contiguous")
    flat = t.reshape(-1, t.shape[-1])  # a view whenever rows are evenly strided (engine layouts)
    _check(flat.stride(-1) == 1, f"{name}: rows must be evenly strided")
    return flat


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8


def _btc(t: torch.Tensor, name: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
    _check(t.dtype in _FLOATS, f"{name}: unsupported dtype {t.dtype}")
    _check(t.dim() in (2, 3), f"{name}: must be [N, C] or [B, T, C], got {tuple(t.shape)}")
    t3 = t if t.dim() == 3 else t[None]
    return t3, t3.stride()


def plan_norm(x, weight, bias, eps, rms, update=None, scale=None):
    """Launches for ``y = norm(x)`` or, with `update`, ``x' = x + scale * update; y = norm(x')``.
    Returns (launches, y, x') with x' None without `update`; y and x' are contiguous."""
    C = x.shape[-1]
    _check(weight.numel() == C and weight.is_contiguous(), f"weight must be {C} contiguous elements")
    _check(bias is None or (bias.is_contiguous() and bias.numel() == C), "bias must be C contiguous elements")
    _check(rms or bias is not None, "LayerNorm needs a bias")
    x3, sx = _btc(x, "x")
    add = update is not None
    if add:
        _check(update.shape == x.shape, f"update {tuple(update.shape)} differs from x {tuple(x.shape)}")
        _check(scale is None or (scale.is_contiguous() and scale.numel() == C), "scale must have C elements")
        u3, su = _btc(update, "update")
        out_dtype = update.dtype  # the torch path's `x.to(update) + ...`
    else:
        u3, su, out_dtype = x3, sx, x.dtype
    _check(same_device(x, weight, *(t for t in (bias, update, scale) if t is not None)), "operands on several devices")
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    x_new = torch.empty(x.shape, device=x.device, dtype=out_dtype) if add else None
    B, T, _ = x3.shape
    block = triton.next_power_of_2(C)
    args = [x3, u3, scale if scale is not None else weight, weight, bias if bias is not None else weight, y,
            x_new if add else y, T, C, float(eps), *sx, *su]
    consts = dict(RMS=rms, ADD=add, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, BLOCK_C=block)
    return [Launch(_norm_kernel, (B * T,), args, consts, _warps(block))], y, x_new


def plan_silu_gate(h):
    """Launches for ``silu(h[..., :H]) * h[..., H:]``; returns (launches, out [..., H])."""
    hf = _rows(h, "h")
    _check(h.shape[-1] % 2 == 0, "the gated width must be even")
    H = h.shape[-1] // 2
    out = torch.empty(*h.shape[:-1], H, device=h.device, dtype=h.dtype)
    of = out.view(-1, H)
    block = min(1024, triton.next_power_of_2(H))
    return [Launch(_silu_gate_kernel, (hf.shape[0], triton.cdiv(H, block)), [hf, of, H, hf.stride(0), of.stride(0)],
                   dict(BLOCK=block), 4)], out


def norm(x, weight, bias, eps, rms):
    launches, y, _ = plan_norm(x, weight, bias, eps, rms)
    if y.numel():
        run_all(launches)
    return y


def add_norm(x, update, scale, weight, bias, eps, rms):
    launches, y, x_new = plan_norm(x, weight, bias, eps, rms, update, scale)
    if y.numel():
        run_all(launches)
    return x_new, y


def silu_gate(h):
    launches, out = plan_silu_gate(h)
    if out.numel():
        run_all(launches)
    return out
