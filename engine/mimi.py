"""Mimi, streaming and slot-batched: SEANet + transformer + 25->12.5 Hz resampling + split RVQ.

One `encode_step` turns one 80 ms frame of audio per slot into codes, one `decode_step` turns one
frame of codes back into audio. Parameter names mirror kyutai's `MimiModel`.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.config import MimiConfig
from engine.quantizer import SplitRVQ
from engine.seanet import ConvDownsample, ConvTrUpsample, SeanetDecoder, SeanetEncoder
from engine.transformer import StreamingTransformer


class ProjectedTransformer(nn.Module):
    """Mimi's transformer over [B, C, T] latents (input/output dims equal d_model in Mimi)."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        t = cfg.transformer
        self.transformer = StreamingTransformer(
            t.d_model, t.num_heads, t.num_layers, t.dim_feedforward, t.norm, t.gating, t.layer_scale,
            t.context, t.max_period)

    def forward(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self.transformer(x.transpose(1, 2), slots).transpose(1, 2)


class Mimi(nn.Module):
    def __init__(self, cfg: MimiConfig, num_codebooks: int = 8):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = SeanetEncoder(cfg.seanet)
        self.decoder = SeanetDecoder(cfg.seanet)
        self.encoder_transformer = ProjectedTransformer(cfg)
        self.decoder_transformer = ProjectedTransformer(cfg)
        self.quantizer = SplitRVQ(cfg.quantizer)
        self.downsample = ConvDownsample(cfg.resample_stride, cfg.seanet.dimension)
        self.upsample = ConvTrUpsample(cfg.resample_stride, cfg.seanet.dimension)
        self.set_num_codebooks(num_codebooks)

    @property
    def frame_size(self) -> int:
        return self.cfg.frame_size

    def set_num_codebooks(self, n: int) -> None:
        q = self.cfg.quantizer
        if not q.n_q_semantic <= n <= q.n_q:
            raise ValueError(f"Mimi supports {q.n_q_semantic}..{q.n_q} codebooks, asked for {n}")
        self.quantizer.set_num_codebooks(n)

    def init_state(self, max_sessions: int) -> None:
        for m in (self.encoder, self.decoder, self.downsample, self.upsample):
            m.init_state(max_sessions)
        self.encoder_transformer.transformer.init_state(max_sessions)
        self.decoder_transformer.transformer.init_state(max_sessions)

    def reset(self, slots: torch.Tensor) -> None:
        for m in (self.encoder, self.decoder, self.downsample, self.upsample):
            m.reset(slots)
        self.encoder_transformer.transformer.reset(slots)
        self.decoder_transformer.transformer.reset(slots)

    @torch.no_grad()
    def encode_step(self, pcm: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """pcm [B, 1, frame_size] -> codes [B, num_codebooks] for one frame."""
        emb = self.encoder.step(pcm, slots)
        emb = self.encoder_transformer(emb, slots)
        emb = self.downsample.step(emb, slots)
        return self.quantizer.encode(emb)[:, :, 0]

    @torch.no_grad()
    def decode_step(self, codes: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """codes [B, num_codebooks] -> pcm [B, 1, frame_size] for one frame."""
        emb = self.quantizer.decode(codes[:, :, None])
        emb = self.upsample.step(emb, slots)
        emb = self.decoder_transformer(emb, slots)
        return self.decoder.step(emb, slots)
