"""Triton streaming conv steps (interpreted on CPU) against the torch path in float64, over several
steps so state carried between steps is checked too."""
import pytest
import torch

pytest.importorskip("triton")
from kernels import conv, conv_triton  # noqa: E402
from kernels.launch import KernelError  # noqa: E402

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-2, rtol=2e-2)}
SLOTS = [4, 0, -1, 2]  # a padded row, and slot 1 / 3 never stepped
N_SLOTS = 5

# (Cin, Cout, K, stride, dilation, L, replicate, act) as SEANet / Mimi use them: the first conv,
# a dilated residual conv, a strided downsampling conv (K = 2 * stride), Mimi's replicate-padded
# downsample, a 1x1 (no state), a step shorter than the state, channels spanning several tiles.
CONV1D = [(1, 8, 7, 1, 1, 24, False, None), (8, 4, 3, 1, 3, 10, False, "elu"), (4, 8, 4, 2, 1, 6, False, "elu"),
          (6, 6, 4, 2, 1, 2, True, None), (5, 3, 1, 1, 1, 7, False, "elu"), (8, 8, 7, 1, 1, 2, False, "elu"),
          (70, 66, 3, 1, 1, 3, False, None)]
# (Cin, Cout, K, stride, groups, L): decoder upsampling convs, Mimi's channel-wise upsample, a kernel
# that is not a multiple of the stride, channels spanning several tiles.
CONVTR = [(8, 4, 4, 2, 1, 3), (6, 6, 4, 2, 6, 1), (4, 2, 10, 5, 1, 2), (3, 5, 7, 3, 1, 2), (66, 70, 4, 2, 1, 2)]


def _rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _active(rows):
    idx = torch.tensor([i for i, s in enumerate(rows) if s >= 0])
    return idx, torch.tensor([s for s in rows if s >= 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cfg", CONV1D, ids=lambda c: "Cin{}Cout{}K{}s{}d{}L{}{}{}".format(
    *c[:6], "-rep" if c[6] else "", f"-{c[7]}" if c[7] else ""))
def test_conv1d_steps_match_float64(cfg, dtype):
    Cin, Cout, K, stride, dil, L, replicate, act = cfg
    g = torch.Generator().manual_seed(Cin * 31 + K)
    w, b = _rand(g, Cout, Cin, K) / (Cin * K) ** 0.5, _rand(g, Cout)
    ctx = (K - 1) * dil + 1 - stride
    state = _rand(g, N_SLOTS, Cin, ctx)
    first = torch.tensor([True, False, True, False, True]) if replicate else None
    ref_state, ref_first = state.clone(), first.clone() if replicate else None
    got_state = state.to(dtype)
    got_first = first.clone() if replicate else None
    slots = torch.tensor(SLOTS)
    idx, active = _active(SLOTS)
    for step in range(3):
        x = _rand(g, len(SLOTS), Cin, L)
        xd = x.to(dtype)
        want = conv.conv1d_step(xd.double()[idx], w.to(dtype).double(), b.to(dtype).double(), ref_state, active,
                                stride, dil, 1, ref_first, act)
        got = conv_triton_step(xd, w.to(dtype), b.to(dtype), got_state, slots, stride, dil, got_first, act)
        torch.testing.assert_close(got[idx].double(), want, **TOL[dtype])
        torch.testing.assert_close(got_state.double(), ref_state.to(dtype).double(), **TOL[dtype])
        if replicate:
            assert torch.equal(got_first, ref_first)
        ref_state = ref_state.to(dtype).double()  # both sides carry the same rounded state on
    assert torch.equal(got_state[[1, 3]], state[[1, 3]].to(dtype))


def conv_triton_step(x, w, b, state, slots, stride, dil, first, act):
    return conv.conv1d_step(x, w, b, state, slots, stride, dil, 1, first, act, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", [None, "elu"])
@pytest.mark.parametrize("cfg", CONVTR, ids=lambda c: "Cin{}Cout{}K{}s{}g{}L{}".format(*c))
def test_conv_transpose1d_steps_match_float64(cfg, act, dtype):
    Cin, Cout, K, stride, groups, L = cfg
    g = torch.Generator().manual_seed(Cin * 7 + K)
    w, b = _rand(g, Cin, Cout // groups, K) / Cin ** 0.5, _rand(g, Cout)
    partial = _rand(g, N_SLOTS, Cout, K - stride)
    ref_partial, got_partial = partial.clone(), partial.to(dtype)
    slots = torch.tensor(SLOTS)
    idx, active = _active(SLOTS)
    bias = b if groups == 1 else None  # Mimi's channel-wise upsample has no bias
    for step in range(3):
        xd = _rand(g, len(SLOTS), Cin, L).to(dtype)
        bd = bias.to(dtype) if bias is not None else None
        want = conv.conv_transpose1d_step(xd.double()[idx], w.to(dtype).double(),
                                          bd.double() if bd is not None else None, ref_partial, active, stride,
                                          groups, act)
        got = conv.conv_transpose1d_step(xd, w.to(dtype), bd, got_partial, slots, stride, groups, act,
                                         backend="triton")
        assert got.shape == (len(SLOTS), Cout, L * stride)
        torch.testing.assert_close(got[idx].double(), want, **TOL[dtype])
        torch.testing.assert_close(got_partial.double(), ref_partial.to(dtype).double(), **TOL[dtype])
        ref_partial = ref_partial.to(dtype).double()
    assert torch.equal(got_partial[[1, 3]], partial[[1, 3]].to(dtype))


def test_non_contiguous_input_as_after_the_transformer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, generator=g).transpose(1, 2)  # [B, C=6, T=4], time stride C
    w = torch.randn(6, 6, 4, generator=g)
    s1, s2 = torch.randn(4, 6, 2, generator=g), None
    s2 = s1.clone()
    f1, f2 = torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)
    slots = torch.tensor([3, 1, 0])
    want = conv.conv1d_step(x, w, None, s1, slots, 2, 1, 1, f1)
    got = conv.conv1d_step(x, w, None, s2, slots, 2, 1, 1, f2, backend="triton")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, s1)
    assert torch.equal(f1, f2)


@pytest.mark.parametrize("bad", ["groups", "stride", "state", "dtype", "overlap"])
def test_preconditions(bad):
    x = torch.randn(2, 4, 6)
    slots = torch.tensor([0, 1])
    with pytest.raises(KernelError):
        if bad == "groups":
            conv_triton.plan_conv1d(x, torch.randn(4, 2, 3), None, torch.zeros(2, 4, 2), slots, 1, 1, 2)
        elif bad == "stride":
            conv_triton.plan_conv1d(x, torch.randn(4, 4, 8), None, torch.zeros(2, 4, 4), slots, 4, 1, 1)
        elif bad == "state":
            conv_triton.plan_conv1d(x, torch.randn(4, 4, 3), None, torch.zeros(2, 4, 3), slots, 1, 1, 1)
        elif bad == "dtype":
            conv_triton.plan_conv1d(x.double(), torch.randn(4, 4, 3).double(), None,
                                    torch.zeros(2, 4, 2).double(), slots, 1, 1, 1)
        else:
            conv_triton.plan_conv_transpose1d(x[..., :1], torch.randn(4, 4, 8), None, torch.zeros(2, 4, 6),
                                              slots, 2, 1)


# The torch path's CPU GEMM route (kernels.linear on a prepacked weight) against ATen in float64:
# (Cin, Cout, K, stride, input length): pointwise over many positions, strided with few and with
# many outputs (the latter stays a convolution), a stride-1 conv with few and with many outputs.
GEMM_CONV1D = [(32, 64, 1, 1, 300), (16, 24, 10, 5, 100), (8, 16, 8, 4, 1000), (40, 20, 3, 1, 12),
               (12, 6, 3, 1, 60)]
# (Cin, Cout, K, stride, positions): K = 2 * stride, K not a multiple of the stride, too many positions.
GEMM_CONVTR = [(64, 32, 16, 8, 2), (10, 6, 7, 3, 5), (8, 4, 8, 4, 20)]


@pytest.mark.parametrize("cfg", GEMM_CONV1D, ids=lambda c: "Cin{}Cout{}K{}s{}L{}".format(*c))
def test_cpu_gemm_conv1d_matches_float64(cfg):
    from kernels.linear import pack
    Cin, Cout, K, stride, L = cfg
    g = torch.Generator().manual_seed(K * 7 + L)
    w, b, x = _rand(g, Cout, Cin, K).float(), _rand(g, Cout).float(), _rand(g, 3, Cin, L).float()
    packed = pack(conv.gemm_weight(w, False, 1))
    got = conv._conv1d(x, w, b, stride, 1, 1, packed)
    want = torch.nn.functional.conv1d(x.double(), w.double(), b.double(), stride)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("cfg", GEMM_CONVTR, ids=lambda c: "Cin{}Cout{}K{}s{}n{}".format(*c))
def test_cpu_gemm_conv_transpose1d_matches_float64(cfg):
    from kernels.linear import pack
    Cin, Cout, K, stride, n = cfg
    g = torch.Generator().manual_seed(K * 5 + n)
    w, b, x = _rand(g, Cin, Cout, K).float(), _rand(g, Cout).float(), _rand(g, 2, Cin, n).float()
    packed = pack(conv.gemm_weight(w, True, 1))
    got = conv._conv_transpose1d(x, w, b, stride, 1, packed)
    want = torch.nn.functional.conv_transpose1d(x.double(), w.double(), b.double(), stride)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


def test_elu_within_an_ulp_of_aten():
    x = torch.cat([torch.linspace(-30, 30, 10001), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    got = conv.elu(x)
    assert torch.equal(got[x > 0], x[x > 0])
    torch.testing.assert_close(got.double(), torch.nn.functional.elu(x.double()), atol=1.2e-7, rtol=0)


@pytest.mark.parametrize("K,L", [(1, 100), (1, 5), (3, 100)], ids=lambda v: str(v))
def test_residual_is_added_inside_the_step(K, L):
    """`residual` (a residual block's skip) equals adding it after the step, on every CPU route."""
    from kernels.linear import pack
    g = torch.Generator().manual_seed(K + L)
    Cin, Cout = 6, 10
    w, b = _rand(g, Cout, Cin, K).float(), _rand(g, Cout).float()
    packed = pack(conv.gemm_weight(w, False, 1))
    state = _rand(g, N_SLOTS, Cin, K - 1).float()
    slots = torch.tensor([3, 1])
    x, skip = _rand(g, 2, Cin, L).float(), _rand(g, 2, Cout, L).float()
    s1, s2 = state.clone(), state.clone()
    got = conv.conv1d_step(x, w, b, s1, slots, 1, 1, 1, act="elu", packed=packed, residual=skip)
    want = conv.conv1d_step(x, w, b, s2, slots, 1, 1, 1, act="elu", packed=packed) + skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(s1, s2)
