"""Streaming conv steps over per-slot state: the public entry points and their torch path.

`conv1d_step` runs a causal conv1d over ``[state[slot] | act(x)]`` and leaves the last
``(K - 1) * dilation + 1 - stride`` columns of that concatenation in the slot's state;
`conv_transpose1d_step` runs a transposed conv, adds the slot's overlap-add `partial` to the first
``K - stride`` outputs and stores the new tail (bias excluded) back. With `first` (replicate
padding), a fresh slot's missing past is its first input column repeated, and the flag is cleared.
`act="elu"` applies ELU to x first (the state then holds ELU'd columns, as when the ELU is a
separate layer). `backend="triton"` runs `kernels.conv_triton` (same contract; rows whose slot is
< 0 are skipped). The torch path runs `kernels.conv_cpu` on CPU (channels-last products; state from
`alloc_state` is laid out for it) and ATen's convolutions elsewhere and for grouped convs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F

from kernels import conv_cpu, elu_cpu
from kernels import linear as linear_kernels


def _conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, dilation: int,
            groups: int, residual: torch.Tensor | None = None) -> torch.Tensor:
    y = F.conv1d(x, weight, bias, stride, 0, dilation, groups)
    return y if residual is None else y.add_(residual)


def gemm_weight(weight: torch.Tensor, transposed: bool, groups: int, dilation: int = 1,
                stride: int = 1) -> torch.Tensor | None:
    """The matrix the CPU path (`kernels.conv_cpu`) multiplies by, or None where it never runs."""
    if not conv_cpu.supports(groups, stride, dilation):
        return None
    if transposed:
        return conv_cpu.transpose_weight(weight, stride)
    return conv_cpu.conv_weight(weight, stride, dilation)


# Below this many elements the one-pass kernel's call cost (~5 us) outweighs the passes it saves
# (2 x 1024 at one session: 7.0 against 5.9 us).
_ELU_CPU_MIN_ELEMENTS = 4096


def elu(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """ELU (alpha 1) into `out` if given: on AVX-512 CPUs in one pass (`kernels.elu_cpu`) where the
    layouts allow, else `elu_torch`; the two take one formula and differ by the exponentials'
    rounding."""
    if x.device.type == "cpu" and x.numel() >= _ELU_CPU_MIN_ELEMENTS and elu_cpu.library() is not None:
        out = torch.empty_like(x) if out is None else out
        if elu_cpu.runs(x, out):
            return elu_cpu.elu(x, out)
    return elu_torch(x, out)


def elu_torch(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """ELU (alpha 1) as max(x, exp(min(x, 0)) - 1) (e^x - 1 >= x everywhere): four passes over x,
    where ATen's CPU ELU ran slower than all four on SEANet's activations. The result is within one
    float32 ulp of 1 of it, and exactly x where x > 0."""
    out = torch.clamp(x, max=0, out=out)
    out.exp_().sub_(1)
    return torch.maximum(out, x, out=out)


def _check_torch(act: str | None, backend: str) -> None:
    if backend != "torch":
        raise ValueError(f"unknown kernel backend {backend!r}")
    if act not in (None, "elu"):
        raise ValueError(f"act must be None or 'elu', got {act!r}")


def _torch_prologue(x: torch.Tensor, act: str | None, backend: str) -> torch.Tensor:
    _check_torch(act, backend)
    return elu(x) if act == "elu" else x


def alloc_state(slots: int, channels: int, length: int, dtype: torch.dtype, device, backend: str) -> torch.Tensor:
    """Zeroed [slots, channels, length] state laid out as `backend` on `device` reads it best."""
    if backend == "torch" and torch.device(device).type == "cpu":
        return conv_cpu.alloc_state(slots, channels, length, dtype, device)
    return torch.zeros(slots, channels, length, dtype=dtype, device=device)


def conv1d_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor,
                slots: torch.Tensor, stride: int, dilation: int, groups: int,
                first: torch.Tensor | None = None, act: str | None = None, backend: str = "torch",
                packed: linear_kernels.Packed | None = None, residual: torch.Tensor | None = None,
                dense: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """x [B, Cin, L] -> [B, Cout, L / stride] (+ `residual`); state [S, Cin, context] updated for
    `slots`. For the CPU path: `packed` is `kernels.linear.pack` of `gemm_weight(weight, ...)`,
    and `dense()` returns that matrix itself (computed here when not given)."""
    if backend == "triton":
        from kernels import conv_triton
        from kernels.launch import run_all
        launches, y = conv_triton.plan_conv1d(x, weight, bias, state, slots, stride, dilation, groups, first, act)
        run_all(launches)
        return y if residual is None else y + residual
    _check_torch(act, backend)
    if x.device.type == "cpu" and conv_cpu.supports(groups, stride, dilation):
        return conv_cpu.conv1d_step(x, weight, bias, state, slots, stride, dilation, first,
                                    elu if act == "elu" else None, packed, dense, residual)
    tp = state.shape[-1]
    if not tp:
        return _conv1d(elu(x) if act == "elu" else x, weight, bias, stride, dilation, groups, residual)
    # [state | act(x)] is built in one buffer: the activation writes straight into it.
    B, C, L = x.shape
    buf = x.new_empty(B, C, tp + L)
    prev, body = buf[..., :tp], buf[..., tp:]
    if act == "elu":
        elu(x, out=body)
    else:
        body.copy_(x)
    torch.index_select(state, 0, slots, out=prev)
    if first is not None:
        fresh = first.index_select(0, slots)
        prev.copy_(torch.where(fresh[:, None, None], body[..., :1], prev))
        first.index_fill_(0, slots, False)
    state.index_copy_(0, slots, buf[..., -tp:])
    return _conv1d(buf, weight, bias, stride, dilation, groups, residual)


def conv_transpose1d_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          partial: torch.Tensor, slots: torch.Tensor, stride: int, groups: int,
                          act: str | None = None, backend: str = "torch",
                          packed: linear_kernels.Packed | None = None,
                          dense: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """x [B, Cin, L] -> [B, Cout, L * stride]; partial [S, Cout, K - stride] updated for `slots`.
    `packed` and `dense` as for `conv1d_step`."""
    if backend == "triton":
        from kernels import conv_triton
        from kernels.launch import run_all
        launches, y = conv_triton.plan_conv_transpose1d(x, weight, bias, partial, slots, stride, groups, act)
        run_all(launches)
        return y
    x = _torch_prologue(x, act, backend)
    if x.device.type == "cpu" and conv_cpu.supports(groups, stride, 1):
        y = conv_cpu.conv_transpose1d(x, weight, bias, stride, packed, dense)
    else:
        y = F.conv_transpose1d(x, weight, bias, stride, 0, 0, groups, 1)
    pt = partial.shape[-1]
    if not pt:
        return y
    y[..., :pt] += partial.index_select(0, slots)
    tail = y[..., -pt:]
    if bias is not None:
        # The next step's output already carries the bias once; the stored tail must not. In place
        # on `y`, like the reference, so a step shorter than the overlap behaves the same.
        tail -= bias[:, None]
    partial.index_copy_(0, slots, tail)
    return y[..., :-pt]
