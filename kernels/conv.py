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

from kernels import linear as linear_kernels


# On CPU a streaming step's convolutions go through one matmul (`kernels.linear`, on a weight
# prepacked for oneDNN) wherever that measured faster than ATen's convolution (bench/RESULTS.md):
# strided and pointwise convs and any conv with few output positions, e.g. SEANet's 512 -> 1024,
# kernel 16 layer, which sees two outputs per frame and ran 8-25x slower as a convolution. Wide
# stride-1 convs over many positions stay convolutions: unfolding their input costs more than the
# GEMM saves, and so do strided convs over hundreds of positions (the input copy that lines up
# their columns ran at a fraction of memory speed).
_GEMM_MAX_POSITIONS = 16
_GEMM_MAX_STRIDED_POSITIONS = 96
_POINTWISE_BMM_MIN_POSITIONS = 96


def _conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, dilation: int,
            groups: int, packed: torch.Tensor | None, residual: torch.Tensor | None = None) -> torch.Tensor:
    c_out, c_in, k = weight.shape
    n_out = (x.shape[-1] - dilation * (k - 1) - 1) // stride + 1
    if residual is not None:
        pointwise = k == 1 and stride == 1 and groups == 1 and x.device.type == "cpu"
        if pointwise and n_out >= _POINTWISE_BMM_MIN_POSITIONS:
            # A pointwise conv over many positions (a SEANet residual block's last) as W @ x per
            # row, summed onto the residual in the same pass: no transposed copies, no extra add.
            y = torch.baddbmm(residual, weight[:, :, 0].expand(x.shape[0], c_out, c_in), x)
            return y if bias is None else y.add_(bias[:, None])
        return _conv1d(x, weight, bias, stride, dilation, groups, packed).add_(residual)
    gemm = (k == 1 or n_out <= _GEMM_MAX_POSITIONS
            or (stride > 1 and n_out <= _GEMM_MAX_STRIDED_POSITIONS))
    if groups != 1 or dilation != 1 or not gemm or x.device.type != "cpu":
        return F.conv1d(x, weight, bias, stride, 0, dilation, groups)
    B = x.shape[0]
    cols = x.unfold(2, k, stride).permute(0, 2, 1, 3).reshape(B * n_out, c_in * k)
    y = linear_kernels.linear(cols, weight.reshape(c_out, c_in * k), bias, packed)
    return y.view(B, n_out, c_out).transpose(1, 2)


def _conv_transpose1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                      groups: int, packed: torch.Tensor | None) -> torch.Tensor:
    c_in, c_out, k = weight.shape
    B, _, n_in = x.shape
    if groups != 1 or n_in > _GEMM_MAX_POSITIONS or x.device.type != "cpu":
        return F.conv_transpose1d(x, weight, bias, stride, 0, 0, groups, 1)
    # Each input position contributes a kernel-long run of outputs; split the kernel into J chunks
    # of `stride` so the overlap-add is J shifted block adds rather than one per position.
    J = -(-k // stride)
    z = linear_kernels.linear(x.transpose(1, 2), weight.reshape(c_in, c_out * k).t(), None, packed)
    z = F.pad(z.view(B, n_in, c_out, k), (0, J * stride - k)).view(B, n_in, c_out, J, stride)
    blocks = x.new_zeros(B, c_out, n_in + J - 1, stride)
    for j in range(J):
        blocks[:, :, j:j + n_in] += z[:, :, :, j].transpose(1, 2)
    y = blocks.view(B, c_out, -1)[..., :(n_in - 1) * stride + k]
    if bias is not None:
        y += bias[:, None]
    return y


def gemm_weight(weight: torch.Tensor, transposed: bool, groups: int, dilation: int = 1) -> torch.Tensor | None:
    """The [out, in] matrix the CPU GEMM path multiplies by, or None where that path never runs."""
    if groups != 1 or dilation != 1:
        return None
    if transposed:
        c_in, c_out, k = weight.shape
        return weight.reshape(c_in, c_out * k).t()
    return weight.reshape(weight.shape[0], -1)


_LOG2E = 1.4426950408889634


def elu(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """ELU (alpha 1) as max(x, exp2(min(x, 0) log2 e) - 1) (e^x - 1 >= x everywhere), into `out`
    if given. ATen's CPU ELU evaluates exp at full libm accuracy and ran 2x slower than this whole
    expression on SEANet's activations; the result is within one float32 ulp of 1 of it, and
    exactly x where x > 0."""
    out = torch.clamp(x, max=0, out=out)
    out.mul_(_LOG2E).exp2_().sub_(1)
    return torch.maximum(out, x, out=out)


def _check_torch(act: str | None, backend: str) -> None:
    if backend != "torch":
        raise ValueError(f"unknown kernel backend {backend!r}")
    if act not in (None, "elu"):
        raise ValueError(f"act must be None or 'elu', got {act!r}")


def _torch_prologue(x: torch.Tensor, act: str | None, backend: str) -> torch.Tensor:
    _check_torch(act, backend)
    return elu(x) if act == "elu" else x


def conv1d_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor,
                slots: torch.Tensor, stride: int, dilation: int, groups: int,
                first: torch.Tensor | None = None, act: str | None = None, backend: str = "torch",
                packed: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, Cin, L] -> [B, Cout, L / stride] (+ `residual`); state [S, Cin, context] updated for
    `slots`. `packed`: `kernels.linear.pack` of `gemm_weight(weight, ...)`, for the CPU GEMM path."""
    if backend == "triton":
        from kernels import conv_triton
        from kernels.launch import run_all
        launches, y = conv_triton.plan_conv1d(x, weight, bias, state, slots, stride, dilation, groups, first, act)
        run_all(launches)
        return y if residual is None else y + residual
    _check_torch(act, backend)
    tp = state.shape[-1]
    if not tp:
        return _conv1d(elu(x) if act == "elu" else x, weight, bias, stride, dilation, groups, packed, residual)
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
    return _conv1d(buf, weight, bias, stride, dilation, groups, packed, residual)


def conv_transpose1d_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          partial: torch.Tensor, slots: torch.Tensor, stride: int, groups: int,
                          act: str | None = None, backend: str = "torch",
                          packed: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, Cin, L] -> [B, Cout, L * stride]; partial [S, Cout, K - stride] updated for `slots`."""
    if backend == "triton":
        from kernels import conv_triton
        from kernels.launch import run_all
        launches, y = conv_triton.plan_conv_transpose1d(x, weight, bias, partial, slots, stride, groups, act)
        run_all(launches)
        return y
    x = _torch_prologue(x, act, backend)
    y = _conv_transpose1d(x, weight, bias, stride, groups, packed)
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
