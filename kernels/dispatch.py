"""Choosing the kernel backend, and recording the choice on the engine modules that have kernels.

There is no process-wide switch: `apply_backend` writes `kernel_backend` on each module that has
one (the streaming transformer, its norms and gating, the RVQs, the streaming convs), and those
modules pass it to their kernel family's public function (`kernels.attention.ring_attention`,
`kernels.rvq`, `kernels.conv`, `kernels.norm`, `kernels.rope`, `kernels.noise`), which is the single
dispatch point per family. (The noise hash's backend travels in `SamplingParams`.)
"""
from __future__ import annotations

import os

import torch
from torch import nn

from engine.config import ConfigError

BACKENDS = ("torch", "triton")


class BackendError(ConfigError):
    """The requested kernel backend cannot run here; the message says what to change."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def interpreter_problem(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """Why Triton's CPU interpreter cannot run our kernels with the installed packages, or None.
    Triton before 3.7 turns one-element arrays into Python scalars, which NumPy 2.4 made an error:
    every kernel with a loop bound or branch read from memory then fails inside the interpreter
    (compiled kernels are not affected)."""
    if triton_version is None:
        if not _triton_importable():
            return None
        import numpy
        import triton
        triton_version, numpy_version = triton.__version__, numpy.__version__
    if _version(triton_version) < (3, 7) and _version(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) does not run with NumPy "
                f"{numpy_version}: pip install 'triton>=3.7', or 'numpy<2.4'")
    return None


def _check_triton(device: torch.device) -> None:
    if not _triton_importable():
        raise BackendError("kernels 'triton' needs the triton package (pip install triton)")
    if device.type == "cuda":
        return
    if device.type == "cpu" and _interpreting():
        problem = interpreter_problem()
        if problem:
            raise BackendError(problem)
        return
    if device.type == "cpu":
        raise BackendError("kernels 'triton' on CPU runs only under Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before starting (slow; meant for tests), or use "
                           "--kernels torch / --device cuda")
    raise BackendError(f"kernels 'triton' does not support device {device}")


def resolve_backend(name: str, device) -> str:
    """'auto' | 'torch' | 'triton' for `device` -> 'torch' | 'triton'.

    'auto' is Triton on CUDA (when triton is installed) and torch elsewhere; an explicit 'triton'
    that cannot run raises `BackendError`."""
    device = torch.device(device)
    if name == "torch":
        return "torch"
    if name == "auto":
        return "triton" if device.type == "cuda" and _triton_importable() else "torch"
    if name == "triton":
        _check_triton(device)
        return "triton"
    raise BackendError(f"unknown kernels backend {name!r}; use auto, torch or triton")


def apply_backend(module: nn.Module, backend: str) -> dict[str, str]:
    """Records `backend` ('torch' | 'triton', already resolved) on every module under `module`
    that has kernels; returns {module name: backend it will use}.

    A module whose configuration has no Triton kernel (e.g. a non-SiLU gating activation) says so
    through `triton_supported()` and keeps the torch path; the returned map shows which."""
    if backend not in BACKENDS:
        raise BackendError(f"apply_backend needs a resolved backend ('torch' or 'triton'), got {backend!r}")
    if backend == "triton":
        for p in module.parameters():
            _check_triton(p.device)
            break
    applied = {}
    for name, m in module.named_modules():
        if not hasattr(m, "kernel_backend"):
            continue
        supported = getattr(m, "triton_supported", None)
        use = backend if backend == "torch" or supported is None or supported() else "torch"
        m.kernel_backend = use
        applied[name] = use
    return applied
