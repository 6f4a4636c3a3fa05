"""The engine loop over the tiny model: admission, input buffering, underruns, idle expiry."""
import numpy as np
import pytest

from engine.config import EngineConfig, SamplingConfig
from engine.runner import ModelRunner
from engine.serving import EngineLoop
from engine.session import FrameOutput


@pytest.fixture(scope="module")
def runner(tiny_wrap_ckpt):
    return ModelRunner.load(EngineConfig(model_dir=str(tiny_wrap_ckpt), max_sessions=2))


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


def test_spawn_builds_and_ticks_on_one_thread(runner, monkeypatch):
    """`EngineLoop.spawn`: the loop is built on the thread that then ticks it, and the caller gets it
    once built."""
    import threading
    import time
    threads = {}

    def build():
        threads["build"] = threading.get_ident()
        return EngineLoop(runner, max_buffer_frames=10)

    step = runner.step

    def record(*args):
        threads.setdefault("step", threading.get_ident())
        return step(*args)

    monkeypatch.setattr(runner, "step", record)
    loop = EngineLoop.spawn(build)
    try:
        events, sink = collector()
        session = loop.create_session(SamplingConfig(greedy=True), sink)
        session.push(np.zeros(3 * runner.frame_size, dtype=np.float32))
        deadline = time.monotonic() + 10
        while "step" not in threads and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        loop.stop()
    assert threads["step"] == threads["build"] != threading.get_ident()
    assert not loop._thread.is_alive()


def test_spawn_reraises_what_building_raised():
    def build():
        raise ValueError("no weights here")

    with pytest.raises(ValueError, match="no weights here"):
        EngineLoop.spawn(build)
