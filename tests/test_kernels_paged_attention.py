"""Paged attention: the torch path against a per-query float64 loop and, bit for bit, against the
ring it replaces; the Triton kernel (interpreted on CPU) against the torch path in float64, in
fp32/fp16/fp8 pools, at odd page counts and partial last pages."""
import math

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels import paged_attention_triton  # noqa: E402
from kernels.attention import ring_attention, ring_plan  # noqa: E402
from kernels.launch import KernelError  # noqa: E402
from kernels.paged_attention import FP8, PagedKV, dequantize, fp8_scale, paged_attention, paged_plan, quantize_fp8  # noqa: E402

TOL = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.float16: dict(atol=3e-3, rtol=3e-3),
       FP8: dict(atol=2e-6, rtol=2e-6)}

# (heads, T, head_dim, page_size, context): odd page counts and partial last pages (37 = 4 x 8 + 5,
# 11 = 2 x 4 + 3), a page bigger than the context, T=2 as Mimi's, an odd head_dim, one-row pages.
SHAPES = [(2, 1, 32, 8, 37), (3, 1, 16, 4, 11), (2, 2, 16, 3, 11), (1, 1, 24, 16, 9), (2, 3, 8, 1, 5)]
# Per row (slot, offset, window as a fraction of the context or an absolute count): fresh, mid-ring,
# exactly full, wrapped many times, capped windows (one position, a few), a padded row.
ROWS = [(3, 0, 1.0), (0, 6, 1.0), (5, 36, 1.0), (1, 83, 1.0), (4, 50, 1), (2, 23, 4), (-1, 5, 1.0)]


def _window(w, context):
    return context if w == 1.0 else min(context, w)


def make_cache(shape, pool_dtype, seed, n_slots=6, spare_pages=7):
    """A pool with every slot's pages scattered over it (each slot's logical pages a random set of
    physical ones) and random history in them; windows per ROWS."""
    H, T, D, ps, context = shape
    g = torch.Generator().manual_seed(seed)
    per_slot = -(-context // ps)
    pages = n_slots * per_slot + spare_pages + 1
    order = torch.randperm(pages - 1, generator=g)[: n_slots * per_slot] + 1
    table = order.view(n_slots, per_slot).to(torch.int32).contiguous()
    k = torch.randn(pages, H, ps, D, generator=g)
    v = torch.randn(pages, H, ps, D, generator=g)
    window = torch.full((n_slots,), context, dtype=torch.int32)
    for slot, _, w in ROWS:
        if slot >= 0:
            window[slot] = _window(w, context)
    if pool_dtype == FP8:
        (k, ks), (v, vs) = quantize_fp8(k), quantize_fp8(v)
        return PagedKV(k, v, ks, vs, table, window)
    return PagedKV(k.to(pool_dtype), v.to(pool_dtype), None, None, table, window)


def as_float64(cache):
    return cache._replace(k=dequantize(cache.k, cache.k_scale, torch.float64),
                          v=dequantize(cache.v, cache.v_scale, torch.float64), k_scale=None, v_scale=None)


def _rows(batch, seed, shape, dtype):
    H, T, D, _, _ = shape
    g = torch.Generator().manual_seed(seed)
    rows = ROWS[:batch]
    slots = torch.tensor([s for s, _, _ in rows])
    offsets = torch.tensor([o for _, o, _ in rows])
    proj = torch.randn(batch, T, 3, H, D, generator=g).to(dtype)  # views of one projection, as the engine's
    return slots, offsets, tuple(proj.permute(2, 0, 3, 1, 4))


def brute_force(q, k, v, cache, slots, offsets, context):
    """A per-query loop over positions in float64: write, then attend to what the slot's ring of
    `context` entries holds within its window, looked up through the page table."""
    B, H, T, D = q.shape
    ps, per_slot = cache.k.shape[2], cache.page_table.shape[1]
    kp, vp = cache.k.clone(), cache.v.clone()
    out = torch.zeros(B, H, T, D, dtype=torch.float64)

    def where(slot, p):
        r = p % (ps * per_slot)
        return int(cache.page_table[slot, r // ps]), r % ps
    for b in range(B):
        s, o = int(slots[b]), int(offsets[b])
        for t in range(T):
            page, row = where(s, o + t)
            kp[page, :, row], vp[page, :, row] = k[b, :, t], v[b, :, t]
        last, win = o + T - 1, int(cache.window[s])
        for t in range(T):
            p = o + t
            keys = [j for j in range(max(0, last - context + 1, p - win + 1), p + 1)]
            at = [where(s, j) for j in keys]
            K = torch.stack([kp[pg, :, r] for pg, r in at], 1)  # [H, n, D]
            V = torch.stack([vp[pg, :, r] for pg, r in at], 1)
            w = torch.softmax(torch.einsum("hd,hnd->hn", q[b, :, t], K) / math.sqrt(D), -1)
            out[b, :, t] = torch.einsum("hn,hnd->hd", w, V)
    return out, kp, vp


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}T{}D{}page{}ctx{}".format(*s))
def test_torch_path_matches_a_per_query_loop(shape):
    slots, offsets, (q, k, v) = _rows(6, 1, shape, torch.float64)
    cache = as_float64(make_cache(shape, torch.float32, seed=2))
    want, want_k, want_v = brute_force(q, k, v, cache, slots, offsets, shape[4])
    got = paged_attention(q, k, v, cache, slots, offsets, shape[4])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(cache.k, want_k, atol=0, rtol=0)
    torch.testing.assert_close(cache.v, want_v, atol=0, rtol=0)


@pytest.mark.parametrize("trim", [True, False])
@pytest.mark.parametrize("page_size,context", [(4, 11), (5, 10), (16, 9)])
def test_full_windows_are_the_ring_to_the_bit(page_size, context, trim):
    """Stepping slots from empty past several wraps, the paged path with every window the context
    gives the ring's outputs bit for bit in fp32, whatever pages the slots were handed."""
    H, D, S = 2, 16, 4
    g = torch.Generator().manual_seed(page_size * 100 + context)
    per_slot = -(-context // page_size)
    table = (torch.randperm(S * per_slot + 3, generator=g)[: S * per_slot] + 1).view(S, per_slot).to(torch.int32)
    pages = S * per_slot + 4
    cache = PagedKV(torch.zeros(pages, H, page_size, D), torch.zeros(pages, H, page_size, D), None, None, table,
                    torch.full((S,), context, dtype=torch.int32))
    ring_k, ring_v = torch.zeros(S, H, context, D), torch.zeros(S, H, context, D)
    offsets = torch.zeros(S, dtype=torch.long)
    schedule = [[0, 1, 2, 3]] * 5 + [[2, 0], [3], [1, 2, 3]] * 20  # rows at different depths, slot orders
    for slots in schedule:
        slots = torch.tensor(slots)
        q, k, v = (torch.randn(len(slots), H, 1, D, generator=g) for _ in range(3))
        offs = offsets[slots]
        want = ring_attention(q, k, v, ring_k, ring_v, slots, offs, context,
                              plan=ring_plan(offs, 1, context, context, slots, trim=trim))
        plan = paged_plan(offs, 1, context, cache, slots, trim=trim)
        got = paged_attention(q, k, v, cache, slots, offs, context, plan=plan)
        assert torch.equal(got, want)
        offsets[slots] += 1
    assert int(offsets.min()) > 2 * context


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.float16, FP8], ids=["fp32", "fp16", "fp8"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}T{}D{}page{}ctx{}".format(*s))
@pytest.mark.parametrize("batch,splits", [(1, None), (4, 1), (7, 3)])
def test_triton_matches_float64_reference(shape, batch, splits, pool_dtype):
    dtype = torch.float16 if pool_dtype == torch.float16 else torch.float32
    slots, offsets, (q, k, v) = _rows(batch, batch, shape, dtype)
    cache = make_cache(shape, pool_dtype, seed=batch)
    active = slots >= 0
    # The float64 reference sees exactly what the kernel sees: the pool dequantized, q/k/v as given.
    ref = as_float64(cache)
    if pool_dtype == FP8:  # the new rows as the pool will hold them
        ref_new = [dequantize(*quantize_fp8(x.transpose(1, 2)), torch.float64).transpose(1, 2) for x in (k, v)]
    else:
        ref_new = [x.to(pool_dtype).double() for x in (k, v)]
    want = paged_attention(q.double()[active], ref_new[0][active], ref_new[1][active], ref, slots[active],
                           offsets[active], shape[4])
    untouched = cache.k.clone()
    got = paged_attention_triton.paged_attention(q, k, v, cache, slots, offsets, shape[4], splits)
    assert got.shape == q.shape and got.dtype == dtype
    torch.testing.assert_close(got[active].double(), want, **TOL[pool_dtype if pool_dtype == FP8 else dtype])
    # The pool: the new rows written as the torch path writes them (fp8: the same bytes and scales).
    torch.testing.assert_close(as_float64(cache).k, ref.k, atol=0, rtol=0)
    torch.testing.assert_close(as_float64(cache).v, ref.v, atol=0, rtol=0)
    written = {int(cache.page_table[int(s), ((int(o) + t) % (cache.page_table.shape[1] * shape[3])) // shape[3]])
               for s, o in zip(slots[active], offsets[active]) for t in range(shape[1])}
    others = [p for p in range(cache.k.shape[0]) if p not in written]
    assert torch.equal(cache.k[others].view(torch.uint8) if pool_dtype == FP8 else cache.k[others],
                       untouched[others].view(torch.uint8) if pool_dtype == FP8 else untouched[others])


def test_split_count_does_not_change_result():
    shape = (2, 1, 16, 4, 64)
    outs = []
    for splits in (1, 2, 5, 16):
        slots, offsets, (q, k, v) = _rows(4, 7, shape, torch.float32)
        cache = make_cache(shape, torch.float32, seed=7)
        outs.append(paged_attention_triton.paged_attention(q, k, v, cache, slots, torch.tensor([63, 64, 200, 3]),
                                                           64, splits))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-6, rtol=1e-6)


def test_public_dispatch():
    shape = (2, 2, 16, 4, 11)
    slots, offsets, (q, k, v) = _rows(3, 3, shape, torch.float32)
    a, b = make_cache(shape, torch.float32, seed=3), make_cache(shape, torch.float32, seed=3)
    got = paged_attention(q, k, v, a, slots, offsets, 11, backend="triton")
    want = paged_attention(q, k, v, b, slots, offsets, 11, backend="torch")
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    assert got.transpose(1, 2).is_contiguous()
    with pytest.raises(ValueError, match="unknown kernel backend"):
        paged_attention(q, k, v, a, slots, offsets, 11, backend="cuda")


@pytest.mark.parametrize("bad", ["shape", "pool_stride", "dtype", "scales", "table", "window", "context"])
def test_preconditions_are_checked_before_launch(bad):
    shape = (2, 1, 16, 4, 8)
    slots, offsets, (q, k, v) = _rows(2, 1, shape, torch.float32)
    cache = make_cache(shape, torch.float32, seed=1)
    if bad == "shape":
        k = k[:, :1]
    elif bad == "pool_stride":
        cache = cache._replace(k=cache.k.transpose(2, 3).contiguous().transpose(2, 3))
    elif bad == "dtype":
        k = k.double()
    elif bad == "scales":
        cache = cache._replace(k_scale=torch.ones(cache.k.shape[:3]))
    elif bad == "table":
        cache = cache._replace(page_table=cache.page_table.long())
    elif bad == "window":
        cache = cache._replace(window=cache.window[:2])
    else:
        cache = cache._replace(page_table=cache.page_table[:, :1])  # 1 page of 4 cannot hold 8
    with pytest.raises(KernelError):
        paged_attention_triton.paged_attention(q, k, v, cache, slots, offsets, 8)


def test_fp8_scales_are_the_smallest_powers_of_two_that_fit():
    amax = torch.tensor([0.0, 1e-40, 1e-20, 0.001, 1.0, 1.75, 1.7500001, 448.0, 449.0, 3e5])
    s = fp8_scale(amax)
    for a, got in zip(amax.double().tolist(), s.double().tolist()):
        assert math.log2(got) == int(math.log2(got))  # a power of two
        if a == 0:
            assert got == 1.0
        elif a > 2.0 ** -126 * 448:
            assert a / got <= 448 < a / (got / 2)
    x, scale = quantize_fp8(torch.tensor([[3.0, -1024.0, 0.5], [0.0, 0.0, 0.0]]))
    assert x.dtype == FP8 and scale.tolist() == [4.0, 1.0]
    torch.testing.assert_close(dequantize(x, scale, torch.float32)[0], torch.tensor([3.0, -1024.0, 0.5]))


@triton.jit
def _round_kernel(x_ptr, q_ptr, s_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    r, s = paged_attention_triton._fp8_round(tl.load(x_ptr + i[:, None] * N + i[None, :]))
    tl.store(q_ptr + i[:, None] * N + i[None, :], r.to(tl.float8e4nv))
    tl.store(s_ptr + i, s)


def test_triton_rounding_is_torchs_to_the_bit():
    """The kernel's integer rounding to e4m3 against torch's cast: ties to even, subnormals, the top."""
    N = 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, N, generator=g) * torch.logspace(-12, 6, N)[:, None]
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[grid.isfinite() & (grid > 0)]
    ties = (grid[:-1] + grid[1:]) / 2  # exactly between two e4m3 values
    x[0, :N] = ties[:N]
    x[1, :N] = ties[-N:]
    x[2, :N] = -ties[30:30 + N]
    x[3, 0] = 448.0  # each row's scale is 1 where its max is 448
    q, s = torch.empty(N, N, dtype=FP8), torch.empty(N)
    _round_kernel[(1,)](x, q, s, N=N)
    want_q, want_s = quantize_fp8(x)
    assert torch.equal(s, want_s)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
