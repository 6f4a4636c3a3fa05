"""CPU products on packed weights (lockstep's kernel, oneDNN) against float64, which route each
product takes, and the fallbacks around them."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.transformer import Linear
from kernels import linear as lin

needs_onednn = pytest.mark.skipif(not lin.onednn_available(), reason="torch built without oneDNN")
needs_native = pytest.mark.skipif(not lin.native_available(), reason="lockstep's CPU kernel is not built here")


@pytest.fixture(params=["native", "onednn"])
def packed_route(request, monkeypatch):
    """Runs a test once with lockstep's kernel and once with oneDNN alone (as where the kernel is
    missing: no AVX-512 or no compiler)."""
    if request.param == "native" and not lin.native_available():
        pytest.skip("lockstep's CPU kernel is not built here")
    if request.param == "onednn":
        if not lin.onednn_available():
            pytest.skip("torch built without oneDNN")
        monkeypatch.setattr(lin, "native_available", lambda: False)
    return request.param


# (leading shape of x, in, out, bias): a single row, a 3-d batch, hundreds of rows (which take the
# oneDNN path even for a small weight), odd sizes, and a weight past the size threshold.
CASES = [((1,), 5, 7, False), ((3, 2), 64, 129, True), ((300,), 33, 17, True), ((2,), 700, 257, False)]


@pytest.mark.parametrize("lead,n_in,n_out,bias", CASES)
def test_packed_product_matches_float64(lead, n_in, n_out, bias, packed_route, monkeypatch):
    monkeypatch.setattr(lin, "mkl_max_rows", lambda: 0)  # every row count on oneDNN, as off Intel
    g = torch.Generator().manual_seed(n_in)
    w = torch.randn(n_out, n_in, generator=g)
    b = torch.randn(n_out, generator=g) if bias else None
    x = torch.randn(*lead, n_in, generator=g)
    got = lin.linear(x, w, b, lin.pack(w))
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (*lead, n_out) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


def test_non_contiguous_rows(packed_route):
    w = torch.randn(300, 400)
    x = torch.randn(400, 6).t()  # rows with a stride
    torch.testing.assert_close(lin.linear(x, w, None, lin.pack(w)), x @ w.t(), atol=1e-4, rtol=1e-5)


def test_autograd_and_missing_pack_fall_back_to_aten(packed_route):
    w = torch.randn(400, 400, requires_grad=True)
    x = torch.randn(3, 400)
    with torch.enable_grad():  # the oneDNN op has no backward: ATen must run
        lin.linear(x, w, None, lin.pack(w)).sum().backward()
    assert w.grad is not None
    assert torch.equal(lin.linear(x, w.detach(), None, None), F.linear(x, w.detach()))
    with pytest.raises(ValueError, match="dense weight"):
        lin.linear(x.double(), None, None, lin.pack(w))


@pytest.mark.parametrize("bad", [torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4), torch.zeros(2, 2, 2)])
def test_pack_rejects_what_it_cannot_pack(bad):
    assert not lin.packable(bad)
    with pytest.raises(ValueError, match="cannot prepack"):
        lin.pack(bad)


def test_prepack_gives_each_gemm_module_its_weight(packed_route):
    model = nn.Sequential(Linear(600, 300, bias=False), nn.ReLU(), Linear(300, 5))
    x = torch.randn(2, 600)
    before = model(x)
    assert lin.prepack(model) == 2
    assert all(m.packed is not None for m in model if isinstance(m, Linear))
    torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-5)
    assert lin.prepack(model.to(torch.float64)) == 0  # outside fp32: nothing packed, ATen runs
    assert model[0].packed is None


@pytest.mark.parametrize("vendor,ranges", [("GenuineIntel", (3, 4)), ("AuthenticAMD", (0, 1))])
@needs_onednn
def test_few_rows_stay_on_mkl_only_on_intel(vendor, ranges, monkeypatch):
    """Without lockstep's kernel, on Intel CPUs products of up to 3 rows take ATen's (MKL) route,
    more rows oneDNN's; elsewhere oneDNN takes every row count."""
    monkeypatch.setattr(lin, "native_available", lambda: False)
    monkeypatch.setattr(lin.host, "cpuinfo", lambda field: vendor if field == "vendor_id" else "")
    lin.mkl_max_rows.cache_clear()
    try:
        w = torch.randn(600, 300)
        packed = lin.pack(w)
        last_mkl, first_packed = ranges
        assert lin.uses_packed(torch.zeros(first_packed, 300), packed)
        assert lin.uses_packed(torch.zeros(2, first_packed, 300), packed)
        if last_mkl:
            x = torch.randn(last_mkl, 300)
            assert not lin.uses_packed(x, packed)
            assert torch.equal(lin.linear(x, w, None, packed), F.linear(x, w))
    finally:
        lin.mkl_max_rows.cache_clear()



# (weight out x in, rows) -> route, with lockstep's kernel built: big weights on it at any row
# count, mid-sized ones handing hundreds of rows to oneDNN, small ones as without it.
ROUTES = [((600, 300), 1, "native"), ((600, 300), 64, "native"), ((600, 300), 2000, "native"),
          ((256, 256), 8, "native"), ((256, 256), 255, "native"), ((256, 256), 256, "onednn"),
          ((64, 64), 8, "aten"), ((64, 64), 300, "onednn")]


@needs_native
@needs_onednn
@pytest.mark.parametrize("shape,rows,where", ROUTES)
def test_routes_with_the_native_kernel(shape, rows, where):
    w = torch.randn(*shape)
    packed = lin.pack(w)
    big = w.numel() >= lin._MIN_PACKED_ELEMENTS
    assert (packed.panels is None) == (w.numel() < lin._MIN_PANEL_ELEMENTS)
    assert (packed.onednn is None) == big  # one packed copy for a big weight, not two
    x = torch.randn(rows, shape[1])
    assert lin.route(x, packed) == where
    torch.testing.assert_close(lin.linear(x, w, None, packed), F.linear(x, w), atol=1e-4, rtol=1e-5)


def test_start_up_line_names_the_route(monkeypatch):
    if lin.native_available():
        assert lin.describe() == "lockstep's AVX-512 kernel"
    monkeypatch.setattr(lin, "native_available", lambda: False)
    monkeypatch.setattr(lin.gemm_cpu, "reason", lambda: "the CPU has no AVX-512F")
    assert lin.describe() == "oneDNN/MKL (the CPU has no AVX-512F)"
