"""Triton residual vector quantization: every stage of every RVQ group in one launch.

Encode: the stages of a group depend on each other (stage s quantizes what stage s - 1 left), so
a program per row block, walking every stage's codebook alone, runs on one SM while the rest of
the GPU idles (Mimi at 32 sessions: 4 programs streaming 15 MB each). Instead each stage's
codebook is cut into `slices`, and one program scores one slice of one stage for one block of
BLOCK_M rows, ``|c|^2 - 2 x.c`` tile by tile (the row's ``|x|^2`` does not change the argmin), so
the [N, bins] distance matrix never exists in global memory. It writes its slice's (min, argmin)
and counts itself done; the stage's last program to finish reduces the slices, writes the code,
and publishes the residual for the next stage, whose programs wait for it. Programs take their
order from a ticket drawn on starting, stages in order, so a program only ever waits on programs
that have already started: no deadlock, whatever the grid size or scheduling, and under the
interpreter (programs one after another) every wait is already satisfied. Ties go to the lowest
index, as in a serial scan: `tl.argmin` breaks them left within a tile and across slices, and a
later tile replaces the best only when strictly smaller.

Decode gathers and sums centroid rows.

Tables are the quantizer's precomputed fp32 ``augmented`` [n, bins, D + 2] rows ``[c, 1, |c|^2]``.
Up to two groups (Mimi's semantic and acoustic RVQs) share a launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import Launch, checker, run_all, same_device

BLOCK_M = 16  # rows per program: the smallest tl.dot tile, since a frame has few rows
TILES_PER_SLICE = 2  # codebook tiles a program scores: Mimi's 2048 codes in 32 slices of 64
_NUM_WARPS = 4
_check = checker("rvq")


@triton.jit
def _quantizer(g, tab0_ptr, tab1_ptr, n0, n1):
    """Mimi's semantic (g = 0) or acoustic (g = 1) quantizer: its table, stage count and first
    output column."""
    return tl.where(g == 0, tab0_ptr, tab1_ptr), tl.where(g == 0, n0, n1), tl.where(g == 0, 0, n0)


@triton.jit
def _rvq_encode_kernel(x_ptr, tab0_ptr, tab1_ptr, codes_ptr, sync_ptr, res_ptr, pmin_ptr, pidx_ptr,
                       N, bins, s_xg, s_xn, s_cn, n0, n1, S, MB,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                       TILES: tl.constexpr, SLICES: tl.constexpr, BLOCK_P: tl.constexpr):
    # sync: [ticket, done[G, S, MB], ready[G, S, MB]], zeroed before the launch.
    item = tl.atomic_add(sync_ptr, 1)
    # Items in ticket order: stage by stage; within a stage, group, row block, slice.
    W = MB * SLICES
    both = tl.minimum(n0, n1)  # stages both groups have
    in_both = item < both * 2 * W
    e = tl.maximum(item - both * 2 * W, 0)
    s = tl.where(in_both, item // (2 * W), both + e // W)
    g = tl.where(in_both, (item // W) % 2, (n1 > n0).to(tl.int32))
    rest = tl.where(in_both, item % W, e % W)
    m = rest // SLICES
    j = rest % SLICES
    tab, n_stages, col0 = _quantizer(g, tab0_ptr, tab1_ptr, n0, n1)
    counter = (g * S + s) * MB + m
    done_ptr = sync_ptr + 1 + counter
    ready_ptr = done_ptr + 2 * S * MB

    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = d < D
    rd_ok = row_ok[:, None] & d_ok[None, :]
    row_len = D + 2
    stage = tab + s * (bins * row_len)
    k_lo = j * (TILES * BLOCK_K)
    NP = MB * BLOCK_M
    res_row = res_ptr + ((g * S + s) * NP + rows)[:, None] * D + d[None, :]
    if s == 0:
        x = tl.load(x_ptr + g * s_xg + rows[:, None] * s_xn + d[None, :], mask=rd_ok, other=0.0)
    else:
        prev_ready = ready_ptr - MB  # stage s - 1, same group and row block
        while tl.atomic_add(prev_ready, 0, sem="acquire") == 0:
            pass
        x = tl.load(res_row, mask=rd_ok, other=0.0, cache_modifier=".cg")

    best = tl.full([BLOCK_M], float("inf"), tl.float32)
    best_i = tl.zeros([BLOCK_M], tl.int32)
    for k0 in range(k_lo, k_lo + TILES * BLOCK_K, BLOCK_K):
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
    part = ((g * S + s) * NP + rows) * BLOCK_P
    tl.store(pmin_ptr + part + j, best, mask=row_ok)
    tl.store(pidx_ptr + part + j, best_i, mask=row_ok)
    # Every thread's stores before the one thread's release; its acquire before everyone's loads.
    tl.debug_barrier()
    if tl.atomic_add(done_ptr, 1, sem="acq_rel") == SLICES - 1:  # the stage's last slice to finish
        p = tl.arange(0, BLOCK_P)
        p_ok = row_ok[:, None] & (p < SLICES)[None, :]
        pmin = tl.load(pmin_ptr + part[:, None] + p[None, :], mask=p_ok, other=float("inf"),
                       cache_modifier=".cg")
        pidx = tl.load(pidx_ptr + part[:, None] + p[None, :], mask=p_ok, other=0, cache_modifier=".cg")
        winner = tl.argmin(pmin, axis=1, tie_break_left=True)
        code = tl.sum(tl.where(p[None, :] == winner[:, None], pidx, 0), axis=1)
        tl.store(codes_ptr + rows * s_cn + col0 + s, code.to(tl.int64), mask=row_ok)
        if s + 1 < n_stages:
            chosen = tl.load(stage + code[:, None] * row_len + d[None, :], mask=rd_ok, other=0.0)
            tl.store(res_row + NP * D, x - chosen, mask=rd_ok)
            tl.debug_barrier()
            tl.atomic_xchg(ready_ptr, 1, sem="release")


@triton.jit
def _rvq_decode_kernel(codes_ptr, tab0_ptr, tab1_ptr, out_ptr, N, bins, s_cn, s_og, s_on, n0, n1,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    tab, n_stages, col0 = _quantizer(g, tab0_ptr, tab1_ptr, n0, n1)
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


def plan_encode(x, tables, stages, block=None, tiles=TILES_PER_SLICE):
    """x [G, N, D] float32 (group stride free, rows contiguous in D) -> launches, codes [N, sum].
    `block` (codes per tile, default `block_k(D)`) and `tiles` (tiles per slice) size the slices;
    they depend on shapes only, so the grid is fixed per batch size (graph-safe)."""
    _check(x.dim() == 3 and x.shape[0] == len(tables), f"x must be [{len(tables)}, N, D], got {tuple(x.shape)}")
    G, N, D = x.shape
    _check(x.dtype == torch.float32 and x.stride(2) == 1, "x must be fp32 with contiguous rows")
    bins = _check_tables(tables, stages, D)
    _check(same_device(x, *tables), "operands on several devices")
    block = block or block_k(D)
    _check(block >= 16 and block & (block - 1) == 0, f"block must be a power of two >= 16, got {block}")
    _check(tiles >= 1, f"tiles must be >= 1, got {tiles}")
    codes = torch.empty(N, sum(stages), device=x.device, dtype=torch.long)
    tab1 = tables[1] if G > 1 else tables[0]
    n0, n1 = stages[0], (stages[1] if G > 1 else 0)
    S, MB = max(n0, n1, 1), triton.cdiv(N, BLOCK_M)
    slices = triton.cdiv(bins, tiles * block)
    # Scratch for the stages' hand-over: a ticket and per-(group, stage, row block) done / ready
    # counts (zeroed: one memset), residuals entering each stage, and each slice's best.
    sync = torch.zeros(1 + 2 * (2 * S * MB), device=x.device, dtype=torch.int32)
    residual = torch.empty(2, S, MB * BLOCK_M, D, device=x.device, dtype=torch.float32)
    block_p = triton.next_power_of_2(slices)
    pmin = torch.empty(2, S, MB * BLOCK_M, block_p, device=x.device, dtype=torch.float32)
    pidx = torch.empty(2, S, MB * BLOCK_M, block_p, device=x.device, dtype=torch.int32)
    args = [x, tables[0], tab1, codes, sync, residual, pmin, pidx, N, bins, x.stride(0), x.stride(1),
            codes.stride(0), n0, n1, S, MB]
    consts = dict(D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=BLOCK_M, BLOCK_K=block, TILES=tiles,
                  SLICES=slices, BLOCK_P=block_p)
    grid = ((n0 + n1) * MB * slices,)
    return [Launch(_rvq_encode_kernel, grid, args, consts, _NUM_WARPS)], codes


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


def encode(x, tables, stages, block=None, tiles=TILES_PER_SLICE):
    launches, codes = plan_encode(x, tables, stages, block, tiles)
    if codes.numel():
        run_all(launches)
    return codes


def decode(codes, tables, stages):
    launches, out = plan_decode(codes, tables, stages)
    if out.numel():
        run_all(launches)
    return out
