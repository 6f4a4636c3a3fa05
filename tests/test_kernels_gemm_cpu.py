"""lockstep's AVX-512 CPU product against float64, and its batch independence."""

import pytest
import torch
import torch.nn.functional as F

from kernels import gemm_cpu

needs_kernel = pytest.mark.skipif(gemm_cpu.library() is None, reason=f"no CPU kernel here: {gemm_cpu.reason()}")


def _case(rows, n_in, n_out, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g)
    b = torch.randn(n_out, generator=g) if bias else None
    return torch.randn(*rows, n_in, generator=g), w, b


# Row counts around the 12-row tile and its balanced passes, column counts around the 32-column
# pairs of panels (1, a panel's worth, one past it), and depths from 1 up.
@needs_kernel
@pytest.mark.parametrize("rows", [(1,), (3,), (12,), (13,), (2, 17), (64,), (300,)], ids=str)
@pytest.mark.parametrize("n_in,n_out", [(1, 1), (7, 16), (33, 31), (64, 33), (513, 100), (1024, 64)])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_product_matches_float64(rows, n_in, n_out, bias):
    x, w, b = _case(rows, n_in, n_out, bias, seed=n_in * n_out)
    got = gemm_cpu.linear(x, gemm_cpu.pack(w), n_out, b)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (*rows, n_out) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


@needs_kernel
def test_a_rows_result_does_not_depend_on_its_batch_or_the_threads():
    x, w, b = _case((300,), 512, 96, True)
    panels = gemm_cpu.pack(w)
    alone = torch.cat([gemm_cpu.linear(x[i:i + 1], panels, 96, b) for i in range(0, 300, 37)])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for m in (5, 13, 64, 300):
                got = gemm_cpu.linear(x[:m], panels, 96, b)
                assert torch.equal(got[::37], alone[:len(got[::37])])
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_strided_rows_and_empty_inputs():
    x, w, b = _case((40,), 200, 50, True)
    panels = gemm_cpu.pack(w)
    wide = torch.randn(40, 300)
    wide[:, 50:250] = x
    view = wide[:, 50:250]  # rows with a stride past their length: read in place
    torch.testing.assert_close(gemm_cpu.linear(view, panels, 50, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    t = torch.randn(200, 40).t()  # columns with a stride: copied first
    torch.testing.assert_close(gemm_cpu.linear(t, panels, 50, b), F.linear(t, w, b), atol=1e-4, rtol=1e-5)
    assert gemm_cpu.linear(torch.zeros(0, 200), panels, 50, b).shape == (0, 50)


@needs_kernel
def test_preconditions_are_checked_before_launch():
    x, w, b = _case((4,), 64, 40, True)
    panels = gemm_cpu.pack(w)
    with pytest.raises(ValueError, match="float32 on CPU with 64 features"):
        gemm_cpu.linear(x.double(), panels, 40, b)
    with pytest.raises(ValueError, match="64 features"):
        gemm_cpu.linear(x[:, :63], panels, 40, b)
    with pytest.raises(ValueError, match="not `pack` of a weight with 70 outputs"):
        gemm_cpu.linear(x, panels, 70, None)
    with pytest.raises(ValueError, match="not `pack` of a weight"):
        gemm_cpu.linear(x, w, 40, None)  # the weight itself, unpacked
    with pytest.raises(ValueError, match="bias must be"):
        gemm_cpu.linear(x, panels, 40, b[:20])
    with pytest.raises(ValueError, match="cannot pack"):
        gemm_cpu.pack(w.double())
