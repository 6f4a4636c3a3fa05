"""Dense products on CPU through oneDNN, each weight reordered once into oneDNN's blocked layout.

ATen sends CPU fp32 matmuls to MKL. On the engine's shapes (a few rows, slots x positions, against
weights of megabytes that stream from DRAM every tick) MKL ran at 9-12 GB/s on our AMD EPYC
sandbox, a quarter of its DRAM bandwidth, while oneDNN on a prepacked weight ran 3-5x faster
(bench/RESULTS.md). MKL picks its code paths by CPU vendor: on an Intel Xeon it beat oneDNN on
products of 1-3 rows (24-30 GB/s against 21-23, near that machine's DRAM speed) and lost from 4
rows up, so on Intel CPUs such products stay on ATen. The products are the same fp32 sums taken in
another order.

`prepack(module)` gives every module below that offers `gemm_weight()` a `packed` copy; modules
pass it to `linear`, which falls back to `F.linear` where there is none (GPU, other dtypes, no
oneDNN) and while autograd records (the oneDNN op has no backward).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from engine import host

# oneDNN's per-call overhead (~10 us) exceeds what it saves on a product that is small on both
# sides: ATen's stays faster below 128K weight elements unless there are hundreds of rows (the
# depth transformer's 32-wide layers vs. a pointwise conv over 8 x 1920 positions).
_MIN_PACKED_ELEMENTS = 1 << 17
_MIN_PACKED_ROWS = 256

# oneDNN picks its blocking from an expected row count; measured on Mimi's shapes, a hint of 64
# serves 1-64 rows as well as an exact one.
_ROWS_HINT = 64


# Rows up to which MKL's product beats oneDNN's on Intel CPUs (Mimi's transformers at one session).
_MKL_MAX_ROWS_INTEL = 3


@functools.cache
def mkl_max_rows() -> int:
    """Products with at most this many rows take ATen's (MKL) route even where a packed weight exists."""
    return _MKL_MAX_ROWS_INTEL if host.cpuinfo("vendor_id") == "GenuineIntel" else 0


def packable(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] fp32 CPU weight -> its oneDNN-packed copy for `linear`."""
    if not packable(weight):
        raise ValueError(f"cannot prepack a {weight.dtype} {tuple(weight.shape)} weight on {weight.device} "
                         "(needs a 2-d float32 CPU tensor and a torch build with oneDNN)")
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)


def uses_packed(x: torch.Tensor, packed: torch.Tensor | None) -> bool:
    """Whether `linear(x, ..., packed)` takes the oneDNN path (else it needs the dense weight)."""
    if packed is None or x.dtype != torch.float32 or torch.is_grad_enabled():
        return False
    rows = x.numel() // max(1, x.shape[-1])
    return rows > mkl_max_rows() and (packed.numel() >= _MIN_PACKED_ELEMENTS or rows >= _MIN_PACKED_ROWS)


def linear(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias; `packed` (from `pack(weight)`) takes the oneDNN path when usable."""
    if uses_packed(x, packed):
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if weight is None:
        raise ValueError("linear needs the dense weight when the packed path cannot run")
    return F.linear(x, weight, bias)


def prepack(module: nn.Module) -> int:
    """Packs the GEMM weight of every module below `module` that offers one (`gemm_weight()` ->
    [out, in] or None); returns how many were packed. A no-op off CPU or outside fp32."""
    count = 0
    for m in module.modules():
        get = getattr(m, "gemm_weight", None)
        if get is None:
            continue
        w = get()
        m.packed = pack(w) if w is not None and packable(w) else None
        count += m.packed is not None
    return count
