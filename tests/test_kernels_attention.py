"""Triton ring attention (interpreted on CPU) against the torch reference computed in float64."""
import pytest
import torch

pytest.importorskip("triton")
from kernels import attention_triton  # noqa: E402
from kernels.attention import ring_attention, ring_plan, ring_plan_at  # noqa: E402
from kernels.launch import KernelError  # noqa: E402

TOL = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.float16: dict(atol=3e-3, rtol=3e-3)}

# (heads, T, head_dim, capacity, context): temporal-LM-like, depth-like (context None), Mimi-like
# (T=2), a context shorter than the ring, an odd head_dim, T=3 in a tiny ring.
SHAPES = [(2, 1, 32, 37, 37), (3, 1, 16, 8, None), (2, 2, 16, 11, 11), (2, 1, 16, 13, 5),
          (1, 2, 24, 9, 9), (2, 3, 8, 4, None)]
# Per-row (slot, offset): fresh, mid-ring, ring exactly full, wrapped several times; -1 pads.
ROWS = [(3, 0), (0, 6), (5, 36), (1, 83), (-1, 5), (2, 1)]


def _inputs(shape, batch, dtype, seed, n_slots=6):
    H, T, D, cap, _ = shape
    g = torch.Generator().manual_seed(seed)
    rows = ROWS[:batch]
    slots = torch.tensor([s for s, _ in rows])
    offsets = torch.tensor([o for _, o in rows])
    # q/k/v as the engine passes them: views of one projection (non-contiguous in T and H).
    proj = torch.randn(batch, T, 3, H, D, generator=g).to(dtype)
    cache_k = torch.randn(n_slots, H, cap, D, generator=g).to(dtype)
    cache_v = torch.randn(n_slots, H, cap, D, generator=g).to(dtype)
    return slots, offsets, tuple(proj.permute(2, 0, 3, 1, 4)), cache_k, cache_v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}T{}D{}cap{}ctx{}".format(*s))
@pytest.mark.parametrize("batch,splits", [(1, None), (4, 1), (6, 3)])
def test_matches_float64_reference(shape, batch, splits, dtype):
    slots, offsets, (q, k, v), cache_k, cache_v = _inputs(shape, batch, dtype, seed=batch)
    context = shape[4]
    active = slots >= 0
    # The float64 reference sees exactly the values the kernel sees (rounded to `dtype`).
    rq, rk, rv = (t.double()[active] for t in (q, k, v))
    ref_k, ref_v = cache_k.double(), cache_v.double()
    want = ring_attention(rq, rk, rv, ref_k, ref_v, slots[active], offsets[active], context)
    before_k = cache_k.clone()
    got = attention_triton.ring_attention(q, k, v, cache_k, cache_v, slots, offsets, context, splits)
    assert got.shape == q.shape and got.dtype == dtype
    torch.testing.assert_close(got[active].double(), want, **TOL[dtype])
    # Caches: the new keys are written in `dtype`; rows of slots not stepped are untouched.
    torch.testing.assert_close(cache_k.double(), ref_k.to(dtype).double(), atol=0, rtol=0)
    torch.testing.assert_close(cache_v.double(), ref_v.to(dtype).double(), atol=0, rtol=0)
    untouched = [s for s in range(cache_k.shape[0]) if s not in slots.tolist()]
    assert torch.equal(cache_k[untouched], before_k[untouched])


def test_split_count_does_not_change_result():
    shape = (2, 1, 16, 64, 64)
    outs = []
    for splits in (1, 2, 5, 16):
        slots, offsets, (q, k, v), ck, cv = _inputs(shape, 4, torch.float32, seed=7)
        offsets = torch.tensor([63, 64, 200, 3])
        outs.append(attention_triton.ring_attention(q, k, v, ck, cv, slots, offsets, 64, splits))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-6, rtol=1e-6)


def test_public_dispatch_and_engine_layout():
    shape = (2, 2, 16, 11, 11)
    slots, offsets, (q, k, v), ck, cv = _inputs(shape, 3, torch.float32, seed=3)
    ck2, cv2 = ck.clone(), cv.clone()
    got = ring_attention(q, k, v, ck, cv, slots, offsets, 11, backend="triton")
    want = ring_attention(q, k, v, ck2, cv2, slots, offsets, 11, backend="torch")
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    # [B, H, T, D] view of a [B, T, H, D] buffer: the engine's merge of heads is a free reshape.
    assert got.transpose(1, 2).is_contiguous()
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ring_attention(q, k, v, ck, cv, slots, offsets, 11, backend="cuda")


def test_splits_are_fixed_per_shape_and_cover_gpu():
    _, _, block_n = attention_triton.block_sizes(1, 128, 3000)
    assert attention_triton.plan_splits(1, 32, 3000, block_n, 132) * 32 >= 132
    assert attention_triton.plan_splits(64, 32, 3000, block_n, 132) == 1
    assert attention_triton.plan_splits(1, 16, 8, 8, 132) == 1  # the depth ring is one tile


@pytest.mark.parametrize("bad", ["shape", "cache_stride", "dtype", "T", "slots"])
def test_preconditions_are_checked_before_launch(bad):
    shape = (2, 1, 16, 8, 8)
    slots, offsets, (q, k, v), ck, cv = _inputs(shape, 2, torch.float32, seed=1)
    if bad == "shape":
        k = k[:, :1]
    elif bad == "cache_stride":
        ck = ck.transpose(2, 3).contiguous().transpose(2, 3)
    elif bad == "dtype":
        k = k.double()
    elif bad == "T":
        ck, cv = ck[:, :, :0], cv[:, :, :0]
    else:
        slots = slots.float()
    with pytest.raises(KernelError):
        attention_triton.ring_attention(q, k, v, ck, cv, slots, offsets, 8)


@pytest.mark.parametrize("slots", [[2, 0], [1, 2]], ids=["scattered", "run"])
@pytest.mark.parametrize("offsets", [[0, 3], [5, 1], [40, 2], [9, 100]], ids=str)
def test_torch_path_skips_only_unwritten_entries(offsets, slots):
    """The torch path attends over the written prefix of the rings; a per-query loop over the whole
    ring with the reference's validity rule must agree (young rings, one full, wrapped rings)."""
    H, T, D, cap, context = 2, 2, 8, 12, 10
    g = torch.Generator().manual_seed(sum(offsets))
    B = len(offsets)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    ck, cv = (torch.randn(3, H, cap, D, generator=g, dtype=torch.float64) for _ in range(2))
    slots, offs = torch.tensor(slots), torch.tensor(offsets)
    want = torch.empty_like(q)
    wk, wv = ck.clone(), cv.clone()
    for b in range(B):
        s, o = int(slots[b]), int(offs[b])
        for t in range(T):
            wk[s, :, (o + t) % cap], wv[s, :, (o + t) % cap] = k[b, :, t], v[b, :, t]
        for t in range(T):
            p = o + t
            # Ring entry i holds the newest position written there, if any, as of this step.
            seen = [max((j for j in range(o + T) if j % cap == i), default=-1) for i in range(cap)]
            ok = torch.tensor([0 <= j <= p and p - j < context for j in seen])
            scores = torch.einsum("hd,hcd->hc", q[b, :, t], wk[s]) / D ** 0.5
            w = torch.softmax(scores.masked_fill(~ok, float("-inf")), -1)
            want[b, :, t] = torch.einsum("hc,hcd->hd", w, wv[s])
    got = ring_attention(q, k, v, ck, cv, slots, offs, context)
    plan = ring_plan(offs, T, cap, context, slots)
    assert plan.n_keys == min(cap, max(offsets) + T)
    assert plan.run_start == (1 if slots.tolist() == [1, 2] else None)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ck, wk, atol=0, rtol=0)


@pytest.mark.parametrize("slots", [[0, 1, 2], [4, 1, 3]], ids=["run", "scattered"])
@pytest.mark.parametrize("position,T", [(0, 1), (5, 1), (3, 2), (6, 2)])
def test_plan_at_a_shared_position_matches_the_general_plan(slots, position, T):
    H, D, cap = 2, 8, 8
    g = torch.Generator().manual_seed(position * 3 + T)
    slots = torch.tensor(slots)
    offs = torch.full((len(slots),), position)
    q, k, v = (torch.randn(len(slots), H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    caches = [torch.randn(5, H, cap, D, generator=g, dtype=torch.float64) for _ in range(2)]
    ck, cv = (c.clone() for c in caches)
    want = ring_attention(q, k, v, ck, cv, slots, offs, None, plan=ring_plan(offs, T, cap, None, slots))
    gk, gv = (c.clone() for c in caches)
    got = ring_attention(q, k, v, gk, gv, slots, offs, None, plan=ring_plan_at(position, T, cap, slots))
    torch.testing.assert_close(got, want)
    assert torch.equal(gk, ck) and torch.equal(gv, cv)


def test_plan_at_rejects_a_wrapping_position():
    with pytest.raises(ValueError, match="do not fit"):
        ring_plan_at(7, 2, 8, torch.tensor([0]))
