"""Slot-batched streaming transformer shared by Mimi and the Moshi LM.

The module tree mirrors kyutai's `StreamingTransformer` so checkpoints load by name. Streaming
state is one position counter per slot and the keys and values: a ring per slot and layer
([max_sessions, heads, capacity, dim]: Mimi's, the depth transformer's), or pages of a shared pool
reached through each slot's page table (`engine.kv.pool`: the LM's). A step runs a chosen set of
slots; other slots are untouched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.norms import make_norm
from kernels import attention as attn_kernels
from kernels import linear as linear_kernels
from kernels import norm as norm_kernels
from kernels import paged_attention as paged_kernels
from kernels import rope as rope_kernels


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class Linear(nn.Linear):
    """nn.Linear whose product runs on a prepacked weight where `kernels.linear.prepack` made one."""

    packed: linear_kernels.Packed | None = None

    def gemm_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_kernels.linear(x, self.weight, self.bias, self.packed)


_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "elu": F.elu, "sigmoid": torch.sigmoid,
                "tanh": torch.tanh}


class ActivationGating(nn.Module):
    kernel_backend = "torch"  # set by kernels.dispatch.apply_backend

    def __init__(self, dim: int, dim_feedforward: int, activation: str):
        super().__init__()
        # kyutai's sizing rule for the gated hidden width, needed to match checkpoint shapes.
        hidden = (21 * dim) // 8 if dim_feedforward == 4 * dim else (2 * dim_feedforward) // 3
        self.linear_in = Linear(dim, 2 * hidden, bias=False)
        self.linear_out = Linear(hidden, dim, bias=False)
        self.activation = _ACTIVATIONS[activation]

    def triton_supported(self) -> bool:
        return self.activation is F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_in(x)
        if self.activation is F.silu:
            gated = norm_kernels.silu_gate(h, self.kernel_backend)
        else:
            B, T, _ = h.shape
            h = h.view(B, T, 2, -1)
            gated = self.activation(h[..., 0, :]) * h[..., 1, :]
        return self.linear_out(gated)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_weights: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_projs = nn.ModuleList([Linear(dim, 3 * dim, bias=False) for _ in range(num_weights)])
        self.out_projs = nn.ModuleList([Linear(dim, dim, bias=False) for _ in range(num_weights)])

    def qkv(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        projected = self.in_projs[step](x).view(B, T, 3, self.num_heads, C // self.num_heads)
        q, k, v = projected.permute(2, 0, 3, 1, 4)
        return q, k, v


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, dim_feedforward: int, norm: str, gating: str,
                 layer_scale: float | None, num_weights: int):
        super().__init__()
        self.self_attn = Attention(dim, num_heads, num_weights)
        self.norm1 = make_norm(norm, dim)
        self.norm2 = make_norm(norm, dim)
        if gating == "none":
            self.linear1 = Linear(dim, dim_feedforward, bias=False)
            self.linear2 = Linear(dim_feedforward, dim, bias=False)
            self.gating = None
        elif num_weights > 1:
            self.gating = nn.ModuleList([ActivationGating(dim, dim_feedforward, gating) for _ in range(num_weights)])
        else:
            self.gating = ActivationGating(dim, dim_feedforward, gating)
        if layer_scale is None:
            self.layer_scale_1, self.layer_scale_2 = nn.Identity(), nn.Identity()
        else:
            self.layer_scale_1, self.layer_scale_2 = LayerScale(dim, layer_scale), LayerScale(dim, layer_scale)

    def ffn(self, h: torch.Tensor, step: int) -> torch.Tensor:
        """The feed-forward update for the normed input h."""
        if self.gating is None:
            return self.linear2(F.gelu(self.linear1(h)))
        if isinstance(self.gating, nn.ModuleList):
            return self.gating[step](h)
        return self.gating(h)

    @staticmethod
    def residual(x: torch.Tensor, update: torch.Tensor, layer_scale: nn.Module,
                 norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x + layer_scale(update), `norm` of it or None): fused when `norm` runs on Triton."""
        if norm is None:
            return x.to(update) + layer_scale(update), None
        scale = layer_scale.scale if isinstance(layer_scale, LayerScale) else None
        return norm.add_forward(x, update, scale)


class StreamingTransformer(nn.Module):
    """Causal transformer over a per-slot ring KV cache of `capacity` positions, or a KV pool.

    With `weights_per_step` > 0 (Moshi's depth transformer), step i of a frame uses weight set i and
    the cache holds one frame's steps; `reset` before each frame starts it afresh.
    """

    kernel_backend = "torch"  # set by kernels.dispatch.apply_backend
    # Attend over every ring entry on the torch path, not only those the batch's longest history
    # has written (whose count, and so the rounding, depends on the neighbours): batch-invariant mode.
    whole_ring = False
    # The whole step as one C call on CPU (`kernels.stack_cpu.StackKernel`), set by `kernels.stack_cpu.attach`.
    cpu_stack = None
    pool = None  # the KVPool its keys and values live in, when `init_state` was given one

    def __init__(self, dim: int, num_heads: int, num_layers: int, dim_feedforward: int, norm: str,
                 gating: str, layer_scale: float | None, context: int | None, rope_max_period: float | None,
                 weights_per_step: int = 0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.context = context
        self.capacity = context if context is not None else weights_per_step
        self.rope_max_period = rope_max_period
        self.weights_per_step = weights_per_step
        self.layers = nn.ModuleList([
            TransformerLayer(dim, num_heads, dim_feedforward, norm, gating, layer_scale, max(1, weights_per_step))
            for _ in range(num_layers)])
        self.max_sessions = 0

    def init_state(self, max_sessions: int, dtype: torch.dtype | None = None, pool=None) -> None:
        """Rings of `capacity` positions per slot, or (`pool`, an `engine.kv.pool.KVPool` sized for
        this transformer and `max_sessions` slots) pages of the pool."""
        p = next(self.parameters())
        dtype = dtype or p.dtype
        self.pool = pool
        if pool is None:
            shape = (len(self.layers), max_sessions, self.num_heads, self.capacity, self.head_dim)
            self.register_buffer("k_cache", torch.zeros(shape, device=p.device, dtype=dtype), persistent=False)
            self.register_buffer("v_cache", torch.zeros(shape, device=p.device, dtype=dtype), persistent=False)
        self.register_buffer("offsets", torch.zeros(max_sessions, device=p.device, dtype=torch.long),
                             persistent=False)
        self.max_sessions = max_sessions

    def kv_bytes(self, positions: int, dtype: torch.dtype | None = None) -> int:
        """Bytes of one slot's keys and values over `positions` entries (in `dtype`, default the
        cache's or pool's, or before `init_state` the weights'; fp8 with its scales)."""
        if dtype is None:
            dtype = (self.pool.dtype if self.pool is not None else self.k_cache.dtype if self.max_sessions
                     else next(self.parameters()).dtype)
        scales = 4 if dtype == paged_kernels.FP8 else 0
        return 2 * len(self.layers) * self.num_heads * (self.head_dim * dtype.itemsize + scales) * positions

    def reset(self, slots: torch.Tensor) -> None:
        # Positions at or past a slot's offset are masked out, so zeroing the counter is a full reset.
        self.offsets.index_fill_(0, slots, 0)

    def forward(self, x: torch.Tensor, slots: torch.Tensor, step: int = 0,
                position: int | None = None) -> torch.Tensor:
        """x: [B, T, dim] for the slots `slots` ([B]); returns [B, T, dim] and advances them by T.
        `position`: every slot's offset, when the caller knows it is the same for all (the depth
        transformer, restarted each frame, is at its step), sparing the per-slot ring bookkeeping."""
        if self.cpu_stack is not None and self.cpu_stack.runs(x):
            return self.cpu_stack(x, slots, step)
        B, T, _ = x.shape
        dtype_in = x.dtype
        offsets = self.offsets.index_select(0, slots)
        # Each residual add is followed by the next norm (norm2, then the next layer's norm1), so
        # the two are computed together; h is always the normed input of the next sub-layer.
        h = self.layers[0].norm1(x)
        plan, pool = None, self.pool
        if self.kernel_backend == "torch" and pool is not None:
            plan = paged_kernels.paged_plan(offsets, T, self.context, pool.layers[0], slots, trim=not self.whole_ring)
        elif self.kernel_backend == "torch":
            plan = (attn_kernels.ring_plan_at(position, T, self.capacity, slots)
                    if position is not None and self.context is None
                    else attn_kernels.ring_plan(offsets, T, self.capacity, self.context, slots,
                                                trim=not self.whole_ring))
        rope = (rope_kernels.rope_tables(offsets, T, self.head_dim, self.rope_max_period, self.kernel_backend)
                if self.rope_max_period is not None else None)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.self_attn.qkv(h, step)
            if rope is not None:
                q, k = rope_kernels.apply_rope(q, k, rope, self.kernel_backend)
            if pool is not None:
                out = paged_kernels.paged_attention(q, k, v, pool.layers[i], slots, offsets, self.context,
                                                    self.kernel_backend, plan)
            else:
                out = attn_kernels.ring_attention(q, k, v, self.k_cache[i], self.v_cache[i], slots, offsets,
                                                  self.context, self.kernel_backend, plan)
            out = out.transpose(1, 2).reshape(B, T, -1)
            update = layer.self_attn.out_projs[step](out)
            x, h = layer.residual(x, update, layer.layer_scale_1, layer.norm2)
            update = layer.ffn(h, step)
            nxt = self.layers[i + 1].norm1 if i + 1 < len(self.layers) else None
            x, h = layer.residual(x, update, layer.layer_scale_2, nxt)
        self.offsets.index_copy_(0, slots, offsets + T)
        return x.to(dtype_in)
