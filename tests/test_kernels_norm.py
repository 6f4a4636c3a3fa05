"""Triton norms, fused residual add + norm and SiLU gate (interpreted on CPU) against float64."""
import pytest
import torch

pytest.importorskip("triton")
from engine.transformer import StreamingTransformer  # noqa: E402
from kernels import norm, norm_triton  # noqa: E402
from kernels.dispatch import apply_backend  # noqa: E402
from kernels.launch import KernelError  # noqa: E402
from kernels.norm import NormParams  # noqa: E402

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=4e-3, rtol=4e-3)}


def _params(kind, C, g, dtype):
    w = (1 + 0.2 * torch.randn(C, generator=g)).to(dtype)
    if kind == "rms":
        return NormParams(True, w, None, 1e-8, True)
    return NormParams(False, w, (0.1 * torch.randn(C, generator=g)).to(dtype), 1e-5, False)


def _f64(p: NormParams) -> NormParams:
    return NormParams(p.rms, p.weight.double(), p.bias.double() if p.bias is not None else None, p.eps, p.f32)


def _strided(g, shape, dtype):
    # Rows evenly strided but not packed, as a slice of a wider projection would be.
    wide = torch.randn(*shape[:-1], shape[-1] + 5, generator=g).to(dtype)
    return wide[..., : shape[-1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("C", [7, 64, 130])
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_norm_matches_float64(kind, C, dtype, layout):
    g = torch.Generator().manual_seed(C)
    p = _params(kind, C, g, dtype)
    if layout == "strided":
        x = _strided(g, (3, 2, C), dtype) * 3
    else:  # Mimi's transformer input: a [B, C, T] activation seen as [B, T, C]
        x = (torch.randn(3, C, 2, generator=g) * 3).to(dtype).transpose(1, 2)
    got = norm.norm(x, p, backend="triton")
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(got.double(), norm.norm(x.double(), _f64(p)), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_add_norm_matches_float64(kind, scaled, dtype):
    C = 48
    g = torch.Generator().manual_seed(3)
    p = _params(kind, C, g, dtype)
    x = torch.randn(4, 2, C, generator=g).to(dtype)
    update = _strided(g, (4, 2, C), dtype)
    scale = (0.01 * torch.rand(C, generator=g)).to(dtype) if scaled else None
    x_new, y = norm.add_norm(x, update, scale, p, backend="triton")
    want_x = x.double() + (scale.double() * update.double() if scaled else update.double())
    torch.testing.assert_close(x_new.double(), want_x, **TOL[dtype])
    # The norm is of the residual as rounded to its dtype, which is what later layers add onto.
    torch.testing.assert_close(y.double(), norm.norm(x_new.double(), _f64(p)), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H", [5, 96, 1100])
def test_silu_gate_matches_float64(H, dtype):
    g = torch.Generator().manual_seed(H)
    h = (torch.randn(3, 1, 2 * H, generator=g) * 4).to(dtype)
    got = norm.silu_gate(h, backend="triton")
    torch.testing.assert_close(got.double(), norm.silu_gate(h.double()), **TOL[dtype])


@pytest.mark.parametrize("kind", ["lm", "mimi"])
def test_streaming_transformer_agrees_between_backends(kind):
    torch.manual_seed(0)
    if kind == "lm":  # SiLU gating, fp32 RMSNorm, RoPE, context shorter than the run
        tr = StreamingTransformer(32, 4, 2, 64, "rms_norm_f32", "silu", None, 5, 10000.0)
        T = 1
    else:  # Mimi: LayerNorm + bias, GELU MLP, layer scale, two positions per step
        tr = StreamingTransformer(32, 2, 2, 64, "layer_norm", "none", 0.1, 4, 10000.0)
        T = 2
    for prm in tr.parameters():
        prm.data.normal_(0, 0.3)
    slots_per_step = [[0, 2], [2], [1, 0, 2], [0, 2], [2, 1]]
    outs = {}
    for backend in ("torch", "triton"):
        applied = apply_backend(tr, backend)
        assert backend in applied.values()
        tr.init_state(3)
        gen = torch.Generator().manual_seed(1)
        outs[backend] = [tr(torch.randn(len(s), T, 32, generator=gen), torch.tensor(s)) for s in slots_per_step]
    for a, b in zip(outs["torch"], outs["triton"]):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=2e-5)


def test_preconditions():
    p = _params("layer", 8, torch.Generator().manual_seed(0), torch.float32)
    with pytest.raises(KernelError):
        norm_triton.norm(torch.randn(2, 8).double(), p.weight, p.bias, p.eps, False)
    with pytest.raises(KernelError):
        norm_triton.norm(torch.randn(2, 9), p.weight, p.bias, p.eps, False)
    with pytest.raises(KernelError):
        norm_triton.norm(torch.randn(2, 2, 2, 8), p.weight, p.bias, p.eps, False)
    with pytest.raises(KernelError):
        norm_triton.silu_gate(torch.randn(2, 7))
