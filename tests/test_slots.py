"""Per-slot settings: the top-k bounds a step is specialized (and on CUDA, graphed) for."""
import torch

from engine.audio import frames, read_audio
from engine.config import EngineConfig, SamplingConfig
from engine.generate import run_sessions
from engine.runner import ModelRunner
from engine.slots import TOP_K_LADDER, SlotTable, round_bound


def test_bounds_round_up_to_the_ladder():
    assert [round_bound(k) for k in (1, 3, 25, 26, 37, 250, 251, 2048, 32000, 32768)] == \
        [1, 4, 25, 32, 64, 250, 256, 2048, 32768, 32768]
    assert round_bound(TOP_K_LADDER[-1] + 1) == 0 and round_bound(0) == 0
    table = SlotTable(3, "cpu")
    table.assign(0, SamplingConfig(top_k=37, text_top_k=3))
    table.assign(1, SamplingConfig(top_k=5, text_top_k=25))
    table.assign(2, SamplingConfig(top_k=0))
    assert table.top_k_bounds([0, 1]) == (64, 25)
    assert table.top_k_bounds([0]) == (64, 4)
    assert table.top_k_bounds([1, 2]) == (0, 25)  # 0 (whole vocabulary) dominates


def test_bounds_at_or_past_the_vocabulary_are_the_whole_vocabulary():
    table = SlotTable(4, "cpu", vocab=(2048, 32000))
    for slot, (k, text_k) in enumerate(((1500, 17000), (2048, 32000), (5000, 40000), (10**9, 10**9))):
        table.assign(slot, SamplingConfig(top_k=k, text_top_k=text_k))
        assert table.top_k_bounds([slot]) == (0, 0)
    table.assign(0, SamplingConfig(top_k=1000, text_top_k=16000))
    assert table.top_k_bounds([0]) == (1024, 16384)
    # Settings not held by any slot (what a warm-up prepares for) round the same way.
    assert table.bounds_of([(1000, 16000)]) == (1024, 16384)
    assert table.bounds_of([(5000, 3), (7, 0)]) == (0, 0) and table.bounds_of([(37, 3)]) == (64, 4)


def test_a_rounded_bound_samples_the_same_tokens(tiny_wrap_ckpt, wav_inputs):
    """The step at the exact bounds and at their rungs, from the same state: the same tokens."""
    pcm = torch.from_numpy(frames(read_audio(wav_inputs[0]))[:6])
    cfg = EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=2)
    exact, rounded = ModelRunner.load(cfg), ModelRunner.load(cfg)
    settings = [SamplingConfig(seed=5, top_k=37, text_top_k=3), SamplingConfig(seed=6, top_k=20, text_top_k=2)]
    for runner in (exact, rounded):
        for slot, sampling in enumerate(settings):
            runner.join(slot, sampling)
    idx = torch.tensor([0, 1])
    sampled = set()
    for frame in pcm:
        batch = frame.view(1, -1).expand(2, -1).contiguous()
        want, _ = exact.forward(idx, idx, batch, 37, 3)
        got, _ = rounded.forward(idx, idx, batch, round_bound(37), round_bound(3))
        assert torch.equal(got, want)
        sampled.update(want[:, 1:].flatten().tolist())
    assert len(sampled) > 4  # really sampled, not a constant


def test_the_vocabulary_as_a_bound_samples_as_the_whole_vocabulary(tiny_wrap_ckpt, wav_inputs):
    pcm = torch.from_numpy(frames(read_audio(wav_inputs[1]))[:5])
    cfg = EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=1)
    whole, sized = ModelRunner.load(cfg), ModelRunner.load(cfg)
    for runner in (whole, sized):
        runner.join(0, SamplingConfig(seed=3, top_k=0, text_top_k=0))
    idx = torch.tensor([0])
    lm = whole.lm.cfg
    for frame in pcm:
        want, _ = whole.forward(idx, idx, frame.view(1, -1), 0, 0)
        got, _ = sized.forward(idx, idx, frame.view(1, -1), lm.card, lm.text_card)
        assert torch.equal(got, want)


def test_callers_top_k_values_share_graphs(tiny_wrap_ckpt, wav_inputs):
    from test_graphs import EagerReplay
    inputs = {p.stem: frames(read_audio(p)) for p in wav_inputs}
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=1))
    runner.graphs = EagerReplay(runner)
    for i, top_k in enumerate((33, 40, 64)):
        name = next(iter(inputs))
        run_sessions(runner, {name: inputs[name]}, {name: SamplingConfig(seed=i, top_k=top_k, text_top_k=20)})
    assert set(runner.graphs.graphs) == {(1, 64, 25)}
