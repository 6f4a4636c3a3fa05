"""Streaming conv steps over per-slot state: the public entry points and their torch path.

`conv1d_step` runs a causal conv1d over ``[state[slot] | act(x)]`` and leaves the last
``(K - 1) * dilation + 1 - stride`` columns of that concatenation in the slot's state;
`conv_transpose1d_step` runs a transposed conv, adds the slot's overlap-add `partial` to the first
``K - stride`` outputs and stores the new tail (bias excluded) back. With `first` (replicate
padding), a fresh slot's missing past is its first input column repeated, and the flag is cleared.
`act="elu"` applies ELU to x first (the state then holds ELU'd columns, as when the ELU is a
separate layer). `backend="triton"` runs `kernels.conv_triton` (same contract; rows whose slot is
< 0 are skipped).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def conv1d_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor,
                slots: torch.Tensor, stride: int, dilation: int, groups: int,
                first: torch.Tensor | None = None, act: str | None = None, backend: str = "torch") -> torch.Tensor:
    """x [B, Cin, L] -> [B, Cout, L / stride]; state [S, Cin, context] updated for `slots`."""
    if backend == "triton":
        from kernels import conv_triton
        from kernels.launch import run_all
        launches, y = conv_triton.plan_conv1d(x, weight, bias, state, slots, stride, dilation, groups, first, act)
        run_all(launches)
        return y
    if backend != "torch":
        raise ValueError(f"unknown kernel backend {backend!r}")
    if act == "elu":
        x = F.elu(x)
    elif act is not None:
        raise ValueError(f"act must be None or 'elu', got {act!r}")
    tp = state.shape[-1]
    if tp:
        prev = state.index_select(0, slots)
        if first is not None:
            fresh = first.index_select(0, slots)
            prev = torch.where(fresh[:, None, None], x[..., :1], prev)
            first.index_fill_(0, slots, False)
        x = torch.cat([prev, x], dim=-1)
        state.index_copy_(0, slots, x[..., -tp:])
    return F.conv1d(x, weight, bias, stride, 0, dilation, groups)


def conv_transpose1d_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          partial: torch.Tensor, slots: torch.Tensor, stride: int, groups: int,
                          act: str | None = None, backend: str = "torch") -> torch.Tensor:
    """x [B, Cin, L] -> [B, Cout, L * stride]; partial [S, Cout, K - stride] updated for `slots`."""
    if backend == "triton":
        from kernels import conv_triton
        from kernels.launch import run_all
        launches, y = conv_triton.plan_conv_transpose1d(x, weight, bias, partial, slots, stride, groups, act)
        run_all(launches)
        return y
    if backend != "torch":
        raise ValueError(f"unknown kernel backend {backend!r}")
    if act == "elu":
        x = F.elu(x)
    elif act is not None:
        raise ValueError(f"act must be None or 'elu', got {act!r}")
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
