"""The KV pool in the engine: paged `reserve` is the ring to the bit (fused C step and torch path,
past the wrap); pages come back; a tiny `elastic` pool refuses who cannot get a minimum, caps a
session exactly as a model with that context (against kyutai's reference), and changes no
neighbour's tokens; the pool's state is in the metrics and each session's status."""
import json
import shutil

import numpy as np
import pytest
import torch

from engine.audio import frames, read_audio
from engine.config import EngineConfig, SamplingConfig
from engine.generate import run_sessions
from engine.make_checkpoint import make_checkpoint
from engine.runner import ModelRunner
from engine.serving import EngineLoop
from reference import reference_generate


def _as_ring(runner: ModelRunner) -> ModelRunner:
    """The same runner with the LM's keys in rings of the context again, as before the pool."""
    runner.lm.transformer.init_state(runner.max_sessions + 1)
    return runner


def _same(a: dict, b: dict, names) -> None:
    for name in names:
        assert a[name].text_tokens == b[name].text_tokens, name
        assert a[name].audio_tokens == b[name].audio_tokens, name
        assert np.array_equal(np.stack(a[name].pcm), np.stack(b[name].pcm)), name


@pytest.mark.parametrize("fused", [True, False], ids=["fused-c", "torch"])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_paged_reserve_is_the_ring_to_the_bit(tiny_wrap_ckpt, wav_inputs, page_size, fused):
    """fp32 CPU, an LM context of 6 frames: every input wraps the ring several times."""
    inputs = {p.stem: frames(read_audio(p)) for p in wav_inputs}
    sampling = {k: SamplingConfig(seed=i, top_k=7) if i % 2 else SamplingConfig(greedy=True)
                for i, k in enumerate(inputs)}
    cfg = EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=3, kv_page_size=page_size)
    paged, ring = ModelRunner.load(cfg), _as_ring(ModelRunner.load(cfg))
    if not fused:
        paged.lm.transformer.cpu_stack = ring.lm.transformer.cpu_stack = None
    assert paged.lm.transformer.pool is not None and ring.lm.transformer.pool is None
    assert min(len(f) for f in inputs.values()) >= 2 * paged.lm.cfg.context
    _same(run_sessions(paged, inputs, sampling), run_sessions(ring, inputs, sampling), inputs)
    paged.kv.check()
    assert paged.kv.tables.alloc.free == paged.kv.tables.alloc.num_pages  # every page back


@pytest.fixture(scope="module")
def ctx40_ckpt(tmp_path_factory):
    """All-tiny checkpoint with an LM context of 40 frames, and the same weights with a context of 9."""
    root = tmp_path_factory.mktemp("ctx40")
    ckpt = make_checkpoint(root / "ctx40", "tiny", seed=5, context=40)
    short = root / "ctx9"
    shutil.copytree(ckpt, short)
    config = json.loads((short / "config.json").read_text())
    config["context"] = 9
    (short / "config.json").write_text(json.dumps(config))
    return ckpt, short


def _speech(seconds: float, seed: int) -> np.ndarray:
    from bench.serve import synthetic_speech
    n = int(seconds * 12.5)
    return synthetic_speech(seconds + 0.2, seed)[: n * 1920].reshape(n, 1920)


def test_sessions_capped_from_their_start_are_a_model_with_that_context(ctx40_ckpt):
    """A pool of three sessions' minimum (3 pages of 4 frames: a window of 9): no session can grow
    past it, each reuses its own oldest page from frame 12 on, and each one's tokens are kyutai's with
    a context of 9; alone, in a pool of one minimum, each gives the same tokens and PCM to the bit
    (batch-invariant, so the batch's shape does not round them differently)."""
    ckpt, short = ctx40_ckpt
    # Four slots: with an odd row count the CPU products' last row rounds apart from the others
    # (batch-invariant mode then differs by a slot's row, on main as well).
    base = dict(device="cpu", model_dir=str(ckpt), max_sessions=4, kv_policy="elastic", kv_page_size=4,
                kv_min_seconds=0.72, batch_invariant=True)
    # Two end together; when the third ends, its 3 pages are below the watermark: nobody grows.
    inputs = {"a": _speech(2.4, 1), "b": _speech(2.4, 2), "c": _speech(1.6, 3)}
    greedy = {k: SamplingConfig(greedy=True) for k in inputs}
    runner = ModelRunner.load(EngineConfig(kv_pages=9, **base))
    assert runner.kv.tables.promise == 3 and runner.kv.tables.guaranteed_window == 9
    windows = []
    step = runner.step

    def spy(slots, pcm):
        out = step(slots, pcm)
        windows.append([runner.kv.window_seconds(s) for s in slots])
        return out
    runner.step = spy
    together = run_sessions(runner, inputs, greedy)
    assert windows[:8] == [[40 / 12.5] * 3] * 8 and windows[8] == [9 / 12.5] * 3
    assert all(w == 9 / 12.5 for row in windows[8:] for w in row) and runner.kv.tables.capped() == 0
    for name, frames_in in inputs.items():
        want = reference_generate(short, frames_in)
        assert together[name].text_tokens == want["text_tokens"], name
        assert together[name].audio_tokens == want["audio_tokens"], name
        alone = run_sessions(ModelRunner.load(EngineConfig(kv_pages=3, **base)), {name: frames_in}, greedy)
        _same(together, alone, [name])
    runner.kv.check()
    assert runner.kv.tables.alloc.free == 9


def test_a_tiny_pool_refuses_who_cannot_get_a_minimum_and_reports_its_state(ctx40_ckpt):
    ckpt, _ = ctx40_ckpt
    cfg = EngineConfig(device="cpu", model_dir=str(ckpt), max_sessions=4, kv_policy="elastic", kv_page_size=4,
                       kv_min_seconds=0.72, kv_pages=7)  # promises of 3: two sessions, not three
    runner = ModelRunner.load(cfg)
    loop = EngineLoop(runner, max_waiting=0)
    sink = lambda event: None  # noqa: E731
    assert loop.admissions_free() == 2  # four free slots, but pages for two sessions' minimum
    a = loop.create_session(SamplingConfig(greedy=True), sink)
    b = loop.create_session(SamplingConfig(greedy=True), sink)
    assert a is not None and b is not None
    assert loop.create_session(SamplingConfig(greedy=True), sink) is None  # a free slot, but no pages
    assert loop.admissions_free() == 0
    assert loop.metrics.counters["sessions_rejected_total"] == 1
    for s in (a, b):
        s.push(_speech(2.4, 4).reshape(-1))
    for _ in range(20):
        loop.tick()
    status = loop.status(a.id)
    assert status["state"] == "running" and status["kv_window_seconds"] < 40 / 12.5
    metrics = loop.metrics.render()
    assert "lockstep:kv_pages_total 7" in metrics and "lockstep:kv_sessions_capped 2" in metrics
    assert loop.statuses()[0]["kv_window_seconds"] == status["kv_window_seconds"]
    loop.end_session(a.id, "client_gone")
    loop.tick()
    c = loop.create_session(SamplingConfig(greedy=True), sink)
    assert c is not None and loop.status(c.id)["kv_window_seconds"] is None  # waiting for its first frame
    for sid in list(loop.sessions):
        loop.end_session(sid, "done")
    loop.tick()
    runner.kv.check()
    assert runner.kv.tables.alloc.free == 7 and "lockstep:kv_pages_used 0" in loop.metrics.render()


def test_fp8_kv_runs_through_the_engine(tiny_wrap_ckpt, wav_inputs):
    """fp8 pages on CPU: the fused C step leaves the LM to the torch path, which quantizes each write."""
    from kernels import stack_cpu
    inputs = {p.stem: frames(read_audio(p)) for p in wav_inputs[:2]}
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=2,
                                           kv_dtype="fp8", kv_page_size=4))
    assert runner.kv.k.dtype == torch.float8_e4m3fn and runner.kv.k_scale is not None
    assert "KV pool in torch.float8_e4m3fn" in stack_cpu.describe(runner.lm, runner.mimi)
    out = run_sessions(runner, inputs, {k: SamplingConfig(greedy=True) for k in inputs})
    assert all(len(out[k].text_tokens) == len(inputs[k]) - 1 for k in inputs)
    assert runner.kv.k_scale.abs().sum() > 0  # scales were written
    runner.kv.check()
