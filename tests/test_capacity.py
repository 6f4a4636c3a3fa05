import sys

import pytest
import torch

from engine import capacity
from engine.kv import sizing as kv_sizing
from engine.audio import frames, read_audio
from engine.config import ConfigError, EngineConfig, SamplingConfig
from engine.generate import run_sessions
from engine.runner import ModelRunner


def _rings(runner):
    mimi = runner.mimi
    return (runner.lm.depformer, mimi.encoder_transformer.transformer, mimi.decoder_transformer.transformer)


def _per_session(runner, kv=None):
    """(a slot's own state, a KV page) in bytes."""
    kv = kv or runner.kv
    return kv_sizing.slot_state_bytes(runner.lm, runner.mimi), kv.page_bytes


def _need(slot_b, page_b, slots, pages):
    return (slots + 1) * slot_b + (pages + 1) * page_b


def test_the_plan_is_what_the_runner_allocates(tiny_wrap_ckpt):
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=3))
    rows = runner.max_sessions + 1
    rings = sum(t.k_cache.nbytes + t.v_cache.nbytes for t in _rings(runner))
    slot_b, page_b = _per_session(runner)
    assert slot_b * rows == rings
    assert runner.kv.nbytes == (runner.kv_plan.pages + 1) * page_b
    assert runner.kv_plan.pages == 3 * runner.kv.tables.pages_per_slot  # reserve: every slot's whole context
    fp8 = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=3, kv_dtype="fp8"))
    assert fp8.kv.nbytes == (fp8.kv_plan.pages + 1) * fp8.kv.page_bytes < runner.kv.nbytes / 3


def test_too_many_sessions_is_a_clear_error(tiny_wrap_ckpt, monkeypatch):
    probe = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=1))
    slot_b, page_b = _per_session(probe)
    M = probe.kv.tables.pages_per_slot
    # Free memory such that, past the 1 GB headroom, exactly 4 sessions (+ scratch) fit, and half of a fifth.
    free = capacity._HEADROOM_MIN + _need(slot_b, page_b, 4, 4 * M) + (slot_b + M * page_b) // 2
    monkeypatch.setattr(capacity, "free_bytes", lambda device: free)
    monkeypatch.setattr("engine.runner.check_weights_fit", lambda *args: None)  # free_bytes is after the weights
    with pytest.raises(ConfigError, match=r"--max-sessions 5 needs .* a session \(its whole context, 0.48 s .*"
                                          r"at most 4 session\(s\) fit; lower --max-sessions .* or --kv-policy elastic"):
        ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=5))
    assert ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=4)).max_sessions == 4


def test_max_sessions_0_takes_as_many_as_fit(tiny_wrap_ckpt, monkeypatch):
    probe = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=1))
    slot_b, page_b = _per_session(probe)
    M = probe.kv.tables.pages_per_slot
    monkeypatch.setattr("engine.runner.check_weights_fit", lambda *args: None)
    cfg = EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=0)
    free = capacity._HEADROOM_MIN + _need(slot_b, page_b, 4, 4 * M) + (slot_b + M * page_b) // 2
    monkeypatch.setattr(capacity, "free_bytes", lambda device: free)
    runner = ModelRunner.load(cfg)
    assert runner.max_sessions == 4 and runner.scratch_slot == 4  # 5 rows of state: 4 sessions + scratch
    assert runner.kv_plan.pages == 4 * M and "4 slots: " in runner.kv_plan.why
    monkeypatch.setattr(capacity, "free_bytes", lambda device: 1 << 50)
    assert ModelRunner.load(cfg).max_sessions == kv_sizing.MAX_AUTO_SESSIONS
    monkeypatch.setattr(capacity, "free_bytes", lambda device: capacity._HEADROOM_MIN + slot_b + page_b)
    with pytest.raises(ConfigError, match="not even one session fits .* a checkpoint with a shorter context"):
        ModelRunner.load(cfg)
    monkeypatch.setattr(capacity, "free_bytes", lambda device: None)
    with pytest.raises(ConfigError, match="cannot read on cpu: give --max-sessions N"):
        ModelRunner.load(cfg)


def test_elastic_sizing_promises_each_slot_its_minimum_and_grows_into_the_rest(tiny_wrap_ckpt, monkeypatch):
    # Context 6 in pages of 2: 3 pages a session's whole context, 2 its minimum (3 frames, 0.24 s).
    base = dict(device="cpu", model_dir=str(tiny_wrap_ckpt), kv_policy="elastic", kv_page_size=2, kv_min_seconds=0.2)
    probe = ModelRunner.load(EngineConfig(max_sessions=1, **base))
    slot_b, page_b = _per_session(probe)
    assert probe.kv.tables.promise == 2 and probe.kv.tables.pages_per_slot == 3
    monkeypatch.setattr("engine.runner.check_weights_fit", lambda *args: None)
    # Room for 5 sessions at their minimum and 3 pages more.
    monkeypatch.setattr(capacity, "free_bytes", lambda device: capacity._HEADROOM_MIN
                        + _need(slot_b, page_b, 5, 5 * 2 + 3) + page_b // 2)
    runner = ModelRunner.load(EngineConfig(max_sessions=0, **base))
    assert (runner.max_sessions, runner.kv_plan.pages) == (5, 13)
    assert "let sessions grow" in runner.kv_plan.why and "promised 0.24 s" in runner.kv.describe()
    # With the slots given, the pool takes what fits, up to every slot's whole context.
    assert ModelRunner.load(EngineConfig(max_sessions=3, **base)).kv_plan.pages == 9
    with pytest.raises(ConfigError, match="--kv-pages 1 cannot hold one session's 2 pages"):
        ModelRunner.load(EngineConfig(max_sessions=3, kv_pages=1, **base))
    assert ModelRunner.load(EngineConfig(max_sessions=3, kv_pages=2, **base)).kv_plan.pages == 2


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
