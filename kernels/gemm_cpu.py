"""lockstep's own fp32 CPU product (`gemm_cpu.c`): its build, weight packing and launcher.

On the engine's CPU shapes (1-64 rows against Mimi's 1-33 MB weights, read from memory every
tick) oneDNN and MKL ran at 50-80% of this machine's memory speed from 4 rows up; this kernel
streams the weight at memory speed to ~12 rows and stays ahead of both to 64 (bench/RESULTS.md).
It is built on first use with the system's C compiler (`$CC`, else `cc`) into lockstep's cache
directory (`$LOCKSTEP_CACHE/kernels`, keyed by the source, compiler and flags), and is used only
where the CPU has AVX-512F and torch runs on GNU OpenMP; otherwise `library()` is None, `reason()`
says why, and `kernels.linear` keeps oneDNN and MKL. Threads are torch's own: the library links
libgomp, which resolves to the copy torch has loaded, so both share one OpenMP pool, and a call
takes `torch.get_num_threads()` of them.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from engine import host

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemm_cpu.c")
FLAGS = ["-O3", "-mavx512f", "-fopenmp", "-shared", "-fPIC"]
PANEL = 16


def cache_dir() -> Path:
    return Path(os.environ.get("LOCKSTEP_CACHE", Path.home() / ".cache" / "lockstep")) / "kernels"


def library() -> ctypes.CDLL | None:
    """The built kernel, compiled the first time on this machine (a fraction of a second), or None."""
    return _build()[0]


def reason() -> str:
    """Why `library()` is None ('' when it is not)."""
    return _build()[1]


@functools.cache
def _build() -> tuple[ctypes.CDLL | None, str]:
    lib, why = _compile_and_load()
    if lib is None:
        log.info("CPU products stay on oneDNN/MKL: %s", why)
    return lib, why


def _gnu_openmp_loaded(maps: str = "/proc/self/maps") -> bool:
    """Whether this process already runs GNU OpenMP (torch's PyPI builds bring their libgomp): the
    kernel's libgomp must resolve to it, or the process would hold two OpenMP runtimes whose
    worker pools take the same cores."""
    try:
        with open(maps) as f:
            return any("libgomp" in line for line in f)
    except OSError:
        return False


def _compile_and_load() -> tuple[ctypes.CDLL | None, str]:
    if "avx512f" not in host.cpuinfo("flags").split():
        return None, "the CPU has no AVX-512F"
    if not _gnu_openmp_loaded():
        return None, "torch does not run on GNU OpenMP in this process"
    name = os.environ.get("CC", "cc")
    cc = shutil.which(name)
    if cc is None:
        return None, f"no C compiler ({name!r} is not on PATH; set CC)"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, *FLAGS]).encode()).hexdigest()[:16]
        target = cache_dir() / f"gemm_cpu-{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            # Built beside the target and renamed: processes starting together never load half a file.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
                if done.returncode != 0:
                    return None, f"{cc} failed on {SOURCE.name}: {done.stderr.strip()[-400:]}"
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"building {SOURCE.name} failed: {e}"
    fn = lib.lockstep_linear_f32
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64, ctypes.c_int]
    fn.restype = None
    return lib, ""


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
    k = panels.shape[1]
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != k:
        raise ValueError(f"x must be float32 on CPU with {k} features, got {x.dtype} {tuple(x.shape)} on {x.device}")
    if not (panels.is_contiguous() and panels.dim() == 3 and panels.shape[2] == PANEL and panels.shape[0] % 2 == 0
            and panels.shape[0] * PANEL >= out_features > panels.shape[0] * PANEL - 2 * PANEL):
        raise ValueError(f"panels {tuple(panels.shape)} are not `pack` of a weight with {out_features} outputs")
    if bias is not None and not (bias.dtype == torch.float32 and bias.is_contiguous() and bias.shape == (out_features,)):
        raise ValueError(f"bias must be a contiguous float32 [{out_features}], got {bias.dtype} {tuple(bias.shape)}")
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
