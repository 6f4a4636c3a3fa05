"""The launches the engine makes at Moshi 7B / Mimi shapes, planned on meta tensors.

Each family's `plan` is the one its launcher uses, so a shape or constexpr change in a launcher
shows up here without edits. Batch sizes are chosen to hit every distinct specialization (e.g.
split counts for attention).
"""
from __future__ import annotations

from typing import Iterator

import torch

from engine.graphs import BUCKETS
from kernels.aot import DTYPES
from kernels.launch import Launch

META = torch.device("meta")
H100_SMS = 132
LM = dict(heads=32, head_dim=128, capacity=3000, T=1, context=3000)
DEPTH = dict(heads=16, head_dim=64, capacity=8, T=1, context=None)
MIMI = dict(heads=8, head_dim=64, capacity=250, T=2, context=250)
MAX_SESSIONS = 64
# A conv's tiles follow the batch (columns are rows x positions; channel tiles shrink while the
# grid is small), so every batch bucket the engine pads to is planned; duplicates fold away.
CONV_BATCHES = BUCKETS


def _qkv(B: int, T: int, H: int, D: int, dtype: torch.dtype):
    # As the engine hands them over: q/k fresh from RoPE (contiguous), v a view of the projection.
    projected = torch.empty(B, T, 3, H, D, device=META, dtype=dtype)
    v = projected.permute(2, 0, 3, 1, 4)[2]
    q = torch.empty(B, H, T, D, device=META, dtype=dtype)
    return q, torch.empty_like(q), v


def attention_specs() -> Iterator[tuple[str, list[Launch]]]:
    from kernels import attention_triton
    for name, shape, batches in (("lm", LM, (1, 4, 64)), ("depth", DEPTH, (1, 64)), ("mimi", MIMI, (1, 64))):
        H, D, cap, T = shape["heads"], shape["head_dim"], shape["capacity"], shape["T"]
        for dtype in DTYPES:
            cache = torch.empty(MAX_SESSIONS, H, cap, D, device=META, dtype=dtype)
            for B in batches:
                q, k, v = _qkv(B, T, H, D, dtype)
                slots = torch.empty(B, device=META, dtype=torch.long)
                launches, _ = attention_triton.plan(q, k, v, cache, torch.empty_like(cache), slots,
                                                    torch.empty_like(slots), shape["context"],
                                                    num_sms=H100_SMS)
                yield f"{name}-B{B}-{str(dtype)[6:]}", launches


def paged_attention_specs() -> Iterator[tuple[str, list[Launch]]]:
    """The LM's attention through its KV pool's page tables: pages of 16 frames, the pool in the LM's
    dtype or in fp8 (e4m3, with scales) beside bf16 activations."""
    from kernels import paged_attention_triton
    from kernels.paged_attention import FP8, PagedKV
    H, D, ctx, T, page = LM["heads"], LM["head_dim"], LM["context"], LM["T"], 16
    per_slot = -(-ctx // page)
    table = torch.empty(MAX_SESSIONS, per_slot, device=META, dtype=torch.int32)
    window = torch.empty(MAX_SESSIONS, device=META, dtype=torch.int32)
    for dtype, pool_dtype in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, FP8)):
        pool = torch.empty(MAX_SESSIONS * per_slot + 1, H, page, D, device=META, dtype=pool_dtype)
        scales = torch.empty(pool.shape[:3], device=META) if pool_dtype == FP8 else None
        cache = PagedKV(pool, torch.empty_like(pool), scales, None if scales is None else torch.empty_like(scales),
                        table, window)
        kv = "fp8" if pool_dtype == FP8 else str(pool_dtype)[6:]
        for B in (1, 4, 64):
            q, k, v = _qkv(B, T, H, D, dtype)
            slots = torch.empty(B, device=META, dtype=torch.long)
            launches, _ = paged_attention_triton.plan(q, k, v, cache, slots, torch.empty_like(slots), ctx,
                                                      num_sms=H100_SMS)
            yield f"lm-paged-B{B}-{str(dtype)[6:]}-kv-{kv}", launches


def rvq_specs() -> Iterator[tuple[str, list[Launch]]]:
    # fp32 only: Mimi quantizes in fp32 whatever the LM dtype and the launcher rejects anything else.
    from kernels import rvq_triton
    D, bins, n_q = 256, 2048, 32
    tables = [torch.empty(1, bins, D + 2, device=META), torch.empty(n_q - 1, bins, D + 2, device=META)]
    for B in (1, 64):
        x = torch.empty(2, B, D, device=META)
        launches, codes = rvq_triton.plan_encode(x, tables, [1, 7])
        yield f"encode-split1+7-N{B}", launches
        yield f"decode-split1+7-N{B}", rvq_triton.plan_decode(codes, tables, [1, 7])[0]


def _stateful_convs(layers, L: int, out: list) -> int:
    """Appends (conv module, input length, act) in execution order, ELUs fused as on the Triton
    path; returns the output length."""
    from torch import nn

    from engine.seanet import SeanetResBlock, StreamingConv1d, StreamingConvTranspose1d
    act = None
    for layer in layers:
        if isinstance(layer, nn.ELU):
            act = "elu"
            continue
        if isinstance(layer, SeanetResBlock):
            _stateful_convs(layer.block, L, out)
        elif isinstance(layer, StreamingConv1d):
            out.append((layer, L, act))
            L //= layer.stride
        elif isinstance(layer, StreamingConvTranspose1d):
            out.append((layer, L, act))
            L *= layer.convtr.convtr.stride[0]
        act = None
    return L


def conv_specs() -> Iterator[tuple[str, list[Launch]]]:
    from engine.config import MimiConfig
    from engine.mimi import Mimi
    cfg = MimiConfig()
    for dtype in DTYPES:
        with torch.device(META):
            mimi = Mimi(cfg).to(dtype)
        mimi.init_state(max(CONV_BATCHES))
        convs: list = []
        L = _stateful_convs(mimi.encoder.model, cfg.frame_size, convs)
        _stateful_convs([mimi.downsample.conv], L, convs)
        _stateful_convs([mimi.upsample.convtr], 1, convs)
        _stateful_convs(mimi.decoder.model, L, convs)
        for B in CONV_BATCHES:
            yield from _conv_launches(convs, B, dtype)


def _conv_launches(convs: list, B: int, dtype: torch.dtype) -> Iterator[tuple[str, list[Launch]]]:
    from engine.seanet import StreamingConv1d
    from kernels import conv_triton
    slots = torch.empty(B, device=META, dtype=torch.long)
    for layer, L_in, act in convs:
        if isinstance(layer, StreamingConv1d):
            c = layer.conv.conv
            x = torch.empty(B, c.in_channels, L_in, device=META, dtype=dtype)
            first = layer.first if layer.pad_mode == "replicate" else None
            launches, _ = conv_triton.plan_conv1d(x, c.weight, c.bias, layer.previous, slots, layer.stride,
                                                  c.dilation[0], c.groups, first, act)
            label = f"conv1d-{c.in_channels}to{c.out_channels}-k{c.kernel_size[0]}s{layer.stride}"
        else:
            c = layer.convtr.convtr
            x = torch.empty(B, c.in_channels, L_in, device=META, dtype=dtype)
            launches, _ = conv_triton.plan_conv_transpose1d(x, c.weight, c.bias, layer.partial, slots,
                                                            c.stride[0], c.groups, act)
            label = f"convtr-{c.in_channels}to{c.out_channels}-k{c.kernel_size[0]}s{c.stride[0]}g{c.groups}"
        yield f"{label}-L{L_in}-{str(dtype)[6:]}", launches


def norm_specs() -> Iterator[tuple[str, list[Launch]]]:
    from engine.config import LMConfig
    from kernels import norm_triton
    lm = LMConfig()
    B = 8
    rows = (("lm", lm.dim, True, 1), ("depth", lm.depformer_dim, True, 1), ("mimi", 512, False, 2))
    for dtype in DTYPES:
        for name, C, rms, T in rows:
            x = torch.empty(B, T, C, device=META, dtype=dtype)
            w = torch.empty(C, device=META, dtype=dtype)
            bias = None if rms else torch.empty_like(w)
            scale = None if rms else torch.empty_like(w)  # Mimi has layer scale, Moshi does not
            kind = "rms" if rms else "layer"
            yield f"{name}-{kind}{C}-{str(dtype)[6:]}", norm_triton.plan_norm(x, w, bias, 1e-5, rms)[0]
            yield (f"{name}-add+{kind}{C}-{str(dtype)[6:]}",
                   norm_triton.plan_norm(x, w, bias, 1e-5, rms, torch.empty_like(x), scale)[0])
        for name, dim, ff in (("lm", lm.dim, int(lm.hidden_scale * lm.dim)),
                              ("depth", lm.depformer_dim, lm.depformer_dim_feedforward)):
            hidden = (21 * dim) // 8 if ff == 4 * dim else (2 * ff) // 3
            h = torch.empty(B, 1, 2 * hidden, device=META, dtype=dtype)
            yield f"{name}-silu-gate{hidden}-{str(dtype)[6:]}", norm_triton.plan_silu_gate(h)[0]


def rope_specs() -> Iterator[tuple[str, list[Launch]]]:
    from kernels import rope_triton
    for name, shape in (("lm", LM), ("mimi", MIMI)):
        H, D, T = shape["heads"], shape["head_dim"], shape["T"]
        for dtype in DTYPES:
            for B in (1, 64):
                projected = torch.empty(B, T, 3, H, D, device=META, dtype=dtype)
                q, k, _ = projected.permute(2, 0, 3, 1, 4)
                cos = torch.empty(B, 1, T, D // 2, device=META)
                launches, _, _ = rope_triton.plan_rope(q, k, cos, torch.empty_like(cos))
                yield f"{name}-B{B}-{str(dtype)[6:]}", launches


def noise_specs() -> Iterator[tuple[str, list[Launch]]]:
    # The text stream (top-k 25) and the eight audio codebooks at once (top-k 250).
    from kernels import noise_triton
    seeds = torch.empty(MAX_SESSIONS, device=META, dtype=torch.long)
    for name, n, streams in (("text", 25, 1), ("audio", 250, 8)):
        yield f"{name}-k{n}x{streams}", noise_triton.plan_noise(seeds, torch.empty_like(seeds), 0, n, streams)[0]


def all_specs() -> Iterator[tuple[str, str, list[Launch]]]:
    for family, gen in (("attention", attention_specs), ("attention", paged_attention_specs), ("rvq", rvq_specs),
                        ("conv", conv_specs),
                        ("norm", norm_specs), ("rope", rope_specs), ("noise", noise_specs)):
        for label, launches in gen():
            yield family, label, launches
