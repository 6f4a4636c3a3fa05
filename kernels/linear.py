"""Dense products on CPU, each weight packed once for the route its products take.

Three routes, picked per product by its row count and the weight's size:
- lockstep's own kernel (`kernels/gemm_cpu.py`, AVX-512 CPUs with a C compiler), on the weight
  packed into 16-column panels: it streams the weight at memory speed to ~12 rows and ran ahead
  of oneDNN and MKL at every row count up to 64 on Mimi's shapes (bench/RESULTS.md). A row's
  result there does not depend on how many rows share the product.
- oneDNN, on its own blocked layout: ahead for small weights with hundreds of rows (SEANet's
  first layers, 7680 rows x 7 -> 64: 2x), and for everything where lockstep's kernel is missing.
  ATen's own route (MKL) ran the engine's skinny products at a quarter of memory speed on an AMD
  EPYC, but beat oneDNN on 1-3 rows on an Intel Xeon, so there such products stay on ATen.
- ATen (`F.linear`) for what is small on both sides, where per-call cost is all there is, and
  whenever autograd records (neither packed route has a backward).

`prepack(module)` gives every module below that offers `gemm_weight()` a `packed` copy (`Packed`);
modules pass it to `linear`, which falls back to `F.linear` where there is none (GPU, other dtypes).
The routes are the same fp32 sums taken in other orders.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine import host
from kernels import gemm_cpu

# Per-call cost: oneDNN's (~10 us) exceeds what it saves on a product that is small on both sides,
# so ATen stays below 128K weight elements unless there are hundreds of rows (the depth
# transformer's 32-wide layers vs. a pointwise conv over 8 x 1920 positions). lockstep's kernel
# costs ~4 us a call and overtakes ATen from ~32K elements.
_MIN_PACKED_ELEMENTS = 1 << 17
_MIN_PACKED_ROWS = 256
_MIN_PANEL_ELEMENTS = 1 << 15

# oneDNN picks its blocking from an expected row count; measured on Mimi's shapes, a hint of 64
# serves 1-64 rows as well as an exact one.
_ROWS_HINT = 64

# Rows up to which MKL's product beats oneDNN's on Intel CPUs (Mimi's transformers at one session).
_MKL_MAX_ROWS_INTEL = 3


@dataclass(frozen=True)
class Packed:
    """A [out, in] weight's packed copies: `panels` for lockstep's kernel, `onednn` for oneDNN's.
    Weights of `_MIN_PACKED_ELEMENTS` or more get one of the two (the kernel's where it runs), so
    their packed copy costs one weight's memory; smaller ones may hold both."""
    out_features: int
    in_features: int
    panels: torch.Tensor | None
    onednn: torch.Tensor | None


@functools.cache
def mkl_max_rows() -> int:
    """Products with at most this many rows take ATen's (MKL) route where oneDNN would be next."""
    return _MKL_MAX_ROWS_INTEL if host.cpuinfo("vendor_id") == "GenuineIntel" else 0


def native_available() -> bool:
    return gemm_cpu.library() is not None


def describe() -> str:
    """Where big fp32 CPU products run here, for the start-up line."""
    return "lockstep's AVX-512 kernel" if native_available() else f"oneDNN/MKL ({gemm_cpu.reason()})"


def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packable(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and (onednn_available() or native_available()))


def pack(weight: torch.Tensor) -> Packed:
    """[out, in] fp32 CPU weight -> its packed copies for `linear`."""
    if not packable(weight):
        raise ValueError(f"cannot prepack a {weight.dtype} {tuple(weight.shape)} weight on {weight.device} "
                         "(needs a 2-d float32 CPU tensor, and a torch build with oneDNN or an AVX-512 CPU)")
    w = weight.detach().contiguous()
    panels = gemm_cpu.pack(w) if native_available() and w.numel() >= _MIN_PANEL_ELEMENTS else None
    onednn = None
    if onednn_available() and (panels is None or w.numel() < _MIN_PACKED_ELEMENTS):
        onednn = torch.ops.mkldnn._reorder_linear_weight(w, _ROWS_HINT)
    return Packed(w.shape[0], w.shape[1], panels, onednn)


def route(x: torch.Tensor, packed: Packed | None) -> str:
    """'native', 'onednn' or 'aten': where `linear(x, ..., packed)` runs."""
    if packed is None or x.dtype != torch.float32 or torch.is_grad_enabled():
        return "aten"
    rows = x.numel() // max(1, x.shape[-1])
    if packed.panels is not None and (rows < _MIN_PACKED_ROWS or packed.onednn is None):
        return "native"
    big = packed.out_features * packed.in_features >= _MIN_PACKED_ELEMENTS
    if packed.onednn is not None and rows > mkl_max_rows() and (big or rows >= _MIN_PACKED_ROWS):
        return "onednn"
    return "aten"


def uses_packed(x: torch.Tensor, packed: Packed | None) -> bool:
    """Whether `linear(x, ..., packed)` runs on a packed copy (else it needs the dense weight)."""
    return route(x, packed) != "aten"


def linear(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
           packed: Packed | None = None) -> torch.Tensor:
    """x @ weight.T + bias; `packed` (from `pack(weight)`) takes a packed route when one suits."""
    where = route(x, packed)
    if where == "native":
        return gemm_cpu.linear(x, packed.panels, packed.out_features, bias)
    if where == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, packed.onednn, bias, "none", [], "")
    if weight is None:
        raise ValueError("linear needs the dense weight when no packed route can run")
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
