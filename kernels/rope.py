"""Rotary position embedding (interleaved pairs, as Moshi and Mimi use it): the public entry points
and their torch path.

`rope_tables` computes the rotation once per step (it is the same for every layer); `apply_rope`
rotates q and k. The torch path takes ~10 small ops per tensor and layer, which on a GPU is ~20
kernel launches per layer even inside a CUDA graph; `backend="triton"` runs `kernels.rope_triton`,
one launch for both tensors. Both compute in fp32 and round once to q's dtype.
"""
from __future__ import annotations

import math

import torch


def rope_tables(offsets: torch.Tensor, T: int, D: int, max_period: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, 1, T, D/2] (fp32, contiguous) of the rotation at positions offsets[b] + t."""
    ds = torch.arange(D // 2, device=offsets.device, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / D))
    ts = offsets.float().view(-1, 1) + torch.arange(T, device=offsets.device, dtype=torch.float32)
    angles = freqs * ts.view(-1, 1, T, 1)
    return torch.cos(angles), torch.sin(angles)


def _rope_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    B, H, T, D = q.shape

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.view(*x.shape[:-1], D // 2, 2)
        xr, xi = x[..., 0].float(), x[..., 1].float()
        out = torch.stack([(xr * cos - xi * sin).to(q.dtype), (xr * sin + xi * cos).to(q.dtype)], -1)
        return out.view(B, -1, T, D)

    return rotate(q), rotate(k)


def apply_rope(q: torch.Tensor, k: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor],
               backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates [B, H, T, D] q and k (any strides) by `rope_tables`; returns contiguous tensors."""
    cos, sin = tables
    if backend == "triton":
        from kernels import rope_triton
        return rope_triton.apply_rope(q, k, cos, sin)
    if backend != "torch":
        raise ValueError(f"unknown kernel backend {backend!r}")
    return _rope_torch(q, k, cos, sin)
