"""The Moshi LM: Helium temporal transformer over text + audio streams, and the depth transformer.

Parameter names mirror kyutai's `LMModel` so its checkpoints load by name.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from engine.config import LMConfig
from engine.sampling import SamplingParams, race_noise, sample, stream_rule
from engine.norms import make_norm
from engine.transformer import Linear, StreamingTransformer


class TokenProbe(Protocol):
    """Sees each stream's logits as a step forms them and may replace the token sampled from them,
    for measuring (teacher forcing: `bench.fidelity`). Called with the stream (0 text, 1.. the
    audio codebooks), its logits [B, V] and the sampled tokens [B]; returns the tokens [B] the step
    goes on with. It runs inside the step, so one made of device ops alone is graph-capturable."""

    def __call__(self, stream: int, logits: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor: ...


class ScaledEmbedding(nn.Embedding):
    """Embedding where token -1 ("zero token") embeds to exactly zero."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens.clamp(min=0)).masked_fill_((tokens == -1)[..., None], 0)


class MoshiLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.ModuleList([ScaledEmbedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q)])
        self.text_emb = ScaledEmbedding(cfg.text_card + 1, cfg.dim)
        self.text_linear = Linear(cfg.dim, cfg.text_card, bias=False)
        self.transformer = StreamingTransformer(
            cfg.dim, cfg.num_heads, cfg.num_layers, int(cfg.hidden_scale * cfg.dim), cfg.norm, cfg.gating,
            cfg.layer_scale, cfg.context, cfg.max_period)
        self.out_norm = make_norm(cfg.norm, cfg.dim)
        n_in = cfg.dep_q if cfg.depformer_multi_linear else 1
        self.depformer_in = nn.ModuleList([Linear(cfg.dim, cfg.depformer_dim, bias=False) for _ in range(n_in)])
        self.depformer_emb = nn.ModuleList(
            [ScaledEmbedding(cfg.card + 1, cfg.depformer_dim) for _ in range(cfg.dep_q - 1)])
        self.depformer_text_emb = ScaledEmbedding(cfg.text_card + 1, cfg.depformer_dim)
        self.depformer = StreamingTransformer(
            cfg.depformer_dim, cfg.depformer_num_heads, cfg.depformer_num_layers,
            cfg.depformer_dim_feedforward, cfg.norm, cfg.depformer_gating, cfg.depformer_layer_scale,
            None, None, weights_per_step=cfg.dep_q)
        self.linears = nn.ModuleList([Linear(cfg.depformer_dim, cfg.card, bias=False) for _ in range(cfg.dep_q)])

    def init_state(self, max_sessions: int, pool=None) -> None:
        """Per-slot state; the temporal transformer's keys and values in `pool` (an
        `engine.kv.pool.KVPool`) when given, else in rings of the full context."""
        self.transformer.init_state(max_sessions, pool=pool)
        self.depformer.init_state(max_sessions)

    def reset(self, slots: torch.Tensor) -> None:
        self.transformer.reset(slots)

    def forward_text(self, tokens: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, n_q + 1] (text first) -> (transformer_out [B, 1, dim], text_logits [B, text_card])."""
        x = None
        for cb, emb in enumerate(self.emb):
            e = emb(tokens[:, cb + 1, None])
            x = e if x is None else x + e
        x = self.text_emb(tokens[:, :1]) if x is None else x + self.text_emb(tokens[:, :1])
        out = self.out_norm(self.transformer(x, slots))
        return out, self.text_linear(out)[:, 0]

    def depth_step(self, text_token: torch.Tensor, transformer_out: torch.Tensor, slots: torch.Tensor,
                   params: SamplingParams, probe: TokenProbe | None = None) -> torch.Tensor:
        """Samples the dep_q audio codebooks one after another -> [B, dep_q]; each next codebook is
        conditioned on the previous one's token (`probe`'s, when given)."""
        self.depformer.reset(slots)
        prev = text_token
        tokens = []
        noise = race_noise(params, 1, self.cfg.dep_q, self.cfg.card)
        rule = stream_rule(params, 1, self.cfg.card)
        for cb in range(self.cfg.dep_q):
            x = self.depformer_in[cb if self.cfg.depformer_multi_linear else 0](transformer_out)
            emb = self.depformer_text_emb if cb == 0 else self.depformer_emb[cb - 1]
            x = x + emb(prev[:, None])
            logits = self.linears[cb](self.depformer(x, slots, step=cb, position=cb))
            prev = sample(logits[:, 0], params, stream=cb + 1, noise=noise[:, cb], rule=rule)
            if probe is not None:
                prev = probe(cb + 1, logits[:, 0], prev)
            tokens.append(prev)
        return torch.stack(tokens, dim=1)
