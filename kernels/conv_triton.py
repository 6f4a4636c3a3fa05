"""Triton streaming conv steps over per-slot state (SEANet / Mimi), optionally with ELU fused in.

Conv1d: output tile [BLOCK_CO, BLOCK_T] of ``conv1d([state | act(x)])`` as an implicit GEMM whose
reduction runs over (input channel, tap); each input column is read from the slot's state row or
from x depending on where it falls, so the concatenation never exists. A tile's columns are
(row, position) pairs across the batch: SEANet's deep layers have one or two positions a row and
the largest weights (33 MB), which a tile per row would read once per session. Transposed conv:
output positions are split by phase ``j % stride``, which turns each phase into a dense conv over
``ceil(K / stride)`` taps; the overlap-add `partial` is added to the first positions and the new
tail (bias excluded) goes to a scratch buffer.

State is updated in place by a second, tiny launch: conv programs of other output tiles still read
the old state, and nothing orders programs within one launch. That launch runs one program per
row, so a row's `first` flag (replicate padding) is read and cleared by the same program.
Rows whose slot is < 0 are skipped (their columns masked). fp32 GEMMs use 3xTF32 on tensor cores
(about fp32 accuracy; torch's own cuDNN convs default to plain TF32): the FMA path spills heavily.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import Launch, checker, same_device

_NUM_WARPS = 4
_check = checker("conv")


@triton.jit
def _act(x, ACT_ELU: tl.constexpr):
    if ACT_ELU:
        x = tl.where(x > 0, x, tl.exp(x.to(tl.float32)) - 1.0)
    return x


@triton.jit
def _conv1d_kernel(x_ptr, w_ptr, bias_ptr, state_ptr, first_ptr, slots_ptr, y_ptr,
                   Cin, Cout, L, L_out, NB, s_xb, s_xc, s_xt, s_ss, s_yb, s_yc,
                   K: tl.constexpr, STRIDE: tl.constexpr, DIL: tl.constexpr, CTX: tl.constexpr,
                   HAS_BIAS: tl.constexpr, REPLICATE: tl.constexpr, ACT_ELU: tl.constexpr, F32: tl.constexpr,
                   BLOCK_CO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    # Columns are (row, output position) pairs, NB = B * L_out of them: a weight tile serves every
    # row's positions at once, rather than each row re-reading the weights for its few positions.
    n = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    b = n // L_out
    t = n % L_out
    slot = tl.load(slots_ptr + b, mask=n < NB, other=-1).to(tl.int64)
    col_ok = (n < NB) & (slot >= 0)
    co_ok = co < Cout
    x_col = x_ptr + b * s_xb
    if REPLICATE:
        fresh = tl.load(first_ptr + slot, mask=col_ok, other=0) != 0
    acc = tl.zeros([BLOCK_CO, BLOCK_T], tl.float32)
    R = Cin * K
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < R
        ci = r // K
        j = t[None, :] * STRIDE + (r % K)[:, None] * DIL  # column of [state | x]
        ok = r_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + co[:, None] * R + r[None, :], mask=co_ok[:, None] & r_ok[None, :], other=0.0)
        past = j < CTX
        xv = _act(tl.load(x_col[None, :] + ci[:, None] * s_xc + (j - CTX) * s_xt, mask=ok & ~past, other=0.0),
                  ACT_ELU)
        if CTX > 0:
            sv = tl.load(state_ptr + slot[None, :] * s_ss + ci[:, None] * CTX + j, mask=ok & past, other=0.0)
            if REPLICATE:
                x0 = _act(tl.load(x_col[None, :] + ci[:, None] * s_xc, mask=ok, other=0.0), ACT_ELU)
                sv = tl.where(fresh[None, :], x0.to(sv.dtype), sv)
            xv = tl.where(past, sv.to(xv.dtype), xv)
        if F32:
            acc += tl.dot(w, xv.to(w.dtype), input_precision="tf32x3")
        else:
            acc += tl.dot(w, xv.to(w.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[:, None]
    dst = y_ptr + b[None, :] * s_yb + co[:, None] * s_yc + t[None, :]
    tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=co_ok[:, None] & col_ok[None, :])


@triton.jit
def _conv1d_state_kernel(x_ptr, state_ptr, first_ptr, slots_ptr, Cin, L, s_xb, s_xc, s_xt, s_ss,
                         CTX: tl.constexpr, BLOCK_J: tl.constexpr, REPLICATE: tl.constexpr,
                         ACT_ELU: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    if slot < 0:
        return
    fresh = False
    if REPLICATE:
        fresh = tl.load(first_ptr + slot) != 0
    j = tl.arange(0, BLOCK_J)
    src = L + j  # the new state is the last CTX columns of [state | x]
    past = src < CTX
    x_row = x_ptr + b * s_xb
    row = state_ptr + slot * s_ss
    for c0 in range(0, Cin, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = (c < Cin)[:, None] & (j < CTX)[None, :]
        old = tl.load(row + c[:, None] * CTX + src[None, :], mask=ok & past[None, :], other=0.0)
        if REPLICATE:
            x0 = _act(tl.load(x_row + c * s_xc, mask=c < Cin, other=0.0), ACT_ELU)
            old = tl.where(fresh, x0[:, None].to(old.dtype), old)
        new = _act(tl.load(x_row + c[:, None] * s_xc + (src - CTX)[None, :] * s_xt, mask=ok & ~past[None, :],
                           other=0.0), ACT_ELU)
        val = tl.where(past[None, :], old, new.to(old.dtype))
        # When L < CTX, columns move left within the row: every read must land before any write.
        tl.debug_barrier()
        tl.store(row + c[:, None] * CTX + j[None, :], val, mask=ok)
    if REPLICATE:
        tl.store(first_ptr + slot, tl.zeros([], first_ptr.dtype.element_ty))


@triton.jit
def _convtr_kernel(x_ptr, w_ptr, bias_ptr, partial_ptr, slots_ptr, y_ptr, tail_ptr,
                   Cin, Cout, L, M, NB, s_xb, s_xc, s_xt, s_ps, s_yb, s_yc, s_tb, s_tc,
                   K: tl.constexpr, STRIDE: tl.constexpr, TAPS: tl.constexpr, OV: tl.constexpr,
                   DEPTHWISE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_ELU: tl.constexpr, F32: tl.constexpr,
                   BLOCK_CO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    # Columns are (row, phase position) pairs, NB = B * M of them, as in `_conv1d_kernel`.
    ph = tl.program_id(0) % STRIDE
    n = (tl.program_id(0) // STRIDE) * BLOCK_M + tl.arange(0, BLOCK_M)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    b = n // M
    m = n % M
    slot = tl.load(slots_ptr + b, mask=n < NB, other=-1).to(tl.int64)
    col_ok = (n < NB) & (slot >= 0)
    co_ok = co < Cout
    x_col = x_ptr + b * s_xb
    acc = tl.zeros([BLOCK_CO, BLOCK_M], tl.float32)
    # y[co, m * STRIDE + ph] = sum over (ci, i) of w[ci, co, ph + i * STRIDE] * x[ci, m - i]
    if DEPTHWISE:
        for i in tl.static_range(TAPS):
            k = ph + i * STRIDE
            k_ok = (co * 0 + k) < K  # a tap past K when K is not a multiple of STRIDE
            w = tl.load(w_ptr + co * K + k, mask=co_ok & k_ok, other=0.0).to(tl.float32)
            src = m - i
            xv = tl.load(x_col[None, :] + co[:, None] * s_xc + src[None, :] * s_xt,
                         mask=co_ok[:, None] & (col_ok & (src >= 0) & (src < L))[None, :], other=0.0)
            acc += w[:, None] * _act(xv.to(tl.float32), ACT_ELU)
    else:
        R = Cin * TAPS
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            ci = r // TAPS
            i = r % TAPS
            k = ph + i * STRIDE
            r_ok = (r < R) & (k < K)
            w = tl.load(w_ptr + ci[None, :] * (Cout * K) + co[:, None] * K + k[None, :],
                        mask=co_ok[:, None] & r_ok[None, :], other=0.0)
            src = m[None, :] - i[:, None]
            xv = tl.load(x_col[None, :] + ci[:, None] * s_xc + src * s_xt,
                         mask=r_ok[:, None] & col_ok[None, :] & (src >= 0) & (src < L), other=0.0)
            xv = _act(xv, ACT_ELU).to(w.dtype)
            if F32:
                acc += tl.dot(w, xv, input_precision="tf32x3")
            else:
                acc += tl.dot(w, xv)
    j = m * STRIDE + ph
    n_out = L * STRIDE
    out_ok = co_ok[:, None] & (col_ok & (j < n_out))[None, :]
    val = acc
    if HAS_BIAS:
        val += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[:, None]
    if OV > 0:
        head = co_ok[:, None] & (col_ok & (j < OV))[None, :]
        val += tl.load(partial_ptr + slot[None, :] * s_ps + co[:, None] * OV + j[None, :], mask=head,
                       other=0.0).to(tl.float32)
        tail_ok = co_ok[:, None] & (col_ok & (j >= n_out) & (j < n_out + OV))[None, :]
        tl.store(tail_ptr + b[None, :] * s_tb + co[:, None] * s_tc + (j - n_out)[None, :],
                 acc.to(tail_ptr.dtype.element_ty), mask=tail_ok)
    tl.store(y_ptr + b[None, :] * s_yb + co[:, None] * s_yc + j[None, :], val.to(y_ptr.dtype.element_ty),
             mask=out_ok)


@triton.jit
def _copy_rows_kernel(src_ptr, dst_ptr, slots_ptr, n, s_src, s_dst, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    if slot < 0:
        return
    for i0 in range(0, n, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        tl.store(dst_ptr + slot * s_dst + i, tl.load(src_ptr + b * s_src + i, mask=i < n), mask=i < n)


def _tile(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _warps(block_co: int, block_cols: int) -> int:
    # A 64 x 64 output tile with its operands outgrows 4 warps' registers under Triton 3.6 (the lent
    # GPU image's compiler spills there since the tiles span the batch; 3.9 just fits).
    return 8 if block_co * block_cols >= 64 * 64 else _NUM_WARPS


_MIN_PROGRAMS = 128  # about one per SM of an H100 (132)
_BIG_WEIGHT = 1 << 22  # 4 MB: past this, how many SMs stream the weight matters


def _channel_tile(Cout: int, column_tiles: int, weight: torch.Tensor) -> int:
    """Output channels per program: 64, or 16 where a large weight would otherwise be streamed by
    a handful of programs. SEANet's deepest convs have a column tile or two and up to 33 MB of
    weights: in 64-channel tiles, 16 programs would stream them while most SMs idle."""
    block = _tile(Cout)
    big = weight.numel() * weight.element_size() >= _BIG_WEIGHT
    return 16 if big and column_tiles * triton.cdiv(Cout, block) < _MIN_PROGRAMS else block


def _check_common(x, weight, bias, state, slots):
    _check(x.dim() == 3 and weight.dim() == 3, "x must be [B, C, L] and weight 3-d")
    _check(x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {x.dtype}")
    _check(weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype), "x, weight, bias dtypes differ")
    _check(weight.is_contiguous() and (bias is None or bias.is_contiguous()), "weight/bias must be contiguous")
    _check(state.is_contiguous() and state.dtype == x.dtype, "state must be contiguous, in x's dtype")
    _check(slots.shape == (x.shape[0],) and slots.dtype in (torch.int32, torch.int64) and slots.is_contiguous(),
           "slots must be a contiguous integer [B]")
    _check(same_device(x, weight, state, slots, *([bias] if bias is not None else [])), "operands on several devices")


def plan_conv1d(x, weight, bias, state, slots, stride, dilation, groups, first=None, act=None):
    """Launches for one causal conv1d step over [state | act(x)]; returns (launches, y)."""
    _check_common(x, weight, bias, state, slots)
    _check(groups == 1, "only groups=1 (SEANet's and Mimi's streaming convs)")
    _check(act in (None, "elu"), f"act must be None or 'elu', got {act!r}")
    B, Cin, L = x.shape
    Cout, _, K = weight.shape
    ctx = (K - 1) * dilation + 1 - stride
    _check(weight.shape[1] == Cin, f"weight is {tuple(weight.shape)} for {Cin} input channels")
    _check(ctx >= 0 and L % stride == 0, f"step of {L} with stride {stride} and effective kernel "
           f"{(K - 1) * dilation + 1}")
    _check(state.dim() == 3 and state.shape[1:] == (Cin, ctx), f"state must be [S, {Cin}, {ctx}]")
    replicate = first is not None
    if replicate:
        _check(first.dim() == 1 and first.shape[0] == state.shape[0] and first.is_contiguous(),
               "first must be a contiguous [S] flag per slot")
        _check(same_device(first, state), "first on another device")
    L_out = L // stride
    y = torch.empty(B, Cout, L_out, device=x.device, dtype=x.dtype)
    first_arg = first.view(torch.uint8) if replicate and first.dtype == torch.bool else (first if replicate else slots)
    bias_arg = bias if bias is not None else weight
    NB = B * L_out
    block_t = _tile(NB)
    block_co = _channel_tile(Cout, triton.cdiv(NB, block_t), weight)
    consts = dict(K=K, STRIDE=stride, DIL=dilation, CTX=ctx, HAS_BIAS=bias is not None, REPLICATE=replicate,
                  ACT_ELU=act == "elu", F32=x.dtype == torch.float32, BLOCK_CO=block_co, BLOCK_T=block_t,
                  BLOCK_R=32 if Cin * K >= 32 else 16)
    launches = [Launch(_conv1d_kernel, (triton.cdiv(NB, block_t), triton.cdiv(Cout, block_co)),
                       [x, weight, bias_arg, state, first_arg, slots, y, Cin, Cout, L, L_out, NB,
                        x.stride(0), x.stride(1), x.stride(2), state.stride(0), y.stride(0), y.stride(1)],
                       consts, _warps(block_co, block_t))]
    if ctx > 0:
        launches.append(Launch(_conv1d_state_kernel, (B,),
                               [x, state, first_arg, slots, Cin, L, x.stride(0), x.stride(1), x.stride(2),
                                state.stride(0)],
                               dict(CTX=ctx, BLOCK_J=triton.next_power_of_2(ctx), REPLICATE=replicate,
                                    ACT_ELU=act == "elu", BLOCK_C=64), _NUM_WARPS))
    return launches, y


def plan_conv_transpose1d(x, weight, bias, partial, slots, stride, groups, act=None):
    """Launches for one causal transposed-conv step with overlap-add state; returns (launches, y)."""
    _check_common(x, weight, bias, partial, slots)
    _check(act in (None, "elu"), f"act must be None or 'elu', got {act!r}")
    B, Cin, L = x.shape
    _check(weight.shape[0] == Cin, f"weight is {tuple(weight.shape)} for {Cin} input channels")
    Cout = weight.shape[1] * groups
    K = weight.shape[2]
    depthwise = groups > 1
    _check(groups == 1 or (groups == Cin == Cout), "only dense or channel-wise (groups = channels)")
    ov = K - stride
    _check(0 <= ov <= L * stride, f"overlap {ov} must be in [0, step output {L * stride}]")
    _check(partial.dim() == 3 and partial.shape[1:] == (Cout, ov), f"partial must be [S, {Cout}, {ov}]")
    taps = triton.cdiv(K, stride)
    M = L + taps - 1
    y = torch.empty(B, Cout, L * stride, device=x.device, dtype=x.dtype)
    tail = torch.empty(B, Cout, max(ov, 1), device=x.device, dtype=x.dtype)
    NB = B * M
    block_m = _tile(NB)
    block_co = _channel_tile(Cout, stride * triton.cdiv(NB, block_m), weight)
    consts = dict(K=K, STRIDE=stride, TAPS=taps, OV=ov, DEPTHWISE=depthwise, HAS_BIAS=bias is not None,
                  ACT_ELU=act == "elu", F32=x.dtype == torch.float32, BLOCK_CO=block_co, BLOCK_M=block_m,
                  BLOCK_R=32 if Cin * taps >= 32 else 16)
    launches = [Launch(_convtr_kernel, (stride * triton.cdiv(NB, block_m), triton.cdiv(Cout, block_co)),
                       [x, weight, bias if bias is not None else weight, partial, slots, y, tail, Cin, Cout, L, M,
                        NB, x.stride(0), x.stride(1), x.stride(2), partial.stride(0), y.stride(0),
                        y.stride(1), tail.stride(0), tail.stride(1)], consts, _warps(block_co, block_m))]
    if ov > 0:
        launches.append(Launch(_copy_rows_kernel, (B,), [tail, partial, slots, Cout * ov, tail.stride(0),
                                                          partial.stride(0)], dict(BLOCK=256), _NUM_WARPS))
    return launches, y
