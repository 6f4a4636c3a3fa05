"""The streaming conv steps' CPU path (`kernels.conv_cpu`, channels-last products) against ATen's
convolution of the whole sequence in float64, over several steps so the carried state is checked."""
import pytest
import torch
import torch.nn.functional as F

from kernels import conv, conv_cpu
from kernels.linear import pack

SLOTS = [3, 0, 4]  # slots 1 and 2 are never stepped
N_SLOTS = 5

# (Cin, Cout, K, stride, dilation, step length, replicate, act): SEANet's first conv (unfolded),
# a dilated residual conv, strided downsampling (K = 2 * stride) with few and many outputs, a
# pointwise conv, a widening conv (unfolded), a step shorter than the state, Mimi's
# replicate-padded downsample, a kernel that is not a multiple of the stride.
CONV1D = [(1, 8, 7, 1, 1, 24, False, None), (8, 4, 3, 1, 3, 10, False, "elu"), (16, 24, 10, 5, 1, 10, False, "elu"),
          (8, 16, 8, 4, 1, 200, False, "elu"), (32, 64, 1, 1, 1, 30, False, "elu"), (6, 20, 3, 1, 1, 4, False, None),
          (8, 8, 7, 1, 1, 2, False, "elu"), (6, 6, 4, 2, 1, 2, True, None), (5, 7, 5, 3, 1, 6, False, None)]
# (Cin, Cout, K, stride, positions per step): K = 2 * stride, K not a multiple of the stride, a
# step shorter than the overlap, many positions.
CONVTR = [(64, 32, 16, 8, 2), (10, 6, 7, 3, 5), (4, 3, 7, 2, 1), (8, 4, 8, 4, 20)]


def _rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


LAYOUTS = ["channels_last", "channels_first"]  # the engine's state, and any other state


def _state(kind, slots, channels, length, dtype):
    if kind == "channels_last":
        return conv_cpu.alloc_state(slots, channels, length, dtype, "cpu")
    return torch.zeros(slots, channels, length, dtype=dtype)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg", CONV1D, ids=lambda c: "Cin{}Cout{}K{}s{}d{}L{}{}{}".format(
    *c[:6], "-rep" if c[6] else "", f"-{c[7]}" if c[7] else ""))
def test_conv1d_steps_match_whole_sequence(cfg, layout, packed):
    Cin, Cout, K, stride, dil, L, replicate, act = cfg
    g = torch.Generator().manual_seed(Cin * 31 + K)
    w, b = (_rand(g, Cout, Cin, K) / (Cin * K) ** 0.5).float(), _rand(g, Cout).float()
    ctx = (K - 1) * dil + 1 - stride
    state = _state(layout, N_SLOTS, Cin, ctx, torch.float32)
    first = torch.ones(N_SLOTS, dtype=torch.bool) if replicate else None
    pk = pack(conv.gemm_weight(w, False, 1, dil, stride)) if packed else None
    steps = [_rand(g, len(SLOTS), Cin, L).float() for _ in range(3)]
    got = torch.cat([conv.conv1d_step(x, w, b, state, torch.tensor(SLOTS), stride, dil, 1, first, act, packed=pk)
                     for x in steps], dim=-1)
    whole = torch.cat(steps, dim=-1).double()
    if act == "elu":
        whole = F.elu(whole)
    past = whole[..., :1].expand(-1, -1, ctx) if replicate else whole.new_zeros(len(SLOTS), Cin, ctx)
    want = F.conv1d(torch.cat([past, whole], -1), w.double(), b.double(), stride, 0, dil)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[SLOTS].double(), torch.cat([past, whole], -1)[..., whole.shape[-1]:],
                               atol=1e-6, rtol=1e-6)
    assert not state[[1, 2]].any()
    if replicate:
        assert not first[SLOTS].any() and first[[1, 2]].all()


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", [None, "elu"])
@pytest.mark.parametrize("cfg", CONVTR, ids=lambda c: "Cin{}Cout{}K{}s{}n{}".format(*c))
def test_conv_transpose1d_steps_match_whole_sequence(cfg, act, layout, packed):
    Cin, Cout, K, stride, n = cfg
    g = torch.Generator().manual_seed(K * 5 + n)
    w, b = (_rand(g, Cin, Cout, K) / Cin ** 0.5).float(), _rand(g, Cout).float()
    partial = _state(layout, N_SLOTS, Cout, K - stride, torch.float32)
    pk = pack(conv.gemm_weight(w, True, 1, 1, stride)) if packed else None
    steps = [_rand(g, len(SLOTS), Cin, n).float() for _ in range(3)]
    got = torch.cat([conv.conv_transpose1d_step(x, w, b, partial, torch.tensor(SLOTS), stride, 1, act, packed=pk)
                     for x in steps], dim=-1)
    whole = torch.cat(steps, dim=-1).double()
    want = F.conv_transpose1d(F.elu(whole) if act == "elu" else whole, w.double(), b.double(), stride)
    emitted = got.shape[-1]
    assert emitted == whole.shape[-1] * stride
    torch.testing.assert_close(got.double(), want[..., :emitted], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(partial[SLOTS].double(), want[..., emitted:] - b.double()[:, None],
                               atol=1e-5, rtol=1e-5)
    assert not partial[[1, 2]].any()


@pytest.mark.parametrize("K,L", [(1, 100), (1, 5), (3, 100)], ids=lambda v: str(v))
def test_residual_is_added_inside_the_step(K, L):
    """`residual` (a residual block's skip) equals adding it after the step."""
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


def test_unsupported_convs_take_atens_route():
    """Grouped convs, and strided ones with dilation, are not planned channels-last, and still run."""
    assert conv.gemm_weight(torch.zeros(4, 1, 4), True, 4, 1, 2) is None
    assert conv.gemm_weight(torch.zeros(4, 4, 3), False, 1, 2, 2) is None
    with pytest.raises(ValueError, match="dilation"):
        conv_cpu.conv_plan(4, 4, 3, 2, 2)
    g = torch.Generator().manual_seed(0)
    w, x = _rand(g, 4, 4, 3).float(), _rand(g, 2, 4, 8).float()
    state = torch.zeros(2, 4, 3)
    got = conv.conv1d_step(x, w, None, state, torch.tensor([0, 1]), 2, 2, 1)
    want = F.conv1d(F.pad(x, (3, 0)), w, None, 2, 0, 2)
    torch.testing.assert_close(got, want)


def test_elu_within_an_ulp_of_aten():
    x = torch.cat([torch.linspace(-30, 30, 10001), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    got = conv.elu(x)
    assert torch.equal(got[x > 0], x[x > 0])
    torch.testing.assert_close(got.double(), torch.nn.functional.elu(x.double()), atol=1.2e-7, rtol=0)
