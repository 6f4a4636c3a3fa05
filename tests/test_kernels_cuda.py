"""bf16 (and compiled fp32) kernel checks on a GPU: Triton's interpreter mishandles bf16 tl.dot, so
these run only compiled. Skipped without CUDA or when the suite is interpreted (conftest defaults
TRITON_INTERPRET to 1; run `TRITON_INTERPRET=0 pytest tests/test_kernels_cuda.py` on a GPU machine)."""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    reason="needs a CUDA device and compiled Triton (TRITON_INTERPRET=0)")

BF16 = dict(atol=2e-2, rtol=2e-2)
CUDA = torch.device("cuda")


@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("shape", [(2, 1, 128, 37, 37), (3, 1, 64, 8, None), (2, 2, 64, 11, 11)])
def test_attention_bf16(shape, splits):
    from kernels import attention_triton
    from kernels.attention import ring_attention
    from test_kernels_attention import _inputs
    slots, offsets, (q, k, v), ck, cv = _inputs(shape, 6, torch.bfloat16, seed=11)
    active = slots >= 0
    want = ring_attention(*(t.double()[active] for t in (q, k, v)), ck.double(), cv.double(), slots[active],
                          offsets[active], shape[4])
    dev = [t.to(CUDA) for t in (q, k, v, ck, cv, slots, offsets)]
    got = attention_triton.ring_attention(*dev, shape[4], splits)
    torch.testing.assert_close(got.cpu()[active].double(), want, **BF16)


@pytest.mark.parametrize("transposed", [False, True])
def test_conv_bf16(transposed):
    from kernels import conv
    g = torch.Generator().manual_seed(0)
    slots = torch.tensor([2, 0, -1])
    idx, active = torch.tensor([0, 1]), torch.tensor([2, 0])
    if transposed:
        w, b = torch.randn(64, 32, 8, generator=g) / 16, torch.randn(32, generator=g)
        state = torch.randn(3, 32, 4, generator=g)
    else:
        w, b = torch.randn(48, 64, 8, generator=g) / 16, torch.randn(48, generator=g)
        state = torch.randn(3, 64, 4, generator=g)
    w, b, state = (t.to(torch.bfloat16) for t in (w, b, state))
    ref_state, dev_state = state.double(), state.to(CUDA)
    for _ in range(3):
        x = torch.randn(3, 64, 8, generator=g).to(torch.bfloat16)
        if transposed:
            want = conv.conv_transpose1d_step(x.double()[idx], w.double(), b.double(), ref_state, active, 4, 1, "elu")
            got = conv.conv_transpose1d_step(x.to(CUDA), w.to(CUDA), b.to(CUDA), dev_state, slots.to(CUDA), 4, 1,
                                             "elu", backend="triton")
        else:
            want = conv.conv1d_step(x.double()[idx], w.double(), b.double(), ref_state, active, 4, 1, 1, None, "elu")
            got = conv.conv1d_step(x.to(CUDA), w.to(CUDA), b.to(CUDA), dev_state, slots.to(CUDA), 4, 1, 1, None,
                                   "elu", backend="triton")
        torch.testing.assert_close(got.cpu()[idx].double(), want, **BF16)
        ref_state = ref_state.to(torch.bfloat16).double()
        torch.testing.assert_close(dev_state.cpu().double(), ref_state, **BF16)


def test_norms_and_gate_bf16():
    from kernels import norm
    from kernels.norm import NormParams
    g = torch.Generator().manual_seed(1)
    x, u = (torch.randn(4, 2, 4096, generator=g).to(torch.bfloat16) for _ in range(2))
    for p in (NormParams(True, torch.ones(4096).to(torch.bfloat16), None, 1e-8, True),
              NormParams(False, torch.ones(4096).to(torch.bfloat16), torch.zeros(4096).to(torch.bfloat16),
                         1e-5, False)):
        pd = NormParams(p.rms, p.weight.to(CUDA), p.bias.to(CUDA) if p.bias is not None else None, p.eps, p.f32)
        x_new, y = norm.add_norm(x.to(CUDA), u.to(CUDA), None, pd, backend="triton")
        p64 = NormParams(p.rms, p.weight.double(), p.bias.double() if p.bias is not None else None, p.eps, p.f32)
        torch.testing.assert_close(x_new.cpu().double(), x.double() + u.double(), **BF16)
        torch.testing.assert_close(y.cpu().double(), norm.norm(x_new.cpu().double(), p64), **BF16)
    h = torch.randn(4, 1, 2 * 2816, generator=g).to(torch.bfloat16)
    torch.testing.assert_close(norm.silu_gate(h.to(CUDA), backend="triton").cpu().double(),
                               norm.silu_gate(h.double()), **BF16)


def test_rope_bf16():
    from kernels.rope import apply_rope, rope_tables
    g = torch.Generator().manual_seed(2)
    proj = torch.randn(4, 1, 3, 32, 128, generator=g).to(torch.bfloat16)
    q, k, _ = proj.permute(2, 0, 3, 1, 4)
    offsets = torch.tensor([0, 5, 1500, 2999])
    want = apply_rope(q.double(), k.double(), rope_tables(offsets, 1, 128, 10000.0))
    got = apply_rope(q.to(CUDA), k.to(CUDA), rope_tables(offsets.to(CUDA), 1, 128, 10000.0), backend="triton")
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu().double(), b, **BF16)


def test_noise_bit_identical():
    from kernels.noise import uniform_noise
    seeds, counters = torch.tensor([0, 2**62 + 5, -3, 77]), torch.tensor([0, 2**33 + 1, 9, 2999])
    want = uniform_noise(seeds, counters, 1, 250, 8)
    assert torch.equal(uniform_noise(seeds.to(CUDA), counters.to(CUDA), 1, 250, 8, backend="triton").cpu(), want)


@pytest.mark.parametrize("block,tiles", [(None, 2), (16, 1)])
def test_rvq_stage_hand_over_is_race_free(block, tiles):
    # Each stage's programs run concurrently and wait for the previous stage's last finisher to
    # publish the residual: a read that overtook the write would pick wrong codes now and then.
    # Planted, well-separated codes make every right answer exact; many launches give a race room.
    from kernels import rvq_triton
    from test_kernels_rvq import _table
    D, bins, n, N = 256, 2048, 8, 70
    g = torch.Generator().manual_seed(0)
    cents = torch.stack([torch.randn(bins, D, generator=g) * 4.0 ** -s for s in range(n)])
    planted = torch.randint(0, bins, (N, n), generator=g)
    x = sum(cents[s][planted[:, s]] for s in range(n))
    tables = [_table(cents[:1]).to(CUDA), _table(cents[1:]).to(CUDA)]
    xs = torch.stack([x, x - cents[0][planted[:, 0]]]).to(CUDA)
    want = torch.cat([planted[:, :1], planted[:, 1:]], 1)
    for _ in range(50):
        assert torch.equal(rvq_triton.encode(xs, tables, [1, n - 1], block, tiles).cpu(), want)


def test_rvq_compiled_codes_are_near_optimal():
    from kernels import rvq_triton
    from test_kernels_rvq import EPS, _tables
    stages = [1, 7]
    tables = _tables(stages, 2048, 256, seed=0)
    x = torch.randn(2, 37, 256, generator=torch.Generator().manual_seed(1))
    codes = rvq_triton.encode(x.to(CUDA), [t.to(CUDA) for t in tables], stages).cpu()
    col = 0
    for grp, n in enumerate(stages):
        cents, r = tables[grp][..., :256].double(), x[grp].double()
        for s in range(n):
            dist = (r[:, None, :] - cents[s][None]).pow(2).sum(-1)
            slack = EPS * (r.pow(2).sum(-1) + cents[s].pow(2).sum(-1).max())
            assert torch.all(dist.gather(1, codes[:, col + s, None])[:, 0] <= dist.min(1).values + slack)
            r = r - cents[s][codes[:, col + s]]
        col += n


@pytest.mark.parametrize("pool", ["bf16", "fp8"])
@pytest.mark.parametrize("shape", [(2, 1, 128, 16, 37), (3, 1, 64, 4, 11), (2, 2, 64, 3, 11)])
def test_paged_attention_bf16(shape, pool):
    """The LM's attention through page tables, compiled: bf16 activations over bf16 or fp8 pages,
    against the float64 torch path over the same pool, which also gives the pool's new rows (page 0,
    the scratch page that padded rows write, aside)."""
    from kernels import paged_attention_triton
    from kernels.paged_attention import FP8, dequantize, paged_attention, quantize_fp8
    from test_kernels_paged_attention import _rows, as_float64, make_cache
    slots, offsets, (q, k, v) = _rows(7, 5, shape, torch.bfloat16)
    cache = make_cache(shape, FP8 if pool == "fp8" else torch.bfloat16, seed=5)
    active = slots >= 0
    ref = as_float64(cache)  # float64 pages: the torch path writes the new rows there, unrounded
    new = ([dequantize(*quantize_fp8(x.transpose(1, 2)), torch.float64).transpose(1, 2) for x in (k, v)]
           if pool == "fp8" else [x.double() for x in (k, v)])
    want = paged_attention(q.double()[active], new[0][active], new[1][active], ref, slots[active], offsets[active],
                           shape[4])
    fields = {f: getattr(cache, f) for f in cache._fields if getattr(cache, f) is not None}
    dev = cache._replace(**{f: t.to(CUDA) for f, t in fields.items()})
    got = paged_attention_triton.paged_attention(q.to(CUDA), k.to(CUDA), v.to(CUDA), dev, slots.to(CUDA),
                                                 offsets.to(CUDA), shape[4])
    torch.testing.assert_close(got.cpu()[active].double(), want, **BF16)
    written = as_float64(dev._replace(**{f: getattr(dev, f).cpu() for f in fields}))
    for name in ("k", "v"):
        torch.testing.assert_close(getattr(written, name)[1:], getattr(ref, name)[1:], **BF16)
