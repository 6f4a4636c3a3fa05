"""Residual vector quantization over precomputed codebook tables: public entry points, torch path.

A table is a quantizer's fp32 ``augmented`` [n, bins, D + 2] with rows ``[c, 1, |c|^2]``. Encoding
runs one or two independent groups (Mimi: the semantic RVQ and the acoustic RVQ, each on its own
projection of the same input): group g quantizes x[g] with `stages[g]` stages of `tables[g]`, and
the codes of all groups are concatenated. `backend="triton"` runs `kernels.rvq_triton` (all
stages and groups in one launch, distances ``|c|^2 - 2 x.c`` never stored), whose codes may differ
from the torch path's only where two centroids are equally near up to fp32 rounding.
"""
from __future__ import annotations

import torch

# torch.cdist only takes its matmul path above this many rows on either side; below it, it sums
# squared differences directly, which rounds differently.
_CDIST_MM_THRESHOLD = 25


def nearest(x: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each row of fp32 `x` [N, D], ties to the lowest index.

    Reproduces what `torch.cdist` computes for the reference package (same augmented matmul, clamp
    and sqrt, then first-index argmin), so codes are bit-identical to it on the same device.
    `aug` is one stage's [bins, D + 2] table.
    """
    n, d = x.shape
    if n > _CDIST_MM_THRESHOLD or aug.shape[0] > _CDIST_MM_THRESHOLD:
        x1 = x[None]
        x1_sq = x1.pow(2).sum(-1, keepdim=True)
        lhs = torch.cat([x1.mul(-2), x1_sq, torch.ones_like(x1_sq)], dim=-1)
        dist = torch.matmul(lhs, aug[None].mT)
        dist.clamp_min_(0).sqrt_()
        return dist[0].argmin(dim=-1)
    return torch.cdist(x[None], aug[None, :, :d].contiguous(), p=2.0)[0].argmin(dim=-1)


def _encode_torch(x: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    d = x.shape[-1]
    residual = x
    codes = []
    for i in range(n):
        idx = nearest(residual, table[i])
        codes.append(idx)
        if i + 1 < n:
            residual = residual - table[i].index_select(0, idx)[:, :d]
    if not codes:
        return torch.zeros(x.shape[0], 0, dtype=torch.long, device=x.device)
    return torch.stack(codes, dim=1)


def encode(x: torch.Tensor, tables: list[torch.Tensor], stages: list[int], backend: str = "torch") -> torch.Tensor:
    """x [G, N, D] fp32 -> codes [N, sum(stages)] int64 (group 0's codes first)."""
    if backend == "triton":
        from kernels import rvq_triton
        return rvq_triton.encode(x, tables, stages)
    if backend != "torch":
        raise ValueError(f"unknown kernel backend {backend!r}")
    return torch.cat([_encode_torch(x[g], tables[g], n) for g, n in enumerate(stages)], dim=1)


def decode(codes: torch.Tensor, tables: list[torch.Tensor], stages: list[int], backend: str = "torch") -> torch.Tensor:
    """codes [N, sum(stages)] -> [G, N, D] fp32: per group, the sum of its stages' centroids."""
    if backend == "triton":
        from kernels import rvq_triton
        return rvq_triton.decode(codes, tables, stages)
    if backend != "torch":
        raise ValueError(f"unknown kernel backend {backend!r}")
    d = tables[0].shape[-1] - 2
    outs, col = [], 0
    for table, n in zip(tables, stages):
        if n == 0:
            outs.append(torch.zeros(codes.shape[0], d, dtype=torch.float32, device=codes.device))
            continue
        q = table[0, :, :d][codes[:, col]]
        for i in range(1, n):
            q = q + table[i, :, :d][codes[:, col + i]]
        outs.append(q)
        col += n
    return torch.stack(outs)
