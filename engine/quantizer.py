"""Mimi's split residual vector quantizer (inference only).

The module tree mirrors ``moshi.quantization.SplitResidualVectorQuantizer`` so kyutai checkpoints
load with ``strict=True``: one semantic RVQ (``rvq_first``) and one acoustic RVQ (``rvq_rest``), each
with its own 1x1 input/output projections and EMA codebooks (``embedding_sum / cluster_usage``).

Nearest-centroid search reproduces what ``torch.cdist`` does for the reference (same augmented
matmul, clamp and sqrt, then first-index argmin), so fp32 codes are bit-identical to the reference's
on the same device. Quantization math always runs in fp32, whatever the module dtype: with 2048
centroids, half-precision distances would flip many argmins.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import QuantizerConfig

_EPSILON = 1e-5
# Buffer names written by older checkpoints, mapped the way the reference maps them.
_LEGACY_NAMES = {
    "inited": "_initialized",
    "cluster_size": "cluster_usage",
    "embed_avg": "embedding_sum",
    "embed_sum": "embedding_sum",
}
# torch.cdist only takes its matmul path above this many rows on either side; below it, it sums
# squared differences directly, which rounds differently.
_CDIST_MM_THRESHOLD = 25


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


def nearest(x: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each row of fp32 `x` [N, D], ties to the lowest index.

    `aug` is a codebook's `Codebook.augmented()` matrix.
    """
    n, d = x.shape
    if n > _CDIST_MM_THRESHOLD or aug.shape[0] > _CDIST_MM_THRESHOLD:
        x1 = x[None]
        x1_sq = x1.pow(2).sum(-1, keepdim=True)
        lhs = torch.cat([x1.mul(-2), x1_sq, torch.ones_like(x1_sq)], dim=-1)
        dist = torch.matmul(lhs, aug[None].mT)
        dist.clamp_min_(0).sqrt_()
        return dist[0].argmin(dim=-1)
    return torch.cdist(x[None], aug[None, :, :d].contiguous(), p=2.0)[0].argmin(dim=-1)


class ResidualVQ(nn.Module):
    """One residual VQ with forced 1x1 projections (``ResidualVectorQuantizer`` in the reference)."""

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

    def encode(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """[B, input_dimension, T] -> [B, n, T] codes from the first `n` stages."""
        b, _, t = x.shape
        if n == 0 or t == 0:
            return torch.zeros(b, n, t, dtype=torch.long, device=x.device)
        aug = self.augmented
        d = self.dimension
        h = self.input_proj(x)
        residual = h.transpose(1, 2).reshape(b * t, d).float()
        codes = []
        for i in range(n):
            idx = nearest(residual, aug[i])
            codes.append(idx)
            if i + 1 < n:
                residual = residual - aug[i].index_select(0, idx)[:, :d]
        return torch.stack(codes, dim=1).view(b, t, n).transpose(1, 2).contiguous()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, k, T] codes (k <= n_q) -> [B, output_dimension, T] in the projection's dtype."""
        b, k, t = codes.shape
        cents = self.centroids
        q = cents[0][codes[:, 0]]
        for i in range(1, k):
            q = q + cents[i][codes[:, i]]
        w = self.output_proj.weight
        return self.output_proj(q.transpose(1, 2).to(w.dtype))


class SplitRVQ(nn.Module):
    """Semantic RVQ (first `n_q_semantic` codebooks) and acoustic RVQ (the rest) over the same input."""

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
        codes = self.rvq_first.encode(x, self.n_q_semantic)
        if n > self.n_q_semantic:
            codes = torch.cat([codes, self.rvq_rest.encode(x, n - self.n_q_semantic)], dim=1)
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, k, T] codes (1 <= k <= n_q) -> [B, output_dimension, T]."""
        k = codes.shape[1]
        if not 1 <= k <= self.n_q:
            raise ValueError(f"decode needs between 1 and {self.n_q} codebooks, got {k}")
        out = self.rvq_first.decode(codes[:, : self.n_q_semantic])
        if k > self.n_q_semantic:
            out = out + self.rvq_rest.decode(codes[:, self.n_q_semantic:])
        return out
