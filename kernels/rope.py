"""Rotary position embedding (interleaved pairs, as Moshi and Mimi use it): the public entry points
and their torch path.

`rope_tables` computes the rotation once per step (it is the same for every layer); `apply_rope`
rotates q and k. The torch path takes 4 small ops per tensor and layer, which on a GPU would be 8
kernel launches per layer even inside a CUDA graph; `backend="triton"` runs `kernels.rope_triton`,
one launch for both tensors (contiguous outputs). Both compute in fp32 and round once to q's dtype.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class RopeTables(NamedTuple):
    """One step's rotation, shared by the layers."""
    cos: torch.Tensor  # [B, 1, T, D/2] fp32, contiguous (the Triton path's tables)
    sin: torch.Tensor
    cos_pairs: torch.Tensor | None = None  # [B, 1, T, D]: each cos twice (the torch path's)
    sin_pairs: torch.Tensor | None = None  # [B, 1, T, D]: (-sin, sin) per pair


def _pairs(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)


def rope_tables(offsets: torch.Tensor, T: int, D: int, max_period: float, backend: str = "torch") -> RopeTables:
    """The rotation at positions offsets[b] + t, with the pair tables when `backend` is torch."""
    ds = torch.arange(D // 2, device=offsets.device, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / D))
    ts = offsets.float().view(-1, 1) + torch.arange(T, device=offsets.device, dtype=torch.float32)
    angles = freqs * ts.view(-1, 1, T, 1)
    cos, sin = torch.cos(angles), torch.sin(angles)
    return RopeTables(cos, sin, *_pairs(cos, sin)) if backend == "torch" else RopeTables(cos, sin)


def _rope_torch(q: torch.Tensor, k: torch.Tensor, tables: RopeTables):
    B, H, T, D = q.shape
    cos, sin = tables.cos_pairs, tables.sin_pairs
    if cos is None:
        cos, sin = _pairs(tables.cos, tables.sin)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        # Pair (a, b) -> (a cos - b sin, b cos + a sin) as x * cos + swapped(x) * (-sin, sin): the
        # same products and sums, in three passes over x instead of ten.
        x = x.float()
        swapped = x.reshape(B, H, T, D // 2, 2).flip(-1).view(B, H, T, D)
        return (x * cos).add_(swapped.mul_(sin)).to(q.dtype)

    return rotate(q), rotate(k)


def apply_rope(q: torch.Tensor, k: torch.Tensor, tables: RopeTables,
               backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates [B, H, T, D] q and k (any strides) by `rope_tables`."""
    if backend == "triton":
        from kernels import rope_triton
        return rope_triton.apply_rope(q, k, tables.cos, tables.sin)
    if backend != "torch":
        raise ValueError(f"unknown kernel backend {backend!r}")
    return _rope_torch(q, k, tables)
