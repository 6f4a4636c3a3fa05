"""The CPU torch path of the streaming conv steps: channels-last dense products.

On CPU a SEANet step is bound by passes over its activations, not by arithmetic: ATen's
convolutions reorder each [B, C, L] input into oneDNN's blocked layout and back on every call, and
a strided conv's input had to be unfolded into columns first. Here activations and per-slot state
are channels-last in memory ([B, L, C], handed around as [B, C, L] views, so the contract of
`kernels.conv` is unchanged), and a conv is one product against a weight rearranged (and
prepacked) once, on rows that are already contiguous:

- taps: [state | x] is read as rows of `block` positions (the stride; 1 for stride-1 convs); one
  product gives every row's contribution to each group of output taps, and the output is the sum
  of those groups at rows shifted by `shift` (1 block, or the dilation);
- unfold: where the input is narrower than the taps' output (the 1-channel first conv, a conv
  that widens), each output's window, contiguous in this layout, becomes one row instead;
- transposed: one product gives each input position's kernel-long run of outputs, as
  ceil(K / stride) blocks of `stride` positions overlap-added at shifted rows.

Every function takes and returns [B, C, L] views of any strides; state from `alloc_state` is
channels-last, other state works too (slower).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from kernels import linear as linear_kernels


class ConvPlan(NamedTuple):
    unfold: bool  # one row per output window (K * Cin columns) instead of summed taps
    block: int  # positions per row in the taps form
    taps: int  # groups of output columns summed at shifted rows (1 with unfold)
    shift: int  # rows between consecutive taps
    pad: int  # zero positions after [state | x] so that the last row is whole


def supports(groups: int, stride: int, dilation: int) -> bool:
    return groups == 1 and (stride == 1 or dilation == 1)


def conv_plan(c_in: int, c_out: int, k: int, stride: int, dilation: int) -> ConvPlan:
    if not supports(1, stride, dilation):
        raise ValueError(f"no channels-last plan for stride {stride} with dilation {dilation}")
    taps = -(-k // stride)
    if k > 1 and dilation == 1 and k * c_in < taps * c_out:
        return ConvPlan(True, stride, 1, 0, 0)
    if stride == 1:
        return ConvPlan(False, 1, k, dilation, 0)
    return ConvPlan(False, stride, taps, 1, taps * stride - k)


def conv_weight(weight: torch.Tensor, stride: int, dilation: int) -> torch.Tensor:
    """Conv1d weight [Cout, Cin, K] -> the [out columns, row width] matrix of its plan."""
    c_out, c_in, k = weight.shape
    plan = conv_plan(c_in, c_out, k, stride, dilation)
    if plan.unfold:  # columns ordered (tap, channel), as a window lies in memory
        return weight.permute(0, 2, 1).reshape(c_out, k * c_in).contiguous()
    w = F.pad(weight, (0, plan.taps * plan.block - k)).view(c_out, c_in, plan.taps, plan.block)
    return w.permute(2, 0, 3, 1).reshape(plan.taps * c_out, plan.block * c_in).contiguous()


def transpose_weight(weight: torch.Tensor, stride: int) -> torch.Tensor:
    """ConvTranspose1d weight [Cin, Cout, K] -> [(block, position, Cout), Cin]."""
    c_in, c_out, k = weight.shape
    taps = -(-k // stride)
    w = F.pad(weight, (0, taps * stride - k)).view(c_in, c_out, taps, stride)
    return w.permute(2, 3, 1, 0).reshape(taps * stride * c_out, c_in).contiguous()


def alloc_state(slots: int, channels: int, length: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Zeroed [slots, channels, length] state, channels-last in memory."""
    return torch.zeros(slots, length, channels, dtype=dtype, device=device).transpose(1, 2)


def _product(rows: torch.Tensor, bias: torch.Tensor | None, packed: linear_kernels.Packed | None,
             dense: Callable[[], torch.Tensor]) -> torch.Tensor:
    weight = None if linear_kernels.uses_packed(rows, packed) else dense()
    return linear_kernels.linear(rows, weight, bias, packed)


def conv1d_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor,
                slots: torch.Tensor, stride: int, dilation: int, first: torch.Tensor | None,
                elu: Callable | None, packed: linear_kernels.Packed | None, dense: Callable[[], torch.Tensor] | None,
                residual: torch.Tensor | None) -> torch.Tensor:
    """`kernels.conv.conv1d_step` for groups == 1; `elu(x, out=...)` is applied to x first when
    given; `dense()` returns `conv_weight(weight, ...)` (cached by the caller)."""
    B, c_in, L = x.shape
    c_out, _, k = weight.shape
    plan = conv_plan(c_in, c_out, k, stride, dilation)
    ctx = state.shape[-1]
    xl = x.transpose(1, 2)
    if not ctx and not plan.pad and elu is None and xl.is_contiguous():
        buf = xl
    else:
        # [state | act(x) | zeros] in one buffer: the activation writes straight into it.
        buf = x.new_empty(B, ctx + L + plan.pad, c_in)
        body = buf[:, ctx:ctx + L]
        if elu is not None:
            elu(xl, out=body)
        else:
            body.copy_(xl)
        if plan.pad:
            buf[:, ctx + L:].zero_()
        if ctx:
            st = state.transpose(1, 2)
            prev = buf[:, :ctx]
            torch.index_select(st, 0, slots, out=prev)
            if first is not None:
                fresh = first.index_select(0, slots)
                prev.copy_(torch.where(fresh[:, None, None], body[:, :1], prev))
                first.index_fill_(0, slots, False)
            st.index_copy_(0, slots, buf[:, L:L + ctx])
    n_out = L // stride
    dense = dense or (lambda: conv_weight(weight, stride, dilation))
    if plan.unfold:
        cols = buf.as_strided((B, n_out, k * c_in), (buf.stride(0), stride * c_in, 1))
        y = _product(cols.reshape(B * n_out, k * c_in), bias, packed, dense).view(B, n_out, c_out)
    else:
        rows = buf.reshape(-1, plan.block * c_in)
        full_bias = None if bias is None else F.pad(bias, (0, (plan.taps - 1) * c_out))
        z = _product(rows, full_bias, packed, dense).view(B, -1, plan.taps * c_out)
        if plan.taps == 1:
            y = z[:, :n_out]
        else:
            y = torch.add(z[:, :n_out, :c_out], z[:, plan.shift:plan.shift + n_out, c_out:2 * c_out])
            for m in range(2, plan.taps):
                y += z[:, m * plan.shift:m * plan.shift + n_out, m * c_out:(m + 1) * c_out]
    if residual is not None:
        y = y.add_(residual.transpose(1, 2))  # y is always a fresh product here
    return y.transpose(1, 2)


def conv_transpose1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                     packed: linear_kernels.Packed | None, dense: Callable[[], torch.Tensor] | None) -> torch.Tensor:
    """The whole transposed conv of x [B, Cin, n] (groups == 1, no padding): [B, Cout, (n - 1) *
    stride + K], channels-last in memory; `dense()` returns `transpose_weight(weight, stride)`."""
    B, c_in, n = x.shape
    _, c_out, k = weight.shape
    taps = -(-k // stride)
    rows = x.transpose(1, 2).reshape(B * n, c_in)
    z = _product(rows, None, packed, dense or (lambda: transpose_weight(weight, stride)))
    z = z.view(B, n, taps, stride * c_out)
    blocks = x.new_empty(B, n + taps - 1, stride * c_out)
    blocks[:, :n] = z[:, :, 0]
    blocks[:, n:].zero_()
    for m in range(1, taps):
        blocks[:, m:m + n] += z[:, :, m]
    y = blocks.view(B, -1, c_out)[:, :(n - 1) * stride + k]
    if bias is not None:
        y += bias
    return y.transpose(1, 2)
