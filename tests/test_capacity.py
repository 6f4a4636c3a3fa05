import sys

import pytest
import torch

from engine import capacity
from engine.audio import frames, read_audio
from engine.config import ConfigError, EngineConfig, SamplingConfig
from engine.generate import run_sessions
from engine.runner import ModelRunner


def _state_transformers(runner):
    mimi = runner.mimi
    return (runner.lm.transformer, runner.lm.depformer, mimi.encoder_transformer.transformer,
            mimi.decoder_transformer.transformer)


def test_state_bytes_per_slot_is_what_a_slot_allocates(tiny_wrap_ckpt):
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=3))
    rows = runner.max_sessions + 1
    allocated = sum(t.k_cache.nbytes + t.v_cache.nbytes for t in _state_transformers(runner))
    assert capacity.state_bytes_per_slot(runner.lm, runner.mimi) * rows == allocated


def test_too_many_sessions_is_a_clear_error(tiny_wrap_ckpt, monkeypatch):
    probe = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=1))
    per_slot = capacity.state_bytes_per_slot(probe.lm, probe.mimi)
    # Free memory such that, past the 1 GB headroom, exactly 5 slots' state fits: 4 sessions + scratch.
    free = capacity._HEADROOM_MIN + 5 * per_slot + per_slot // 2
    monkeypatch.setattr(capacity, "free_bytes", lambda device: free)
    monkeypatch.setattr("engine.runner.check_weights_fit", lambda *args: None)  # free_bytes is after the weights
    with pytest.raises(ConfigError, match=r"--max-sessions 5 needs .* at full context, the LM's 6 positions and "
                                          r"Mimi's 5; .* at most 4 session\(s\) fit; lower --max-sessions"):
        ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=5))
    assert ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=4)).max_sessions == 4


def test_max_sessions_0_takes_as_many_as_fit(tiny_wrap_ckpt, monkeypatch):
    probe = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=1))
    per_slot = capacity.state_bytes_per_slot(probe.lm, probe.mimi)
    monkeypatch.setattr("engine.runner.check_weights_fit", lambda *args: None)
    cfg = EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=0)
    monkeypatch.setattr(capacity, "free_bytes", lambda device: capacity._HEADROOM_MIN + 5 * per_slot + per_slot // 2)
    runner = ModelRunner.load(cfg)
    assert runner.max_sessions == 4 and runner.scratch_slot == 4  # 5 rows of state: 4 sessions + scratch
    monkeypatch.setattr(capacity, "free_bytes", lambda device: 1 << 50)
    assert capacity.sessions_that_fit(probe.lm, probe.mimi, torch.device("cpu")) == capacity.MAX_AUTO_SESSIONS
    monkeypatch.setattr(capacity, "free_bytes", lambda device: capacity._HEADROOM_MIN + per_slot)
    with pytest.raises(ConfigError, match="not even one session's state .* a checkpoint with a shorter context"):
        ModelRunner.load(cfg)
    monkeypatch.setattr(capacity, "free_bytes", lambda device: None)
    with pytest.raises(ConfigError, match="cannot read on cpu: give --max-sessions N"):
        ModelRunner.load(cfg)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_that_do_not_fit_are_a_clear_error_before_loading(tiny_lm_ckpt, monkeypatch, dtype):
    probe = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_lm_ckpt), max_sessions=1))
    lm_bytes = capacity.weight_bytes(probe.lm, getattr(torch, dtype))
    file_bytes = (tiny_lm_ckpt / "model.safetensors").stat().st_size
    # On CPU: the LM (or its fp32 file while converted) and Mimi twice, for its packed copies.
    need = max(lm_bytes, file_bytes) + 2 * capacity.weight_bytes(probe.mimi)
    loads = []
    monkeypatch.setattr("engine.runner.load_weights", lambda *args: loads.append(args))
    monkeypatch.setattr(capacity, "free_bytes", lambda device: capacity._HEADROOM_MIN + need - 1)
    with pytest.raises(ConfigError, match=r"the weights need .* GB on cpu .* may hold them: use ") as err:
        ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_lm_ckpt), max_sessions=1, dtype=dtype))
    assert ("--dtype bfloat16" in str(err.value)) == (dtype == "float32")
    assert "a GPU (--device cuda)" in str(err.value) and not loads  # nothing was read
    monkeypatch.setattr(capacity, "free_bytes", lambda device: capacity._HEADROOM_MIN + need)
    capacity.check_weights_fit(probe.lm, probe.mimi, getattr(torch, dtype), "cpu", file_bytes)  # one byte more fits


def test_unknown_free_memory_is_not_checked(tiny_wrap_ckpt, monkeypatch):
    monkeypatch.setattr(capacity, "free_bytes", lambda device: None)
    assert ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=2)).max_sessions == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_cpu_free_memory_is_read():
    assert capacity.free_bytes(torch.device("cpu")) > 0
    assert capacity.free_bytes(torch.device("meta")) is None


def test_an_unusable_cuda_device_is_a_clear_error(monkeypatch):
    assert capacity.check_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device cuda asked for.*use --device cpu"):
        capacity.check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert capacity.check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="has 2 CUDA device.*cuda:0..cuda:1"):
        capacity.check_device("cuda:2")


def test_probe_times_every_bucket_at_full_context_and_leaves_the_slots_fresh(tiny_wrap_ckpt, wav_inputs,
                                                                             monkeypatch):
    inputs = {p.stem: frames(read_audio(p)) for p in wav_inputs}
    sampling = {k: SamplingConfig(seed=i) for i, k in enumerate(inputs)}
    cfg = EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=3)
    cold, probed = ModelRunner.load(cfg), ModelRunner.load(cfg)
    seen = []
    step = probed.step

    def spy(slots, pcm):
        lm = probed.lm.transformer
        seen.append((list(slots), lm.offsets[slots].tolist(), [probed.slots.frames[s] for s in slots]))
        return step(slots, pcm)

    monkeypatch.setattr(probed, "step", spy)
    ticks = capacity.probe_ticks(probed, repeats=2)
    assert sorted(ticks) == [1, 2, 3] and all(t > 0 for t in ticks.values())
    # Each size runs on its own real slots, every ring full, once untimed and `repeats` times timed.
    cap, ctx = probed.lm.transformer.capacity, probed.lm.cfg.context
    assert seen[0] == ([0], [cap], [ctx]) and len(seen) == 3 * 3
    assert seen[-3][0] == [0, 1, 2] and seen[-3][1] == [cap] * 3
    monkeypatch.undo()
    want, got = run_sessions(cold, inputs, sampling), run_sessions(probed, inputs, sampling)
    for name in inputs:
        assert got[name].text_tokens == want[name].text_tokens
        assert got[name].audio_tokens == want[name].audio_tokens


def test_realtime_capacity_is_read_from_the_probe():
    ticks = {1: 0.036, 2: 0.051, 4: 0.063, 8: 0.088}
    assert capacity.realtime_sessions(ticks) == 4
    line = capacity.describe_ticks(ticks, 8)
    assert "36 / 51 / 63 / 88 ms with 1 / 2 / 4 / 8" in line
    assert "real time holds with 4 session(s) but not with 8" in line and "--max-sessions to 4" in line
    assert "--admit-realtime" in line
    assert capacity.describe_ticks(ticks, 8, admit_realtime=True).endswith(
        "real time holds with 4 session(s) but not with 8, so --admit-realtime admits at most 4 at once")
    assert "all 4 slots run in real time" in capacity.describe_ticks({1: 0.03, 4: 0.07}, 4)
    assert capacity.realtime_sessions({1: 0.09}) == 0
    assert "even one session runs slower than real time" in capacity.describe_ticks({1: 0.09}, 1)
