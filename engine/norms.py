"""The norms of the streaming transformers (kyutai's names and eps), running through `kernels.norm`."""
from __future__ import annotations

import torch
from torch import nn

from kernels import norm as norm_kernels


class _Norm:
    """Mixin: forward and the fused residual-add + norm go through `kernels.norm`; each subclass
    describes itself as `params` (a NormParams)."""

    kernel_backend = "torch"  # set by kernels.dispatch.apply_backend
    params: norm_kernels.NormParams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_kernels.norm(x, self.params, self.kernel_backend)

    def add_forward(self, x: torch.Tensor, update: torch.Tensor,
                    scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + scale * update, this norm of it)."""
        return norm_kernels.add_norm(x, update, scale, self.params, self.kernel_backend)


class RMSNorm(_Norm, nn.Module):
    def __init__(self, dim: int, eps: float, compute_dtype: torch.dtype | None):
        super().__init__()
        self.eps = eps
        self.compute_dtype = compute_dtype
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    @property
    def params(self) -> norm_kernels.NormParams:
        return norm_kernels.NormParams(True, self.alpha, None, self.eps, self.compute_dtype is not None)


class LayerNorm(_Norm, nn.LayerNorm):
    @property
    def params(self) -> norm_kernels.NormParams:
        return norm_kernels.NormParams(False, self.weight, self.bias, self.eps, False)


class LayerNormF32(_Norm, nn.LayerNorm):
    @property
    def params(self) -> norm_kernels.NormParams:
        return norm_kernels.NormParams(False, self.weight, self.bias, self.eps, True)


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layer_norm":
        return LayerNorm(dim, eps=1e-5)
    if kind == "layer_norm_f32":
        return LayerNormF32(dim, eps=1e-8)
    if kind == "rms_norm":
        return RMSNorm(dim, 1e-5, None)
    if kind == "rms_norm_f32":
        return RMSNorm(dim, 1e-8, torch.float32)
    raise ValueError(f"unknown norm {kind!r}")
