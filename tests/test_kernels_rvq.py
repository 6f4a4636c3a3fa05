"""Triton RVQ (interpreted on CPU): near-optimal codes against float64 distances, exact decode."""
import pytest
import torch

pytest.importorskip("triton")
from engine.config import QuantizerConfig  # noqa: E402
from engine.quantizer import SplitRVQ  # noqa: E402
from kernels import rvq, rvq_triton  # noqa: E402
from kernels.dispatch import apply_backend  # noqa: E402
from kernels.launch import KernelError  # noqa: E402

EPS = 1e-5  # relative to |r|^2 + max |c|^2: fp32 rounding of the D-term dot products


def _table(centroids: torch.Tensor) -> torch.Tensor:
    c = centroids.float()
    sq = c.pow(2).sum(-1, keepdim=True)
    return torch.cat([c, torch.ones_like(sq), sq], -1).contiguous()


def _tables(stages, bins, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [_table(torch.randn(n + 1, bins, D, generator=g)) for n in stages]


# (codes per tile, tiles per slice): the default, and slices of one or three small tiles, so that
# a stage is scored by many programs (up to 9 here) whose bests are reduced across slices.
SLICINGS = [(None, rvq_triton.TILES_PER_SLICE), (16, 1), (16, 3)]


@pytest.mark.parametrize("block,tiles", SLICINGS)
@pytest.mark.parametrize("D,bins", [(16, 37), (24, 64), (32, 130)])
@pytest.mark.parametrize("N", [1, 5, 33])
@pytest.mark.parametrize("stages", [[3], [1, 4], [4, 2]])
def test_codes_are_nearest_up_to_rounding(D, bins, N, stages, block, tiles):
    tables = _tables(stages, bins, D, seed=N + D)
    x = torch.randn(len(stages), N, D, generator=torch.Generator().manual_seed(bins)) * 2
    codes = rvq_triton.encode(x, tables, stages, block, tiles)
    assert codes.shape == (N, sum(stages)) and codes.dtype == torch.long
    col = 0
    for g, n in enumerate(stages):
        cents = tables[g][..., :D].double()
        r = x[g].double()
        for s in range(n):
            dist = (r[:, None, :] - cents[s][None]).pow(2).sum(-1)  # [N, bins], float64
            chosen = dist.gather(1, codes[:, col + s, None])[:, 0]
            slack = EPS * (r.pow(2).sum(-1) + cents[s].pow(2).sum(-1).max())
            assert torch.all(chosen <= dist.min(1).values + slack), (g, s)
            r = r - cents[s][codes[:, col + s]]
        col += n


@pytest.mark.parametrize("block,tiles", SLICINGS)
def test_planted_codes_are_recovered_exactly(block, tiles):
    # Well-separated codebooks (each stage 10x smaller than the last) and x = sum of planted
    # centroids + noise: every stage's nearest centroid is the planted one, so the residual
    # update must be right for later stages to come out right.
    D, bins, n, N = 16, 50, 4, 21
    g = torch.Generator().manual_seed(0)
    cents = torch.stack([torch.randn(bins, D, generator=g) * 10.0 ** -s for s in range(n)])
    planted = torch.randint(0, bins, (N, n), generator=g)
    x = sum(cents[s][planted[:, s]] for s in range(n)) + 1e-5 * torch.randn(N, D, generator=g)
    got = rvq_triton.encode(x[None], [_table(cents)], [n], block, tiles)
    assert torch.equal(got, planted)


@pytest.mark.parametrize("block,tiles", SLICINGS)
def test_ties_go_to_the_lowest_index_within_and_across_tiles_and_slices(block, tiles):
    D, bins = 16, 150
    # Indices 2, 9 share a tile; 90 and 140 sit in other tiles (and, but for the default's two
    # slices of 128, in other slices) than 2 and than each other.
    assert (block or rvq_triton.block_k(D)) < 100
    cents = torch.randn(bins, D, generator=torch.Generator().manual_seed(1)) * 5
    for low, high in ((2, 9), (2, 140), (90, 140), (140, 2)):
        c = cents.clone()
        c[high] = c[low]
        x = (c[low] + 0.01).view(1, 1, D)
        assert rvq_triton.encode(x, [_table(c[None])], [1], block, tiles).item() == min(low, high)


def test_launch_spreads_each_stage_over_slices():
    # Mimi at 32 sessions: 32 rows, 2048 codes, 1 + 7 stages. One program per (stage, row block,
    # slice), so a stage of a row block is scored on 32 SMs instead of one.
    tables = [torch.empty(1, 2048, 258, device="meta"), torch.empty(31, 2048, 258, device="meta")]
    (launch,), _ = rvq_triton.plan_encode(torch.empty(2, 32, 256, device="meta"), tables, [1, 7])
    assert launch.consts["SLICES"] == 32 and launch.consts["BLOCK_K"] * launch.consts["TILES"] == 64
    assert launch.grid == (8 * 2 * 32,)


@pytest.mark.parametrize("stages", [[1], [1, 6], [2, 0]])
def test_decode_matches_torch_path_exactly(stages):
    D, bins, N = 24, 40, 19
    tables = _tables(stages, bins, D, seed=5)
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, bins, (N, sum(stages)), generator=g)
    got = rvq_triton.decode(codes, tables, stages)
    want = rvq.decode(codes, tables, stages, backend="torch")
    assert got.shape == (len(stages), N, D)
    assert torch.equal(got, want)  # same fp32 additions in the same order


def test_split_rvq_module_agrees_between_backends():
    cfg = QuantizerConfig(dimension=16, n_q=6, bins=48, input_dimension=20, output_dimension=20)
    q = SplitRVQ(cfg)
    gen = torch.Generator().manual_seed(3)
    for name, buf in q.named_buffers():
        if name.endswith("embedding_sum"):
            buf.normal_(generator=gen)
    for p in q.parameters():
        p.data.normal_(0, 0.3, generator=gen)
    q.set_num_codebooks(4)
    x = torch.randn(3, 20, 2, generator=gen)
    want_codes, want_pcm = q.encode(x), q.decode(q.encode(x))
    applied = apply_backend(q, "triton")
    assert set(applied.values()) == {"triton"}
    got_codes = q.encode(x)
    assert torch.equal(got_codes, want_codes)
    torch.testing.assert_close(q.decode(got_codes), want_pcm, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bad", ["dtype", "table_shape", "stages", "codes_dtype", "block"])
def test_preconditions(bad):
    tables = _tables([2], 20, 16, seed=0)
    x = torch.randn(1, 4, 16)
    with pytest.raises(KernelError):
        if bad == "dtype":
            rvq_triton.encode(x.half(), tables, [2])
        elif bad == "table_shape":
            rvq_triton.encode(x, [tables[0][..., :-1].contiguous()], [2])
        elif bad == "stages":
            rvq_triton.encode(x, tables, [5])
        elif bad == "block":
            rvq_triton.encode(x, tables, [2], block=24)
        else:
            rvq_triton.decode(torch.zeros(4, 2, dtype=torch.int32), tables, [2])
