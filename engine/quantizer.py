"""Mimi's split residual vector quantizer (inference only).

The module tree mirrors ``moshi.quantization.SplitResidualVectorQuantizer`` so kyutai checkpoints
load with ``strict=True``: one semantic RVQ (``rvq_first``) and one acoustic RVQ (``rvq_rest``), each
with its own 1x1 input/output projections and EMA codebooks (``embedding_sum / cluster_usage``).

Nearest-centroid search reproduces what ``torch.cdist`` does for the reference (same augmented
matmul, clamp and sqrt, then first-index argmin), so fp32 codes are bit-identical to the reference's
on the same device (the torch kernel backend; the Triton one searches with |c|^2 - 2 x.c and can
differ only on fp32-rounding ties). Quantization math always runs in fp32, whatever the module
dtype: with 2048 centroids, half-precision distances would flip many argmins.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import rvq as rvq_kernels
from kernels.rvq import nearest  # noqa: F401  (re-exported: the engine's exact fp32 search)

from .config import QuantizerConfig

_EPSILON = 1e-5
# Buffer names written by older checkpoints, mapped the way the reference maps them.
_LEGACY_NAMES = {
    "inited": "_initialized",
    "cluster_size": "cluster_usage",
    "embed_avg": "embedding_sum",
    "embed_sum": "embedding_sum",
}


class Codebook(nn.Module):
    """EMA codebook buffers; the centroids are their ratio."""

    def __init__(self, dim: int, bins: int):
        super().__init__()
        self.dim = dim
        self.bins = bins
        self.register_buffer("_initialized", torch.tensor([False], dtype=torch.float))
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for old, new in _LEGACY_NAMES.items():
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def augmented(self) -> torch.Tensor:
        """[bins, dim + 2] fp32 rows ``[c, 1, |c|^2]``: the right operand of cdist's matmul."""
        usage = self.cluster_usage.float().clamp(min=_EPSILON)
        c = self.embedding_sum.float() / usage[:, None]
        sq = c.pow(2).sum(-1, keepdim=True)
        return torch.cat([c, torch.ones_like(sq), sq], dim=-1)


class _VectorQuantization(nn.Module):
    def __init__(self, dim: int, bins: int):
        super().__init__()
        self._codebook = Codebook(dim, bins)


class _ResidualStack(nn.Module):
    def __init__(self, n_q: int, dim: int, bins: int):
        super().__init__()
        self.layers = nn.ModuleList([_VectorQuantization(dim, bins) for _ in range(n_q)])


def _forget_cache(module: "ResidualVQ", _incompatible_keys) -> None:
    module.forget()


class ResidualVQ(nn.Module):
    """One residual VQ with forced 1x1 projections (``ResidualVectorQuantizer`` in the reference)."""

    kernel_backend = "torch"  # set by kernels.dispatch.apply_backend

    def __init__(self, n_q: int, dimension: int, bins: int, input_dimension: int, output_dimension: int):
        super().__init__()
        self.n_q = n_q
        self.dimension = dimension
        self.bins = bins
        self.input_proj = nn.Conv1d(input_dimension, dimension, 1, bias=False)
        self.output_proj = nn.Conv1d(dimension, output_dimension, 1, bias=False)
        self.vq = _ResidualStack(n_q, dimension, bins)
        self._aug: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(_forget_cache)

    def forget(self) -> None:
        """Drops the derived centroids; the next use recomputes them from the buffers."""
        self._aug = None

    def _apply(self, fn, recurse: bool = True):
        # Moving or casting the buffers invalidates centroids derived from them.
        self.forget()
        return super()._apply(fn, recurse)

    def prepare(self) -> None:
        with torch.no_grad():
            rows = [layer._codebook.augmented() for layer in self.vq.layers]
            self._aug = torch.stack(rows).contiguous()

    @property
    def augmented(self) -> torch.Tensor:
        """[n_q, bins, dimension + 2] fp32, rows ``[c, 1, |c|^2]``, computed once per load/move."""
        if self._aug is None:
            self.prepare()
        return self._aug

    @property
    def centroids(self) -> torch.Tensor:
        """[n_q, bins, dimension] fp32 view (row stride dimension + 2)."""
        return self.augmented[..., : self.dimension]

    @property
    def sq_norms(self) -> torch.Tensor:
        """[n_q, bins] fp32 squared centroid norms (a strided view)."""
        return self.augmented[..., self.dimension + 1]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """[B, input_dimension, T] -> fp32 residual rows [B * T, dimension]."""
        b, _, t = x.shape
        return self.input_proj(x).transpose(1, 2).reshape(b * t, self.dimension).float()

    def encode(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """[B, input_dimension, T] -> [B, n, T] codes from the first `n` stages."""
        b, _, t = x.shape
        if n == 0 or t == 0:
            return torch.zeros(b, n, t, dtype=torch.long, device=x.device)
        codes = rvq_kernels.encode(self.project(x)[None], [self.augmented], [n], self.kernel_backend)
        return codes.view(b, t, n).transpose(1, 2).contiguous()

    def project_out(self, q: torch.Tensor, b: int, t: int) -> torch.Tensor:
        """Summed centroids [B * T, dimension] fp32 -> [B, output_dimension, T]."""
        w = self.output_proj.weight
        return self.output_proj(q.view(b, t, -1).transpose(1, 2).to(w.dtype))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, k, T] codes (k <= n_q) -> [B, output_dimension, T] in the projection's dtype."""
        b, k, t = codes.shape
        flat = codes.transpose(1, 2).reshape(b * t, k)
        q = rvq_kernels.decode(flat, [self.augmented], [k], self.kernel_backend)[0]
        return self.project_out(q, b, t)


class SplitRVQ(nn.Module):
    """Semantic RVQ (first `n_q_semantic` codebooks) and acoustic RVQ (the rest) over the same input.

    Both RVQs are encoded (and decoded) by one call of the `kernels.rvq` family."""

    kernel_backend = "torch"  # set by kernels.dispatch.apply_backend

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.n_q = cfg.n_q
        self.n_q_semantic = cfg.n_q_semantic
        self.bins = cfg.bins
        self.dimension = cfg.dimension
        self.rvq_first = ResidualVQ(cfg.n_q_semantic, cfg.dimension, cfg.bins,
                                    cfg.input_dimension, cfg.output_dimension)
        self.rvq_rest = ResidualVQ(cfg.n_q - cfg.n_q_semantic, cfg.dimension, cfg.bins,
                                   cfg.input_dimension, cfg.output_dimension)
        self._num_codebooks = cfg.n_q

    @property
    def num_codebooks(self) -> int:
        return self._num_codebooks

    @property
    def total_codebooks(self) -> int:
        return self.n_q

    def set_num_codebooks(self, n: int) -> None:
        if not self.n_q_semantic <= n <= self.n_q:
            raise ValueError(f"num_codebooks must be in [{self.n_q_semantic}, {self.n_q}], got {n}")
        self._num_codebooks = n

    def prepare(self) -> None:
        """Precomputes fp32 centroids and their squared norms (otherwise done on first use)."""
        self.rvq_first.prepare()
        self.rvq_rest.prepare()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, input_dimension, T] -> LongTensor [B, num_codebooks, T]."""
        n = self._num_codebooks
        b, _, t = x.shape
        if t == 0:
            return torch.zeros(b, n, 0, dtype=torch.long, device=x.device)
        rvqs = [self.rvq_first] + ([self.rvq_rest] if n > self.n_q_semantic else [])
        stages = [self.n_q_semantic, n - self.n_q_semantic][: len(rvqs)]
        residuals = torch.stack([r.project(x) for r in rvqs])
        codes = rvq_kernels.encode(residuals, [r.augmented for r in rvqs], stages, self.kernel_backend)
        return codes.view(b, t, n).transpose(1, 2).contiguous()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, k, T] codes (1 <= k <= n_q) -> [B, output_dimension, T]."""
        b, k, t = codes.shape
        if not 1 <= k <= self.n_q:
            raise ValueError(f"decode needs between 1 and {self.n_q} codebooks, got {k}")
        rvqs = [self.rvq_first] + ([self.rvq_rest] if k > self.n_q_semantic else [])
        stages = [min(k, self.n_q_semantic), k - self.n_q_semantic][: len(rvqs)]
        flat = codes.transpose(1, 2).reshape(b * t, k)
        sums = rvq_kernels.decode(flat, [r.augmented for r in rvqs], stages, self.kernel_backend)
        out = self.rvq_first.project_out(sums[0], b, t)
        if len(rvqs) > 1:
            out = out + self.rvq_rest.project_out(sums[1], b, t)
        return out
