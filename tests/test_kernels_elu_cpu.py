"""SEANet's one-pass ELU against float64 and the torch path's four passes, over the layouts SEANet
hands it, and the fallback where it cannot run."""
import pytest
import torch
import torch.nn.functional as F

from kernels import conv, elu_cpu

needs_kernel = pytest.mark.skipif(elu_cpu.library() is None, reason="lockstep's CPU kernels are not built here")


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 17, 3), (3, 5, 1000), (8, 1920, 64), (5,)], ids=str)
def test_matches_float64_and_the_four_passes(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))) * 4
    got = elu_cpu.elu(x, torch.empty_like(x))
    torch.testing.assert_close(got.double(), F.elu(x.double()), atol=2e-7, rtol=2e-7)
    assert (got - conv.elu_torch(x)).abs().max() <= 2 ** -23  # one float32 ulp of 1
    assert torch.equal(got[x > 0], x[x > 0])


@needs_kernel
def test_special_values():
    x = torch.tensor([0.0, -1e-8, -1e-30, 1e-30, -0.5, -20.0, -87.0, -103.0, -200.0, 3e38,
                      float("inf"), float("-inf"), float("nan")])
    got = elu_cpu.elu(x.view(1, -1), torch.empty(1, x.numel())).view(-1)
    finite = x.isfinite()
    assert (got[finite] - conv.elu_torch(x)[finite]).abs().max() <= 2 ** -23
    assert got[-6] == -1.0 and got[-5] == -1.0  # e^x underflows to 0 below -104, as in float32
    assert got[-3] == float("inf") and got[-2] == -1.0 and got[-1].isnan()


@needs_kernel
def test_layouts_seanet_uses(monkeypatch):
    calls = []
    launch = elu_cpu.elu
    monkeypatch.setattr(elu_cpu, "elu", lambda x, out: calls.append(x.shape) or launch(x, out))
    act = torch.randn(4, 60, 24)  # channels-last memory, seen as [B, C, L]
    x = act.transpose(1, 2)
    assert elu_cpu.runs(x, torch.empty_like(x))
    torch.testing.assert_close(conv.elu(x), F.elu(x), atol=2e-7, rtol=2e-7)
    buf = torch.zeros(4, 65, 24)  # [state | x] body: each row contiguous, rows strided
    body = buf[:, 5:]
    conv.elu(act, out=body)
    torch.testing.assert_close(body, F.elu(act), atol=2e-7, rtol=2e-7)
    assert torch.equal(buf[:, :5], torch.zeros(4, 5, 24))  # nothing written outside the body
    assert len(calls) == 2
    small = torch.randn(1, 2, 1024)  # below the size where the kernel's call cost pays
    assert torch.equal(conv.elu(small), conv.elu_torch(small)) and len(calls) == 2


def test_other_layouts_and_dtypes_take_the_four_passes():
    x = torch.randn(3, 8, 10)[:, :, ::2]  # rows not contiguous
    assert not elu_cpu.runs(x, torch.empty_like(x))
    torch.testing.assert_close(conv.elu(x), F.elu(x), atol=2e-7, rtol=2e-7)
    mixed = torch.empty(3, 10, 8).transpose(1, 2)  # out laid out unlike x
    assert not elu_cpu.runs(torch.randn(3, 8, 10), mixed)
    d = torch.randn(2, 3, dtype=torch.float64)
    assert not elu_cpu.runs(d, torch.empty_like(d))
    torch.testing.assert_close(conv.elu(d), F.elu(d))
    with pytest.raises(ValueError, match="elu_cpu cannot run"):
        elu_cpu.elu(d, torch.empty_like(d))
