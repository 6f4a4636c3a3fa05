"""Row norms with an optional fused residual add, and the SiLU gate: public entry points, torch path.

The torch path is the engine's reference arithmetic (kyutai's): `rms_norm` computes in
`compute_dtype` (fp32 for ``rms_norm_f32``) or in x's dtype; `layer_norm` in fp32 when `f32`.
`backend="triton"` runs `kernels.norm_triton`, which always computes in fp32 and rounds once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class NormParams:
    """One norm layer: RMSNorm (`bias` None) or LayerNorm; `f32` = compute in fp32 whatever x's dtype."""
    rms: bool
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    f32: bool


def _backend_error(backend: str) -> ValueError:
    return ValueError(f"unknown kernel backend {backend!r}")


def _norm_torch(x: torch.Tensor, p: NormParams) -> torch.Tensor:
    if p.rms:
        # kyutai's x * (weight * rsqrt(eps + mean(x^2))) op for op, minus the dtype casts that
        # would change nothing (on CPU a third of the ops of a small model's norm).
        xc = x.float() if p.f32 and x.dtype != torch.float32 else x
        var = torch.mean(xc * xc, dim=-1, keepdim=True).add_(p.eps)
        w = p.weight if p.weight.dtype == var.dtype else p.weight.to(var)
        y = xc * (w * var.rsqrt_())
        return y if y.dtype == x.dtype else y.to(x.dtype)
    if p.f32:
        return F.layer_norm(x.float(), (x.shape[-1],), p.weight, p.bias, p.eps).to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), p.weight, p.bias, p.eps)


def norm(x: torch.Tensor, p: NormParams, backend: str = "torch") -> torch.Tensor:
    """Normalizes the last dim of x."""
    if backend == "triton":
        from kernels import norm_triton
        return norm_triton.norm(x, p.weight, p.bias, p.eps, p.rms)
    if backend != "torch":
        raise _backend_error(backend)
    return _norm_torch(x, p)


def add_norm(x: torch.Tensor, update: torch.Tensor, scale: torch.Tensor | None, p: NormParams,
             backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """(x', norm(x')) with ``x' = x.to(update) + scale * update`` (scale None = 1): a residual add
    followed by the next sub-layer's norm."""
    if backend == "triton":
        from kernels import norm_triton
        return norm_triton.add_norm(x, update, scale, p.weight, p.bias, p.eps, p.rms)
    if backend != "torch":
        raise _backend_error(backend)
    x = (x if x.dtype == update.dtype else x.to(update)) + (scale * update if scale is not None else update)
    return x, _norm_torch(x, p)


def silu_gate(h: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """``silu(h[..., :H]) * h[..., H:]`` for h [..., 2H]."""
    if backend == "triton":
        from kernels import norm_triton
        return norm_triton.silu_gate(h)
    if backend != "torch":
        raise _backend_error(backend)
    a, g = h.chunk(2, dim=-1)
    return F.silu(a) * g
