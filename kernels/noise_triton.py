"""Triton counter-based noise: the whole hash of `kernels.noise` in one launch, one program per
(row, stream, block of columns), in the same split 16-bit int64 arithmetic, so the output is
bit-identical to the torch path's."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import Launch, checker, run_all, same_device
from kernels.noise import COLUMN, GOLDEN

_check = checker("noise")


@triton.jit
def _mul32(h, c: tl.constexpr):
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (hi + h * (c & 0xFFFF)) & 0xFFFFFFFF


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


@triton.jit
def _noise_kernel(seeds_ptr, counters_ptr, out_ptr, n, n_streams, stream0,
                  GOLD: tl.constexpr, COL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seeds_ptr + row)
    counter = tl.load(counters_ptr + row)
    h = _fmix32((seed & 0xFFFFFFFF) ^ _mul32(stream0 + 1 + s, GOLD))
    h = _fmix32(h ^ ((seed >> 32) & 0xFFFFFFFF))
    h = _fmix32(h ^ (counter & 0xFFFFFFFF))
    h = _fmix32(h ^ _mul32(cols.to(tl.int64) + 1, COL))
    u = ((h >> 8).to(tl.float32) + 0.5) / 16777216.0
    tl.store(out_ptr + (row * n_streams + s) * n + cols, u, mask=cols < n)


def plan_noise(seeds, counters, stream: int, n: int, n_streams: int):
    """Launches for `kernels.noise.uniform_noise`; returns (launches, out [B, n_streams, n])."""
    _check(seeds.dim() == 1 and seeds.dtype == torch.long and seeds.is_contiguous(),
           f"seeds must be contiguous int64 [B], got {seeds.dtype} {tuple(seeds.shape)}")
    _check(counters.shape == seeds.shape and counters.dtype == torch.long and counters.is_contiguous(),
           f"counters must be contiguous int64 like seeds, got {counters.dtype} {tuple(counters.shape)}")
    _check(n >= 0 and n_streams >= 1 and stream >= 0, f"bad sizes n={n} n_streams={n_streams} stream={stream}")
    _check(same_device(seeds, counters), "operands on several devices")
    out = torch.empty(seeds.shape[0], n_streams, n, device=seeds.device, dtype=torch.float32)
    block = min(1024, triton.next_power_of_2(max(n, 1)))
    grid = (seeds.shape[0], n_streams, triton.cdiv(n, block))
    return [Launch(_noise_kernel, grid, [seeds, counters, out, n, n_streams, stream],
                   dict(GOLD=GOLDEN, COL=COLUMN, BLOCK=block), 4)], out


def uniform_noise(seeds, counters, stream, n, n_streams):
    launches, out = plan_noise(seeds, counters, stream, n, n_streams)
    if out.numel():
        run_all(launches)
    return out
