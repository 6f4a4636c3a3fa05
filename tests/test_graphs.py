"""The graph-replay step path (bucket padding, scratch routing, static buffers), checked on CPU by
replaying eagerly what CUDA would replay from a captured graph."""
import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from engine.audio import frames, read_audio
from engine.config import EngineConfig, SamplingConfig
from engine.generate import run_sessions
from engine.graphs import GraphedStep, buckets_for
from engine.runner import ModelRunner


class EagerReplay(GraphedStep):
    def _record(self, fn):
        tokens, audio = fn()
        self.recorded = getattr(self, "recorded", 0) + 1

        def replay():
            t, a = fn()
            tokens.copy_(t)
            audio.copy_(a)
        return replay, tokens, audio


def test_buckets():
    assert buckets_for(3) == [1, 2, 3]
    assert buckets_for(64)[-3:] == [40, 48, 64]
    g = GraphedStep.__new__(GraphedStep)
    g.buckets = buckets_for(20)
    assert [g.bucket(n) for n in (1, 3, 9, 17, 20)] == [1, 4, 12, 20, 20]


def test_padded_replay_matches_eager(tiny_wrap_ckpt, wav_inputs):
    inputs = {p.stem: frames(read_audio(p)) for p in wav_inputs}
    greedy = {k: SamplingConfig(greedy=True) for k in inputs}
    sampled = {k: SamplingConfig(seed=i, top_k=7, text_top_k=3) for i, k in enumerate(inputs)}
    eager = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=3))
    graphed = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=3))
    graphed.graphs = EagerReplay(graphed)
    for sampling in (greedy, sampled):
        want = run_sessions(eager, inputs, sampling)
        got = run_sessions(graphed, inputs, sampling)
        for name in inputs:
            assert got[name].text_tokens == want[name].text_tokens
            assert got[name].audio_tokens == want[name].audio_tokens
            torch.testing.assert_close(torch.from_numpy(np.stack(got[name].pcm)), torch.from_numpy(np.stack(want[name].pcm)))
    # One recording per (bucket, top-k bounds) met; bounds 7 and 3 on their rungs.
    assert set(graphed.graphs.graphs) >= {(3, 250, 25), (3, 8, 4)}
    assert graphed.graphs.recorded == len(graphed.graphs.graphs)


@pytest.mark.parametrize("graphs", [True, False], ids=["graphed", "eager"])
def test_warm_up_prepares_every_bucket_and_leaves_sessions_alone(tiny_wrap_ckpt, wav_inputs, graphs):
    inputs = {p.stem: frames(read_audio(p)) for p in wav_inputs}
    sampling = {k: SamplingConfig(seed=i) for i, k in enumerate(inputs)}
    cfg = EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=3)
    cold, warm = ModelRunner.load(cfg), ModelRunner.load(cfg)
    if graphs:
        warm.graphs = EagerReplay(warm)
    first = run_sessions(warm, {"a": inputs[next(iter(inputs))]}, {"a": SamplingConfig(seed=9)})  # dirties slots
    assert warm.warm_up() == [1, 2, 3]
    if graphs:
        assert set(warm.graphs.graphs) == {(1, 250, 25), (2, 250, 25), (3, 250, 25)}
    want, got = run_sessions(cold, inputs, sampling), run_sessions(warm, inputs, sampling)
    for name in inputs:
        assert got[name].text_tokens == want[name].text_tokens
        assert got[name].audio_tokens == want[name].audio_tokens
    assert first["a"].text_tokens  # the session before the warm-up ran
    if graphs:  # other settings are prepared under the bounds a tick would round them to
        warm.warm_up((5000, 3))
        assert {(b, 0, 4) for b in (1, 2, 3)} <= set(warm.graphs.graphs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_eager(tiny_wrap_ckpt, wav_inputs):
    inputs = {p.stem: frames(read_audio(p)) for p in wav_inputs}
    sampling = {k: SamplingConfig(greedy=True) for k in inputs}
    cfg = EngineConfig(model_dir=str(tiny_wrap_ckpt), max_sessions=3, device="cuda", dtype="float32")
    want = run_sessions(ModelRunner.load(cfg), inputs, sampling)
    eager = ModelRunner.load(cfg)
    eager.graphs = None
    got = run_sessions(eager, inputs, sampling)
    # Every bucket captured up front into the one shared memory pool, then replayed in any order.
    warmed = ModelRunner.load(cfg)
    warmed.warm_up()
    assert len(warmed.graphs.graphs) == len(warmed.graphs.buckets)
    again = run_sessions(warmed, inputs, sampling)
    for name in inputs:
        assert again[name].text_tokens == want[name].text_tokens
        assert got[name].text_tokens == want[name].text_tokens


class _HostOperands(TorchDispatchMode):
    """Records each op that takes a host tensor (other than a 0-dim scalar) into device work: in a
    CUDA graph that is a host-to-device copy captured once, replaying stale data."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() > 0
               for t in pytree.tree_leaves((args, kwargs))):
            self.ops.append(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("preset", ["tiny", "7b"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_device_step_is_capturable_on_a_data_free_device(backend, preset, monkeypatch):
    """The device step on the meta device: shapes without data, so anything that reads a value back
    to the host (.item(), int(), bool(), .tolist(), nonzero, torch.equal) raises, and host operands
    are recorded. Code guarded by `device.type == "cpu"` is skipped as on CUDA. With 'triton' the
    launchers plan every launch and allocate their outputs; only the launches are skipped."""
    import kernels.dispatch
    import kernels.launch
    from engine.lm import MoshiLM
    from engine.make_checkpoint import PRESETS
    from engine.mimi import Mimi
    lm_cfg, mimi_cfg = PRESETS[preset]  # "7b": every launch planned at the real shapes
    with torch.device("meta"):
        lm, mimi = MoshiLM(lm_cfg), Mimi(mimi_cfg)
    if backend == "triton":
        monkeypatch.setattr(kernels.dispatch, "_check_triton", lambda device: None)
        launched = []
        monkeypatch.setattr(kernels.launch.Launch, "run", lambda self: launched.append(self.kernel))
    runner = ModelRunner(lm, mimi, None, max_sessions=4, kernels=backend)
    idx = torch.tensor([0, 2, 3], device="meta")
    decode_idx = torch.tensor([0, runner.scratch_slot, 3], device="meta")
    with _HostOperands() as mode:
        tokens, audio = runner.forward(idx, decode_idx, torch.zeros(3, runner.frame_size, device="meta"), 250, 25)
    assert mode.ops == []
    assert tokens.shape == (3, 1 + lm_cfg.dep_q) and audio.shape == (3, runner.frame_size)
    if backend == "triton":
        assert len(launched) > 50
