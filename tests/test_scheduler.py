"""The scheduler's plans, with no model at all."""
import pytest

from engine.scheduler import Scheduler


def test_join_step_leave_and_slot_reuse():
    s = Scheduler(2)
    for name in "abc":
        s.submit(name)
    p = s.tick()
    assert p.joins == [("a", 0), ("b", 1)] and p.step == [("a", 0), ("b", 1)] and p.leaves == []
    assert list(s.waiting) == ["c"]
    s.finish("a")
    p = s.tick()  # a's slot is freed and taken by c in the same tick
    assert p.leaves == [("a", 0)] and p.joins == [("c", 0)] and p.slots == [0, 1]
    s.finish("b")
    s.finish("c")
    p = s.tick()
    assert sorted(p.leaves) == [("b", 1), ("c", 0)] and p.step == [] and s.free_slots == 2


def test_join_waits_for_input_without_blocking_others():
    s = Scheduler(3)
    s.submit("quiet")
    s.submit("talker")
    has = {"quiet": False, "talker": True}
    p = s.tick(lambda x: has[x])
    assert p.joins == [("talker", 0)] and list(s.waiting) == ["quiet"]
    has["quiet"] = True
    p = s.tick(lambda x: has[x])
    assert p.joins == [("quiet", 1)] and p.slots == [0, 1]


def test_finish_before_join_and_errors():
    s = Scheduler(1)
    s.submit("a")
    s.submit("b")
    s.finish("b")  # never joined: just dropped from the queue
    p = s.tick()
    assert p.joins == [("a", 0)] and not s.waiting
    with pytest.raises(ValueError):
        s.submit("a")
    with pytest.raises(ValueError):
        Scheduler(0)
    s.finish("unknown")  # harmless
    assert s.tick().step == [("a", 0)]


def test_ticks_are_numbered_and_stepping_order_is_by_slot():
    s = Scheduler(4)
    for name in "dcba":
        s.submit(name)
    plans = [s.tick() for _ in range(3)]
    assert [p.tick for p in plans] == [0, 1, 2]
    assert plans[-1].step == [("d", 0), ("c", 1), ("b", 2), ("a", 3)]
