"""Counter-based uniform noise for seeded sampling: the public entry point and its torch path.

Each value is a pure function of (seed, counter, stream, column) through MurmurHash3's 32-bit
finalizer, so a seeded session draws the same noise whatever shares its batch, with no generator
state and no host sync. The torch path spends ~80 small integer ops per call (one kernel launch each
on a GPU); `backend="triton"` runs `kernels.noise_triton`, one launch with bit-identical output.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9  # spreads stream numbers
COLUMN = 0x27D4EB2F  # spreads column numbers


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # (h * c) mod 2**32 without int64 overflow: split c into 16-bit halves.
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (hi + h * (c & 0xFFFF)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _uniform_torch(seeds: torch.Tensor, counters: torch.Tensor, stream: int, n: int, n_streams: int) -> torch.Tensor:
    cols = torch.arange(n, device=seeds.device, dtype=torch.long)
    streams = torch.arange(stream + 1, stream + 1 + n_streams, device=seeds.device, dtype=torch.long)
    h = _fmix32((seeds & _M32).view(-1, 1) ^ _mul32(streams, GOLDEN).view(1, -1))
    h = _fmix32(h ^ ((seeds >> 32) & _M32).view(-1, 1))
    h = _fmix32(h ^ (counters & _M32).view(-1, 1))
    h = _fmix32(h[..., None] ^ _mul32(cols + 1, COLUMN))
    return ((h >> 8).float() + 0.5) / float(1 << 24)


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, stream: int, n: int, n_streams: int = 1,
                  backend: str = "torch") -> torch.Tensor:
    """Uniform (0, 1) floats [B, n_streams, n] (24-bit resolution) for seeds and counters [B]
    (int64), streams `stream` .. `stream + n_streams - 1` and columns 0 .. n - 1."""
    if backend == "triton":
        from kernels import noise_triton
        return noise_triton.uniform_noise(seeds, counters, stream, n, n_streams)
    if backend != "torch":
        raise ValueError(f"unknown kernel backend {backend!r}")
    return _uniform_torch(seeds, counters, stream, n, n_streams)
