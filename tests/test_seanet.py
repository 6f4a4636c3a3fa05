"""SEANet and resamplers against the reference `moshi` package (random weights, fp32 CPU)."""
import dataclasses

import pytest
import torch

from moshi.models.loaders import _seanet_kwargs
from moshi.modules import SEANetDecoder as RefDecoder
from moshi.modules import SEANetEncoder as RefEncoder
from moshi.modules.resample import ConvDownsample1d, ConvTrUpsample1d

from engine.config import SeanetConfig
from engine.seanet import ConvDownsample, ConvTrUpsample, SeanetDecoder, SeanetEncoder

MIMI = SeanetConfig(**{**_seanet_kwargs, "ratios": tuple(_seanet_kwargs["ratios"])})
# Odd sizes, two residual layers with dilation, a non-identity skip and unusual kernels.
SMALL = SeanetConfig(dimension=6, n_filters=4, n_residual_layers=2, ratios=(3, 2), dilation_base=3,
                     kernel_size=5, residual_kernel_size=3, last_kernel_size=4, compress=2,
                     true_skip=False)


def _ref_kwargs(cfg: SeanetConfig) -> dict:
    kw = dataclasses.asdict(cfg)
    kw["ratios"] = list(cfg.ratios)
    return kw


def _randomize(module: torch.nn.Module) -> None:
    # Default inits give tiny activations deep in the network; scaled normals exercise all terms.
    for p in module.parameters():
        p.data.normal_(0, 1.0 / max(1, p[0].numel()) ** 0.5)


def _pair(kind: str, cfg: SeanetConfig | None = None):
    """(reference module, lockstep module with the same weights, input step length/channels)."""
    if kind == "encoder":
        ref, mine = RefEncoder(**_ref_kwargs(cfg)), SeanetEncoder(cfg)
        shape = (cfg.channels, 2 * cfg.hop_length)
    elif kind == "decoder":
        ref, mine = RefDecoder(**_ref_kwargs(cfg)), SeanetDecoder(cfg)
        shape = (cfg.dimension, 2)
    elif kind == "down":
        ref, mine = ConvDownsample1d(2, dimension=8, learnt=True, causal=True), ConvDownsample(2, 8)
        shape = (8, 2)
    else:
        ref = ConvTrUpsample1d(2, dimension=8, learnt=True, causal=True, channel_wise=True)
        mine, shape = ConvTrUpsample(2, 8), (8, 1)
    _randomize(ref)
    mine.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), mine.eval(), shape


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


CASES = [("encoder", MIMI), ("decoder", MIMI), ("encoder", SMALL), ("decoder", SMALL),
         ("down", None), ("up", None)]


@pytest.mark.parametrize("kind,cfg", CASES)
def test_streaming_matches_reference(kind, cfg):
    torch.manual_seed(0)
    ref, mine, shape = _pair(kind, cfg)
    steps = 3 if cfg is MIMI else 6
    xs = [torch.randn(3, *shape) for _ in range(steps)]
    mine.init_state(5)
    slots = torch.tensor([3, 0, 4])
    # The reference resamplers are plain modules around a streaming conv.
    streaming = getattr(ref, "streaming", None) or next(iter(ref.children())).streaming
    with streaming(3):
        for x in xs:
            expected = ref(x)
            got = mine.step(x, slots)
            assert got.shape == expected.shape
            assert _rel(got, expected) < 1e-5


def test_state_dict_keys_and_no_state_buffers():
    for kind, cfg in CASES:
        ref, mine, _ = _pair(kind, cfg)
        mine.init_state(2)
        assert list(mine.state_dict()) == list(ref.state_dict())
    _, enc, _ = _pair("encoder", MIMI)
    keys = set(enc.state_dict())
    assert "model.0.conv.conv.weight" in keys and "model.1.block.1.conv.conv.weight" in keys
    _, dec, _ = _pair("decoder", MIMI)
    assert "model.2.convtr.convtr.weight" in dec.state_dict()
    assert set(_pair("down")[1].state_dict()) == {"conv.conv.conv.weight"}
    assert set(_pair("up")[1].state_dict()) == {"convtr.convtr.convtr.weight"}


def test_strict_load_rejects_missing_key():
    ref, mine, _ = _pair("encoder", SMALL)
    sd = ref.state_dict()
    sd.pop("model.0.conv.conv.bias")
    with pytest.raises(RuntimeError, match="Missing key"):
        mine.load_state_dict(sd, strict=True)


def _alone(mine, xs):
    mine.init_state(1)
    return [mine.step(x, torch.tensor([0])) for x in xs]


@pytest.mark.parametrize("kind,cfg", [("encoder", SMALL), ("decoder", SMALL), ("down", None), ("up", None)])
def test_slots_are_independent(kind, cfg):
    torch.manual_seed(1)
    _, mine, shape = _pair(kind, cfg)
    a, b, c = ([torch.randn(1, *shape) for _ in range(5)] for _ in range(3))
    mine.init_state(3)
    outs = {0: [], 1: [], 2: []}
    # Slot 1 runs alone first; its state must be wiped by reset, not leak into its later session.
    mine.step(torch.randn(1, *shape), [1])
    mine.reset([1])
    for i in range(5):
        # Slots 2 and 0 run from the start, in that batch order; slot 1 joins at step 2.
        slots = [2, 0] if i < 2 else [2, 1, 0]
        streams = {0: a, 1: c, 2: b}
        x = torch.cat([streams[s][i if s != 1 else i - 2] for s in slots])
        y = mine.step(x, torch.tensor(slots))
        for j, s in enumerate(slots):
            outs[s].append(y[j:j + 1])
    for slot, stream in ((0, a), (2, b), (1, c[:3])):
        alone = _alone(mine, stream)
        for got, exp in zip(outs[slot], alone):
            assert _rel(got, exp) < 1e-5


def test_reset_clears_only_given_slots():
    torch.manual_seed(2)
    _, mine, shape = _pair("down")
    enc = _pair("encoder", SMALL)[1]
    for m, shp in ((mine, shape), (enc, (1, 2 * SMALL.hop_length))):
        m.init_state(3)
        m.step(torch.randn(3, *shp), [0, 1, 2])
        before = {k: v.clone() for k, v in m.named_buffers()}
        assert any(v[1].any() for k, v in before.items() if k.endswith("previous"))
        m.reset(torch.tensor([1]))
        for name, buf in m.named_buffers():
            for s in (0, 2):
                assert torch.equal(buf[s], before[name][s])
            if name.endswith("first"):
                assert bool(buf[1])
            else:
                assert not buf[1].any()
    dec = _pair("decoder", SMALL)[1]
    dec.init_state(2)
    dec.step(torch.randn(2, SMALL.dimension, 2), [0, 1])
    dec.reset([0])
    partials = [b for n, b in dec.named_buffers() if n.endswith("partial")]
    assert partials and all(not p[0].any() and p[1].any() for p in partials)


def test_step_requires_init_state():
    _, mine, shape = _pair("encoder", SMALL)
    with pytest.raises(RuntimeError, match="init_state"):
        mine.step(torch.randn(1, *shape), [0])


def test_bad_step_length():
    _, mine, _ = _pair("encoder", SMALL)
    mine.init_state(1)
    with pytest.raises(ValueError, match="multiple"):
        mine.step(torch.randn(1, 1, SMALL.hop_length + 1), [0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_follows_module(dtype):
    torch.manual_seed(3)
    for kind, cfg in [("encoder", SMALL), ("decoder", SMALL), ("down", None), ("up", None)]:
        _, mine, shape = _pair(kind, cfg)
        xs = [torch.randn(2, *shape) for _ in range(3)]
        mine.init_state(2)
        expected = [mine.step(x, [0, 1]) for x in xs]
        mine.to(dtype)  # after init_state: the state buffers must be cast too
        mine.reset([0, 1])
        for x, exp in zip(xs, expected):
            y = mine.step(x.to(dtype), torch.tensor([0, 1]))
            assert y.dtype == dtype
            assert _rel(y.float(), exp) < 5e-2
        assert all(b.dtype in (dtype, torch.bool) for b in mine.buffers())
