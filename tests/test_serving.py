"""The engine loop over the tiny model: admission, input buffering, underruns, idle expiry, late
ticks and what the operator's log says."""
import logging
import threading
import time

import numpy as np
import pytest

from engine.config import EngineConfig, SamplingConfig
from engine.runner import ModelRunner
from engine.serving import EngineLoop
from engine.session import FrameOutput


@pytest.fixture(scope="module")
def runner(tiny_wrap_ckpt):
    return ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=2))


def collector():
    events = []
    return events, events.append


def test_admission_is_bounded_by_slots(runner):
    loop = EngineLoop(runner, max_waiting=0)
    a = loop.create_session(SamplingConfig(), collector()[1])
    b = loop.create_session(SamplingConfig(), collector()[1])
    assert a and b and loop.create_session(SamplingConfig(), collector()[1], wait=0.05) is None
    assert loop.metrics.counters["sessions_rejected_total"] == 1
    loop.end_session(a.id, "deleted")  # never joined: ends at once and frees its admission
    assert loop.create_session(SamplingConfig(), collector()[1]) is not None
    loop.drain()
    loop.end_session(b.id, "deleted")
    assert loop.create_session(SamplingConfig(), collector()[1]) is None


def test_join_after_first_full_frame_underrun_and_end(runner):
    loop = EngineLoop(runner)
    events, sink = collector()
    s = loop.create_session(SamplingConfig(greedy=True), sink, end_on_input_end=True)
    s.push(np.zeros(1000, np.float32))
    assert loop.tick().joins == []  # not a full frame yet
    s.push(np.zeros(920 + 1920, np.float32))
    plan = loop.tick()
    assert plan.joins == [(s.id, 0)] and plan.slots == [0]
    loop.tick()
    loop.tick()  # input exhausted: silence, counted as an underrun
    assert s.underruns == 1
    s.push(np.zeros(100, np.float32))
    s.end_input()
    loop.tick()  # the partial last frame is padded and stepped, then the session leaves
    plan = loop.tick()
    assert plan.leaves == [(s.id, 0)] and not loop.sessions
    frames = [e for e in events if isinstance(e, FrameOutput)]
    assert [f.frame for f in frames] == [0, 1, 2] and events[-1] == "input_end"


def test_buffer_bound_drops_oldest_and_idle_sessions_expire(runner):
    loop = EngineLoop(runner, max_buffer_frames=2, idle_timeout=0.0)
    events, sink = collector()
    s = loop.create_session(SamplingConfig(), sink)
    s.push(np.arange(5 * 1920, dtype=np.float32))
    assert s.dropped_samples == 3 * 1920
    frame, _ = s.pop_frame()
    assert frame[0] == 3 * 1920  # the newest audio was kept
    loop.tick()
    assert events == ["idle_timeout"] and not loop.sessions


def test_sessions_joining_and_ending_are_logged(runner, caplog):
    loop = EngineLoop(runner)
    s = loop.create_session(SamplingConfig(top_k=7, seed=3), collector()[1], end_on_input_end=True)
    s.push(np.zeros(2 * 1920, np.float32))
    s.end_input()
    with caplog.at_level(logging.INFO, logger="lockstep"):
        loop.run_offline()
    lines = [r.getMessage() for r in caplog.records if r.name == "lockstep"]
    assert f"session {s.id} joined slot 0 (audio temperature 0.8 top-k 7, text temperature 0.7 top-k 25, seed 3)" \
        in lines
    assert any(line.startswith(f"session {s.id} ended (input_end): ") and "0 underrun(s)" in line for line in lines)


def test_late_ticks_are_counted_and_reported(runner, caplog, monkeypatch):
    import engine.cadence as cadence
    monkeypatch.setattr(cadence, "LATE_REPORT_SECONDS", 0.3)
    loop = EngineLoop(runner)
    s = loop.create_session(SamplingConfig(greedy=True), collector()[1])
    s.push(np.zeros(40 * 1920, np.float32))
    step = runner.step

    def slow(slots, pcm):  # a step longer than its 80 ms frame
        time.sleep(0.1)
        return step(slots, pcm)

    monkeypatch.setattr(runner, "step", slow)
    with caplog.at_level(logging.INFO, logger="lockstep"):
        thread = threading.Thread(target=loop.run_realtime)
        thread.start()
        time.sleep(0.9)
        loop.stop()
        thread.join(timeout=5)
    assert loop.metrics.counters["late_ticks_total"] >= 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "late tick(s) in the last 0 s: the latest step took" in warnings[0]
    assert "with 1 session(s)" in warnings[0]
    loop.end_session(s.id, "done")
    loop.tick()


def test_a_stuck_loop_fails_liveness(runner, monkeypatch):
    import engine.cadence as cadence
    monkeypatch.setattr(cadence, "STALL_SECONDS", 0.3)
    loop = EngineLoop(runner)
    assert loop.stalled() is None  # not started
    s = loop.create_session(SamplingConfig(greedy=True), collector()[1])
    s.push(np.zeros(20 * 1920, np.float32))
    release, step = threading.Event(), runner.step

    def stuck(slots, pcm):  # a hung device
        release.wait(timeout=10)
        return step(slots, pcm)

    monkeypatch.setattr(runner, "step", stuck)
    loop.start()
    time.sleep(0.1)
    assert loop.stalled() is None
    time.sleep(0.5)
    assert "the engine loop has not come round for" in loop.stalled()
    release.set()
    time.sleep(0.2)
    assert loop.stalled() is None
    loop.stop()
    assert loop.stalled() == "the engine thread has ended"
    loop.end_session(s.id, "done")
    loop.tick()


def test_a_failing_sink_ends_its_own_session_only(runner):
    loop = EngineLoop(runner)
    good_events, good_sink = collector()

    def broken_sink(event):  # e.g. a protocol handler with a bug
        if isinstance(event, FrameOutput):
            raise ValueError("cannot encode")

    good = loop.create_session(SamplingConfig(greedy=True), good_sink, end_on_input_end=True)
    bad = loop.create_session(SamplingConfig(greedy=True), broken_sink, end_on_input_end=True)
    for s in (good, bad):
        s.push(np.zeros(8 * 1920, np.float32))
        s.end_input()
    loop.run_offline()
    frames = [e for e in good_events if isinstance(e, FrameOutput)]
    assert len(frames) == 8 - runner.max_delay and good_events[-1] == "input_end"
    assert bad.end_reason == "sink_error" and bad.frames_out == 0
    assert not loop.sessions


def test_failed_ticks_end_their_sessions_and_then_fail_liveness(runner, monkeypatch):
    loop = EngineLoop(runner)
    step = runner.step
    failing = threading.Event()
    failing.set()

    def flaky(slots, pcm):  # a device error inside the step
        if failing.is_set():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return step(slots, pcm)

    monkeypatch.setattr(runner, "step", flaky)
    loop.start()
    try:
        ended = []
        for _ in range(3):  # each failed tick ends the sessions it stepped; empty ticks do not heal
            assert loop.stalled() is None
            events, sink = collector()
            s = loop.create_session(SamplingConfig(greedy=True), sink)
            s.push(np.zeros(4 * 1920, np.float32))
            deadline = time.monotonic() + 5
            while s.end_reason is None and time.monotonic() < deadline:
                time.sleep(0.02)
            ended.append(s.end_reason)
            time.sleep(0.2)
        assert ended == ["engine_error"] * 3
        assert loop.metrics.counters["tick_failures_total"] == 3
        assert loop.stalled() == ("the last 3 ticks failed (RuntimeError: CUDA error: an illegal memory "
                                  "access was encountered)")
        failing.clear()  # the device recovers: the next session is served and liveness with it
        events, sink = collector()
        s = loop.create_session(SamplingConfig(greedy=True), sink)
        s.push(np.zeros(4 * 1920, np.float32))
        deadline = time.monotonic() + 5
        while s.frames_out == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.frames_out > 0 and s.end_reason is None and loop.stalled() is None
        loop.end_session(s.id, "done")
    finally:
        loop.stop()


def test_status_follows_a_session_from_waiting_to_gone(runner):
    loop = EngineLoop(runner)
    s = loop.create_session(SamplingConfig(greedy=True), collector()[1])
    s.push(np.zeros(1920 + 960, np.float32))
    assert loop.status(s.id)["state"] == "waiting" and loop.status(s.id)["buffered_seconds"] == 0.12
    loop.tick()
    status = loop.status(s.id)
    assert status["state"] == "running" and status["slot"] == 0 and status["buffered_seconds"] == 0.04
    loop.tick()  # input runs dry: an underrun
    assert loop.status(s.id)["underruns"] == 1 and loop.status(s.id)["frames_out"] == 1
    assert [st["id"] for st in loop.statuses()] == [s.id]
    loop.end_session(s.id, "done")
    assert loop.status(s.id)["state"] == "ending"
    loop.tick()
    assert loop.status(s.id) is None and loop.statuses() == []


def test_a_join_that_fails_ends_its_own_session_only(runner, monkeypatch, caplog):
    loop = EngineLoop(runner)
    good_events, good_sink = collector()
    bad_events, bad_sink = collector()
    good = loop.create_session(SamplingConfig(greedy=True), good_sink, end_on_input_end=True)
    bad = loop.create_session(SamplingConfig(greedy=True, seed=13), bad_sink, end_on_input_end=True)
    real_join = runner.join

    def join(slot, sampling, owner=None):  # settings the slot table cannot hold, say
        if sampling.seed == 13:
            raise OverflowError("cannot hold it")
        real_join(slot, sampling, owner)
    monkeypatch.setattr(runner, "join", join)
    for s in (good, bad):
        s.push(np.zeros(8 * 1920, np.float32))
        s.end_input()
    with caplog.at_level(logging.ERROR, logger="lockstep"):
        loop.run_offline()
    frames = [e for e in good_events if isinstance(e, FrameOutput)]
    assert len(frames) == 8 - runner.max_delay and good_events[-1] == "input_end"
    assert bad_events == ["join_failed"] and loop.failed_ticks == 0
    assert f"session {bad.id}: joining slot" in caplog.text


def test_an_input_that_ends_before_a_frame_ends_its_session(runner):
    loop = EngineLoop(runner, idle_timeout=60.0)
    events, sink = collector()
    s = loop.create_session(SamplingConfig(), sink)  # even without end_on_input_end: it could never join
    s.end_input()
    assert loop.tick().joins == [] and events == ["input_end"] and not loop.sessions


def test_a_realtime_sessions_lag_comes_back_and_an_uploads_does_not(runner):
    """A standing backlog (a stall, a client's burst) is dropped down to half the limit once a whole
    window stayed above it; a backlog that drains in the window is left alone, and so is an upload."""
    from engine.session import LAG_WINDOW_TICKS
    loop = EngineLoop(runner, max_buffer_frames=250, max_input_lag=0.3, max_waiting=None)
    live = loop.create_session(SamplingConfig(greedy=True), collector()[1], realtime=True)
    upload = loop.create_session(SamplingConfig(greedy=True), collector()[1])
    assert live.max_lag == 7200 and upload.max_lag is None
    for s in (live, upload):
        s.push(np.arange(10 * 24000, dtype=np.float32))  # a 10 s burst
    for _ in range(LAG_WINDOW_TICKS):
        for s in (live, upload):
            s.pop_frame()
            s.push(np.full(1920, -1, np.float32))  # and real time from then on
    # Judged right after the window's last pop, when 10 s - 1 frame was waiting; one push since.
    assert live.buffered_samples() == 3600 + 1920 and live.lag_dropped_samples == 10 * 24000 - 1920 - 3600
    assert live.dropped_samples == live.lag_dropped_samples and loop.status(live.id)["lag_dropped_samples"] > 0
    assert upload.buffered_samples() == 10 * 24000 and upload.dropped_samples == 0
    frame, _ = live.pop_frame()  # what is kept is the newest audio
    assert frame[0] == -1 and live.underruns == 0
    burst = loop.create_session(SamplingConfig(), collector()[1], realtime=True)
    burst.push(np.zeros(6 * 1920, np.float32))
    for _ in range(LAG_WINDOW_TICKS):  # drains within the window: a burst, not a standing lag
        burst.pop_frame()
    assert burst.lag_dropped_samples == 0 and burst.underruns == LAG_WINDOW_TICKS - 6


def test_sample_queue_takes_and_drops_across_chunks():
    from engine.session import SampleQueue
    q = SampleQueue()
    for start in range(0, 100, 7):
        q.push(np.arange(start, min(start + 7, 100), dtype=np.float32))
    q.push(np.zeros(0, np.float32))
    assert q.size == 100
    assert q.take(10).tolist() == list(range(10))
    q.drop(15)
    assert q.take(3).tolist() == [25, 26, 27] and q.size == 72
    assert q.take(1000).tolist() == list(range(28, 100)) and q.size == 0 and len(q.take(5)) == 0


def test_the_realtime_loop_serves_between_ticks_even_when_behind(runner, monkeypatch):
    """`wait` is called on every pass, with 0 when the loop is behind: a slow engine still serves
    its API processes; `after_tick` follows every tick."""
    loop = EngineLoop(runner)
    waits, ticks = [], []
    step = runner.step

    def slow(slots, pcm):
        time.sleep(0.1)
        return step(slots, pcm)

    monkeypatch.setattr(runner, "step", slow)
    s = loop.create_session(SamplingConfig(greedy=True), collector()[1])
    s.push(np.zeros(40 * 1920, np.float32))
    thread = threading.Thread(target=loop.run_realtime,
                              kwargs={"wait": lambda t: (waits.append(t), time.sleep(min(t, 0.01))),
                                      "after_tick": lambda: ticks.append(time.monotonic())})
    thread.start()
    time.sleep(0.6)
    loop.stop()
    thread.join(5)
    assert len(ticks) >= 3 and waits.count(0.0) >= 2
    loop.end_session(s.id, "done")
    loop.tick()
