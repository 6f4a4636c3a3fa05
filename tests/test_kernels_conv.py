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


@pytest.fixture(params=["64", "16"], ids=["co64", "co16"])
def channel_tile(request, monkeypatch):
    """Both output-channel tilings: the usual 64, and the 16 taken for SEANet's large deep weights
    (forced here by calling every weight large), whose channels then span several programs."""
    if request.param == "16":
        monkeypatch.setattr(conv_triton, "_BIG_WEIGHT", 0)
    return int(request.param)


def _rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _active(rows):
    idx = torch.tensor([i for i, s in enumerate(rows) if s >= 0])
    return idx, torch.tensor([s for s in rows if s >= 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cfg", CONV1D, ids=lambda c: "Cin{}Cout{}K{}s{}d{}L{}{}{}".format(
    *c[:6], "-rep" if c[6] else "", f"-{c[7]}" if c[7] else ""))
def test_conv1d_steps_match_float64(cfg, dtype, channel_tile):
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
def test_conv_transpose1d_steps_match_float64(cfg, act, dtype, channel_tile):
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


def test_batch_and_positions_share_column_tiles():
    # SEANet's deepest conv at 32 sessions: two positions a row, so the 64 columns of one tile
    # are every row's; its 33 MB weight is streamed by 64 programs of 16 channels, once.
    M = torch.device("meta")
    w, state = torch.empty(1024, 512, 16, device=M), torch.empty(33, 512, 8, device=M)
    (launch, _), y = conv_triton.plan_conv1d(torch.empty(32, 512, 16, device=M), w, torch.empty(1024, device=M),
                                             state, torch.arange(32, device=M), 8, 1, 1, None, "elu")
    assert y.shape == (32, 1024, 2) and launch.grid == (1, 64)
    assert (launch.consts["BLOCK_T"], launch.consts["BLOCK_CO"]) == (64, 16)


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
