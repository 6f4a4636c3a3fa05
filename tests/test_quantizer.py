"""Split RVQ against the reference `moshi` package (random codebooks, fp32 CPU)."""
import pytest
import torch

from moshi.quantization import SplitResidualVectorQuantizer

from engine.config import QuantizerConfig
from engine.quantizer import SplitRVQ

MIMI = QuantizerConfig()
# Few bins and few rows: torch.cdist takes its direct (non-matmul) path here.
TINY = QuantizerConfig(dimension=6, n_q=4, bins=16, input_dimension=10, output_dimension=7, n_q_semantic=2)


def _reference(cfg: QuantizerConfig, seed: int = 0, duplicates: bool = False):
    torch.manual_seed(seed)
    ref = SplitResidualVectorQuantizer(
        dimension=cfg.dimension, n_q=cfg.n_q, bins=cfg.bins, input_dimension=cfg.input_dimension,
        output_dimension=cfg.output_dimension, n_q_semantic=cfg.n_q_semantic).eval()
    for p in ref.parameters():
        p.data.normal_(0, 2 * cfg.input_dimension ** -0.5)
    for cb in (m for m in ref.modules() if hasattr(m, "embedding_sum")):
        usage = torch.empty(cfg.bins).uniform_(0.5, 3.0)
        usage[:3] = 1e-7  # below the reference's 1e-5 clamp
        centroids = torch.randn(cfg.bins, cfg.dimension)
        if duplicates:
            # Exact ties between centroids: the first index must win, as in the reference.
            usage[1::2] = usage[0::2]
            centroids[1::2] = centroids[0::2]
        cb.cluster_usage.copy_(usage)
        cb.embedding_sum.copy_(centroids * usage.clamp(min=1e-5)[:, None])
    return ref


def _pair(cfg: QuantizerConfig, **kw):
    ref = _reference(cfg, **kw)
    mine = SplitRVQ(cfg).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    return ref, mine


@pytest.mark.parametrize("cfg,n", [(MIMI, 32), (MIMI, 8), (TINY, 4), (TINY, 2), (TINY, 3)])
def test_codes_match_reference(cfg, n):
    ref, mine = _pair(cfg)
    ref.set_num_codebooks(n)
    mine.set_num_codebooks(n)
    x = torch.randn(3, cfg.input_dimension, 9 if cfg is MIMI else 3)
    codes = mine.encode(x)
    expected = ref.encode(x)
    assert codes.dtype == torch.long and codes.shape == (3, n, x.shape[-1])
    assert torch.equal(codes, expected)
    assert torch.allclose(mine.decode(codes), ref.decode(expected), rtol=1e-5, atol=1e-5)


def test_ties_pick_first_index_like_reference():
    ref, mine = _pair(TINY, duplicates=True)
    x = torch.randn(2, TINY.input_dimension, 40)  # 80 rows: the matmul path
    codes = mine.encode(x)
    assert torch.equal(codes, ref.encode(x))
    assert (codes % 2 == 0).all()
    small = x[:, :, :5]  # 10 rows: the direct path
    assert torch.equal(mine.encode(small), ref.encode(small))


def test_state_dict_keys_match_reference():
    ref, mine = _pair(TINY)
    assert list(mine.state_dict()) == list(ref.state_dict())
    keys = set(mine.state_dict())
    for part, n in (("rvq_first", 2), ("rvq_rest", 2)):
        assert f"{part}.input_proj.weight" in keys and f"{part}.output_proj.weight" in keys
        for i in range(n):
            for buf in ("_initialized", "cluster_usage", "embedding_sum"):
                assert f"{part}.vq.layers.{i}._codebook.{buf}" in keys
    assert "rvq_rest.vq.layers.2._codebook.embedding_sum" not in keys


def test_strict_load_rejects_missing_key():
    ref = _reference(TINY)
    sd = ref.state_dict()
    sd.pop("rvq_rest.vq.layers.1._codebook.cluster_usage")
    with pytest.raises(RuntimeError, match="Missing key"):
        SplitRVQ(TINY).load_state_dict(sd, strict=True)


def test_legacy_buffer_names_load():
    ref = _reference(TINY, seed=4)
    renames = {"_initialized": "inited", "cluster_usage": "cluster_size", "embedding_sum": "embed_avg"}
    sd = {}
    for key, value in ref.state_dict().items():
        head, _, leaf = key.rpartition(".")
        sd[f"{head}.{renames.get(leaf, leaf)}" if "_codebook" in key else key] = value
    mine = SplitRVQ(TINY)
    mine.load_state_dict(sd, strict=True)
    x = torch.randn(2, TINY.input_dimension, 6)
    assert torch.equal(mine.encode(x), ref.encode(x))


def test_reload_and_move_refresh_centroids():
    ref_a, mine = _pair(TINY)
    x = torch.randn(2, TINY.input_dimension, 20)
    assert torch.equal(mine.encode(x), ref_a.encode(x))
    ref_b = _reference(TINY, seed=7)
    mine.load_state_dict(ref_b.state_dict(), strict=True)
    assert torch.equal(mine.encode(x), ref_b.encode(x))
    mine.prepare()
    assert mine.rvq_rest.centroids.shape == (2, TINY.bins, TINY.dimension)
    expected = ref_b.rvq_rest.vq.layers[1]._codebook.embedding
    assert torch.equal(mine.rvq_rest.centroids[1], expected)
    assert torch.allclose(mine.rvq_rest.sq_norms[1], expected.pow(2).sum(-1))
    mine.to(torch.float64)  # any _apply must drop the cache, recomputed on next use
    assert mine.rvq_first._aug is None
    assert mine.encode(x.double()).shape == (2, TINY.n_q, 20)
    assert mine.rvq_first.augmented.dtype == torch.float32
    mine.float()
    assert torch.equal(mine.encode(x), ref_b.encode(x))


def test_set_num_codebooks_bounds():
    mine = SplitRVQ(TINY)
    assert mine.num_codebooks == TINY.n_q
    with pytest.raises(ValueError):
        mine.set_num_codebooks(1)
    with pytest.raises(ValueError):
        mine.set_num_codebooks(5)
    mine.set_num_codebooks(2)
    assert mine.encode(torch.randn(1, TINY.input_dimension, 3)).shape == (1, 2, 3)
    assert mine.encode(torch.randn(1, TINY.input_dimension, 0)).shape == (1, 2, 0)


def test_bfloat16_module_encodes_in_fp32():
    ref, mine = _pair(TINY)
    mine.to(torch.bfloat16)
    x = torch.randn(2, TINY.input_dimension, 5)
    codes = mine.encode(x.to(torch.bfloat16))
    assert codes.dtype == torch.long and codes.shape == (2, TINY.n_q, 5)
    assert mine.rvq_first.augmented.dtype == torch.float32
    out = mine.decode(codes)
    assert out.dtype == torch.bfloat16 and out.shape == (2, TINY.output_dimension, 5)
