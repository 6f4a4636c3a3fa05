"""SEANet's ELU in one pass on AVX-512 CPUs (`elu_cpu.c`, built by `kernels.native`): launcher.

Against the torch path's four passes (`kernels.conv.elu_torch`) it took 159 against 417 us on the
encoder's widest activation at 8 sessions ([8, 1920, 64] fp32), 9 against 19 us on [8, 2, 1024]
(`lockstep bench cpu_kernels --only elu`).
"""
from __future__ import annotations

import ctypes
import functools

import torch

from kernels import native


@functools.cache
def library() -> ctypes.CDLL | None:
    lib, _ = native.load("elu_cpu")
    if lib is not None:
        fn = lib.lockstep_elu_f32
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, i64, ptr, i64, i64, i64, ctypes.c_int]
        fn.restype = None
    return lib


def _dense_after_first(t: torch.Tensor) -> bool:
    """Whether each t[i] covers one contiguous run of memory (in any order of its dims)."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape[1:], t.stride()[1:]) if s != 1),
                               key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def runs(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether `elu(x, out)` can run here: float32 CPU tensors of one shape, laid out alike, each
    x[i] (and out[i]) one contiguous run; SEANet's channels-last activations and the [state | x]
    buffer's body are."""
    return (library() is not None and x.dtype == out.dtype == torch.float32 and x.device.type == out.device.type == "cpu"
            and x.dim() >= 1 and x.shape == out.shape and x.stride()[1:] == out.stride()[1:]
            and _dense_after_first(x))


def elu(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if not runs(x, out):
        raise ValueError(f"elu_cpu cannot run on {x.dtype} {tuple(x.shape)} {x.stride()} -> "
                         f"{out.dtype} {tuple(out.shape)} {out.stride()} (see `runs`)")
    if x.numel():
        library().lockstep_elu_f32(x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), x.shape[0],
                                   x[0].numel(), torch.get_num_threads())
    return out
