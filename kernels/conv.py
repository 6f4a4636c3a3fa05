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


# A streaming step sees only a few output positions of the deep, wide layers (SEANet's last
# downsampling conv: 512 -> 1024 channels, kernel 16, two outputs per frame), where oneDNN's and
# the reference ATen convolutions run an order of magnitude below GEMM speed on CPU. Those go
# through one matmul instead.
_GEMM_MAX_POSITIONS = 4


def _conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, dilation: int,
            groups: int) -> torch.Tensor:
    c_out, c_in, k = weight.shape
    n_out = (x.shape[-1] - dilation * (k - 1) - 1) // stride + 1
    if groups != 1 or dilation != 1 or n_out > _GEMM_MAX_POSITIONS or x.device.type != "cpu":
        return F.conv1d(x, weight, bias, stride, 0, dilation, groups)
    B = x.shape[0]
    cols = x.unfold(2, k, stride).permute(0, 2, 1, 3).reshape(B * n_out, c_in * k)
    y = cols @ weight.reshape(c_out, c_in * k).t()
    if bias is not None:
        y = y + bias
    return y.view(B, n_out, c_out).transpose(1, 2)


def _conv_transpose1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                      groups: int) -> torch.Tensor:
    c_in, c_out, k = weight.shape
    B, _, n_in = x.shape
    if groups != 1 or n_in > _GEMM_MAX_POSITIONS or x.device.type != "cpu":
        return F.conv_transpose1d(x, weight, bias, stride, 0, 0, groups, 1)
    z = (x.transpose(1, 2).reshape(B * n_in, c_in) @ weight.reshape(c_in, c_out * k)).view(B, n_in, c_out, k)
    y = x.new_zeros(B, c_out, (n_in - 1) * stride + k)
    for t in range(n_in):  # overlap-add of each input position's kernel-long contribution
        y[..., t * stride: t * stride + k] += z[:, t]
    if bias is not None:
        y += bias[:, None]
    return y


def _torch_prologue(x: torch.Tensor, act: str | None, backend: str) -> torch.Tensor:
    if backend != "torch":
        raise ValueError(f"unknown kernel backend {backend!r}")
    if act == "elu":
        return F.elu(x)
    if act is not None:
        raise ValueError(f"act must be None or 'elu', got {act!r}")
    return x


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
    x = _torch_prologue(x, act, backend)
    tp = state.shape[-1]
    if tp:
        prev = state.index_select(0, slots)
        if first is not None:
            fresh = first.index_select(0, slots)
            prev = torch.where(fresh[:, None, None], x[..., :1], prev)
            first.index_fill_(0, slots, False)
        x = torch.cat([prev, x], dim=-1)
        state.index_copy_(0, slots, x[..., -tp:])
    return _conv1d(x, weight, bias, stride, dilation, groups)


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
    x = _torch_prologue(x, act, backend)
    y = _conv_transpose1d(x, weight, bias, stride, groups)
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
