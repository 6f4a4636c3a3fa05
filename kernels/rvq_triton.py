"""Triton residual vector quantization: every stage of every RVQ group in one launch.

Encode: a program owns BLOCK_M rows of one group and keeps their residual in registers; for each
stage it streams the codebook in BLOCK_K tiles, scoring ``|c|^2 - 2 x.c`` (the row's ``|x|^2`` does
not change the argmin) with a running min/argmin, so the [N, bins] distance matrix never exists in
global memory. Ties go to the lowest index: `tl.argmin` breaks them left within a tile and a later
tile replaces the best only when strictly smaller. Decode gathers and sums centroid rows.

Tables are the quantizer's precomputed fp32 ``augmented`` [n, bins, D + 2] rows ``[c, 1, |c|^2]``.
Up to two groups (Mimi's semantic and acoustic RVQs) share a launch: grid axis 1 picks the group.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import Launch, checker, run_all, same_device

BLOCK_M = 16  # rows per program: the smallest tl.dot tile, since a frame has few rows
_NUM_WARPS = 4
_check = checker("rvq")


@triton.jit
def _quantizer(tab0_ptr, tab1_ptr, n0, n1):
    """Grid axis 1 picks Mimi's semantic (0) or acoustic (1) quantizer: its table, stage count and
    first output column."""
    g = tl.program_id(1)
    return tl.where(g == 0, tab0_ptr, tab1_ptr), tl.where(g == 0, n0, n1), tl.where(g == 0, 0, n0)


@triton.jit
def _rvq_encode_kernel(x_ptr, tab0_ptr, tab1_ptr, codes_ptr, N, bins, s_xg, s_xn, s_cn, n0, n1,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    tab, n_stages, col0 = _quantizer(tab0_ptr, tab1_ptr, n0, n1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = d < D
    x = tl.load(x_ptr + g * s_xg + rows[:, None] * s_xn + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    row_len = D + 2
    for s in range(n_stages):
        stage = tab + s * (bins * row_len)
        best = tl.full([BLOCK_M], float("inf"), tl.float32)
        best_i = tl.zeros([BLOCK_M], tl.int32)
        for k0 in range(0, bins, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < bins
            c = tl.load(stage + kk[:, None] * row_len + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            sq = tl.load(stage + kk * row_len + (D + 1), mask=k_ok, other=float("inf"))
            dist = sq[None, :] - 2.0 * tl.dot(x, tl.trans(c), input_precision="ieee")
            tile_best = tl.min(dist, axis=1)
            tile_i = tl.argmin(dist, axis=1, tie_break_left=True)
            better = tile_best < best
            best = tl.where(better, tile_best, best)
            best_i = tl.where(better, k0 + tile_i, best_i)
        tl.store(codes_ptr + rows * s_cn + col0 + s, best_i.to(tl.int64), mask=row_ok)
        chosen = tl.load(stage + best_i[:, None] * row_len + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                         other=0.0)
        x = x - chosen


@triton.jit
def _rvq_decode_kernel(codes_ptr, tab0_ptr, tab1_ptr, out_ptr, N, bins, s_cn, s_og, s_on, n0, n1,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    tab, n_stages, col0 = _quantizer(tab0_ptr, tab1_ptr, n0, n1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (d < D)[None, :]
    row_len = D + 2
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(n_stages):
        code = tl.load(codes_ptr + rows * s_cn + col0 + s, mask=row_ok, other=0)
        stage = tab + s * (bins * row_len)
        acc += tl.load(stage + code[:, None] * row_len + d[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + g * s_og + rows[:, None] * s_on + d[None, :], acc, mask=mask)


def _check_tables(tables, stages, D):
    _check(1 <= len(tables) == len(stages) <= 2, "one or two groups (tables and stage counts)")
    bins = tables[0].shape[1]
    for tab, n in zip(tables, stages):
        _check(tab.dim() == 3 and tab.shape[1:] == (bins, D + 2), f"table must be [n, {bins}, {D + 2}], "
               f"got {tuple(tab.shape)}")
        _check(tab.dtype == torch.float32 and tab.is_contiguous(), "tables must be contiguous fp32")
        _check(0 <= n <= tab.shape[0], f"{n} stages asked of a table of {tab.shape[0]}")
    return bins


def block_k(D: int) -> int:
    # A [BLOCK_K, D] fp32 codebook tile per pipeline stage stays within ~32 KB of shared memory.
    return max(16, min(64, 8192 // triton.next_power_of_2(D)))


def plan_encode(x, tables, stages):
    """x [G, N, D] float32 (group stride free, rows contiguous in D) -> launches, codes [N, sum]."""
    _check(x.dim() == 3 and x.shape[0] == len(tables), f"x must be [{len(tables)}, N, D], got {tuple(x.shape)}")
    G, N, D = x.shape
    _check(x.dtype == torch.float32 and x.stride(2) == 1, "x must be fp32 with contiguous rows")
    bins = _check_tables(tables, stages, D)
    _check(same_device(x, *tables), "operands on several devices")
    codes = torch.empty(N, sum(stages), device=x.device, dtype=torch.long)
    tab1 = tables[1] if G > 1 else tables[0]
    n1 = stages[1] if G > 1 else 0
    args = [x, tables[0], tab1, codes, N, bins, x.stride(0), x.stride(1), codes.stride(0), stages[0], n1]
    consts = dict(D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=BLOCK_M, BLOCK_K=block_k(D))
    return [Launch(_rvq_encode_kernel, (triton.cdiv(N, BLOCK_M), G), args, consts, _NUM_WARPS)], codes


def plan_decode(codes, tables, stages):
    """codes [N, sum(stages)] int64 -> launches, per-group sums [G, N, D] float32."""
    G = len(tables)
    _check(codes.dim() == 2 and codes.shape[1] == sum(stages), f"codes must be [N, {sum(stages)}]")
    _check(codes.dtype == torch.long and codes.stride(1) == 1, "codes must be int64, contiguous per row")
    D = tables[0].shape[2] - 2
    bins = _check_tables(tables, stages, D)
    _check(same_device(codes, *tables), "operands on several devices")
    N = codes.shape[0]
    out = torch.empty(G, N, D, device=codes.device, dtype=torch.float32)
    tab1 = tables[1] if G > 1 else tables[0]
    n1 = stages[1] if G > 1 else 0
    args = [codes, tables[0], tab1, out, N, bins, codes.stride(0), out.stride(0), out.stride(1), stages[0], n1]
    consts = dict(D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=BLOCK_M)
    return [Launch(_rvq_decode_kernel, (triton.cdiv(N, BLOCK_M), G), args, consts, _NUM_WARPS)], out


def encode(x, tables, stages):
    launches, codes = plan_encode(x, tables, stages)
    if codes.numel():
        run_all(launches)
    return codes


def decode(codes, tables, stages):
    launches, out = plan_decode(codes, tables, stages)
    if out.numel():
        run_all(launches)
    return out
