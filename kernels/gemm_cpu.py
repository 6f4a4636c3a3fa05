"""lockstep's own fp32 CPU product (`gemm_cpu.c`, built by `kernels.native`): packing, launcher.

On the engine's CPU shapes (1-64 rows against Mimi's 1-33 MB weights, read from memory every
tick) oneDNN and MKL ran at 50-80% of this machine's memory speed from 4 rows up; this kernel
streams the weight at memory speed to ~12 rows and stays ahead of both to 64 (bench/RESULTS.md).
Where it cannot be built `library()` is None, `reason()` says why, and `kernels.linear` keeps
oneDNN and MKL.
"""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from kernels import native

PANEL = 16


def library() -> ctypes.CDLL | None:
    return _bound()[0]


def reason() -> str:
    """Why `library()` is None ('' when it is not)."""
    return _bound()[1]


@functools.cache
def _bound() -> tuple[ctypes.CDLL | None, str]:
    lib, why = native.load("gemm_cpu")
    if lib is not None:
        fn = lib.lockstep_linear_f32
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64, ctypes.c_int]
        fn.restype = None
    return lib, why


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] fp32 CPU weight -> [P, in, 16] panels (P even; padded columns are zero)."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError(f"cannot pack a {weight.dtype} {tuple(weight.shape)} weight on {weight.device} "
                         "(needs a 2-d float32 CPU tensor)")
    n, k = weight.shape
    padded = -(-n // (2 * PANEL)) * 2 * PANEL
    w = F.pad(weight.detach(), (0, 0, 0, padded - n))
    return w.view(padded // PANEL, PANEL, k).transpose(1, 2).contiguous()


def linear(x: torch.Tensor, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """x [..., in] @ weight.T + bias with `panels = pack(weight)`; needs `library()`."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the CPU product is not available: {reason()}")
    if not (panels.dim() == 3 and panels.dtype == torch.float32 and panels.device.type == "cpu"
            and panels.is_contiguous() and panels.shape[2] == PANEL and panels.shape[0] % 2 == 0
            and panels.shape[0] * PANEL >= out_features > panels.shape[0] * PANEL - 2 * PANEL):
        raise ValueError(f"panels {tuple(panels.shape)} are not `pack` of a weight with {out_features} outputs")
    k = panels.shape[1]
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != k:
        raise ValueError(f"x must be float32 on CPU with {k} features, got {x.dtype} {tuple(x.shape)} on {x.device}")
    if bias is not None and not (bias.dtype == torch.float32 and bias.device.type == "cpu" and bias.is_contiguous()
                                 and bias.shape == (out_features,)):
        raise ValueError(f"bias must be a contiguous float32 CPU [{out_features}], got {bias.dtype} "
                         f"{tuple(bias.shape)} on {bias.device}")
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    y = x.new_empty(m, out_features)
    if m and k:
        lib.lockstep_linear_f32(rows.data_ptr(), m, k, rows.stride(0), panels.data_ptr(), out_features,
                                None if bias is None else bias.data_ptr(), y.data_ptr(), out_features,
                                torch.get_num_threads())
    elif bias is not None:
        y.copy_(bias.expand_as(y))
    else:
        y.zero_()
    return y.view(*x.shape[:-1], out_features)
