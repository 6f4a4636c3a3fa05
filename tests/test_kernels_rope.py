"""Triton rotary embedding (interpreted on CPU) against the torch path computed in float64."""
import pytest
import torch

pytest.importorskip("triton")
from kernels import rope_triton  # noqa: E402
from kernels.launch import KernelError  # noqa: E402
from kernels.rope import apply_rope, rope_tables  # noqa: E402

TOL = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.float16: dict(atol=2e-3, rtol=2e-3)}

# (B, H, T, D): the temporal LM's single query, Mimi's two positions, odd head counts and a head
# dim whose half is not a power of two, more heads than one program's block.
SHAPES = [(3, 4, 1, 16), (2, 3, 2, 24), (1, 5, 3, 10), (2, 70, 1, 128)]


def _projection(B, H, T, D, dtype, g):
    # As the transformer hands them over: views of one [B, T, 3, H, D] projection.
    proj = torch.randn(B, T, 3, H, D, generator=g).to(dtype)
    q, k, _ = proj.permute(2, 0, 3, 1, 4)
    return q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}T{}D{}".format(*s))
def test_matches_float64(shape, dtype):
    B, H, T, D = shape
    g = torch.Generator().manual_seed(H * D + T)
    q, k = _projection(B, H, T, D, dtype, g)
    offsets = torch.tensor([0, 2999, 17][:B])  # fresh, deep into a call (large angles), mid
    tables = rope_tables(offsets, T, D, 10000.0)
    want_q, want_k = apply_rope(q.double(), k.double(), tables)
    got_q, got_k = apply_rope(q, k, tables, backend="triton")
    assert got_q.dtype == dtype and got_q.is_contiguous() and got_q.shape == q.shape
    torch.testing.assert_close(got_q.double(), want_q, **TOL[dtype])
    torch.testing.assert_close(got_k.double(), want_k, **TOL[dtype])


def test_torch_path_rotates_pairs_by_position():
    """Position 0 is the identity; rotating a pair preserves its norm; a shift by p composes."""
    q = torch.randn(2, 1, 1, 8, dtype=torch.float64)
    zero = rope_tables(torch.tensor([0, 0]), 1, 8, 10000.0)
    torch.testing.assert_close(apply_rope(q, q, zero)[0], q)
    r = apply_rope(q, q, rope_tables(torch.tensor([5, 9]), 1, 8, 10000.0))[0]
    torch.testing.assert_close(r.view(2, 4, 2).norm(dim=-1), q.view(2, 4, 2).norm(dim=-1))
    # Attention scores depend only on the distance between positions (up to the fp32 tables).
    a = rope_tables(torch.tensor([3]), 1, 8, 10000.0)
    b = rope_tables(torch.tensor([10]), 1, 8, 10000.0)
    x, y = torch.randn(2, 1, 1, 1, 8, dtype=torch.float64)
    s1 = (apply_rope(x, x, a)[0] * apply_rope(y, y, b)[0]).sum()
    a2, b2 = (rope_tables(torch.tensor([p]), 1, 8, 10000.0) for p in (103, 110))
    s2 = (apply_rope(x, x, a2)[0] * apply_rope(y, y, b2)[0]).sum()
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)


def test_empty_batch():
    q = torch.empty(0, 2, 1, 8)
    tables = rope_tables(torch.empty(0, dtype=torch.long), 1, 8, 10000.0)
    got_q, got_k = apply_rope(q, q, tables, backend="triton")
    assert got_q.shape == q.shape and got_k.shape == q.shape


@pytest.mark.parametrize("bad", ["odd_dim", "k_shape", "table_dtype", "table_shape", "int"])
def test_preconditions_are_checked_before_launch(bad):
    q = torch.randn(2, 3, 1, 8)
    k = q.clone()
    cos, sin = rope_tables(torch.tensor([1, 2]), 1, 8, 10000.0)[:2]
    if bad == "odd_dim":
        q = k = torch.randn(2, 3, 1, 7)
    elif bad == "k_shape":
        k = torch.randn(2, 3, 2, 8)
    elif bad == "table_dtype":
        cos = cos.double()
    elif bad == "table_shape":
        sin = sin[:1]
    else:
        q = k = torch.zeros(2, 3, 1, 8, dtype=torch.int32)
    with pytest.raises(KernelError, match="rope"):
        rope_triton.plan_rope(q, k, cos, sin)
