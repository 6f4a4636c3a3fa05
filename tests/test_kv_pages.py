"""Page tables and the reserve / elastic policies, on the host alone: every position a window covers
is where the table says, capped windows are exact, pages come back, no model."""
import random

import pytest

from engine.kv.alloc import PageAllocator
from engine.kv.pages import PageTables, PoolFull, min_pages


class Written:
    """Which position each (page, row) of the pool holds, as writes through the tables leave it."""

    def __init__(self, tables: PageTables):
        self.tables, self.at = tables, {}

    def write(self, slot: int, p: int) -> None:
        t = self.tables
        t.advance(slot, p)
        page = int(t.table[slot, (p // t.page_size) % t.pages_per_slot])
        assert page != 0, f"slot {slot} writes position {p} to the scratch page"
        self.at[(page, p % t.page_size)] = (slot, p)

    def check_window(self, slot: int, p: int) -> int:
        """Every position the query at p attends to is held where the table says; returns W."""
        t = self.tables
        w = int(t.window[slot])
        for j in range(max(0, p - t.context + 1, p - w + 1), p + 1):
            page = int(t.table[slot, (j // t.page_size) % t.pages_per_slot])
            assert self.at.get((page, j % t.page_size)) == (slot, j), f"slot {slot} lost position {j} at {p}"
        return w


def _tables(pages, slots=4, context=20, page_size=4, policy="reserve", min_positions=None):
    return PageTables(slots, context, page_size, PageAllocator(pages, watermark=0 if policy == "reserve" else
                                                                 min_pages(min_positions or context, page_size,
                                                                           -(-context // page_size))),
                      policy, min_positions)


def test_min_pages_guarantee_the_window_asked_for():
    assert min_pages(750, 16, 188) == 48 and (48 - 1) * 16 + 1 >= 750 > (47 - 1) * 16 + 1
    assert min_pages(1, 16, 188) == 2 and min_pages(10_000, 16, 188) == 188


def test_reserve_holds_the_whole_context_and_wraps_in_place():
    t = _tables(pages=3 * 5, slots=3)  # 20 / 4 = 5 pages a session
    w = Written(t)
    t.join(0, "a")
    for p in range(53):  # past two wraps of a 20-position ring
        w.write(0, p)
        assert w.check_window(0, p) == 20
        if p == 19:
            row = t.table[0].copy()
    assert (t.table[0] == row).all() and t.held(0) == 5  # after its fifth page, nothing moves
    t.check()
    t.leave(0)
    assert t.alloc.free == 15 and (t.table[0] == 0).all()
    t.check()


def test_reserve_admits_only_what_it_can_hold_whole():
    t = _tables(pages=12, slots=4)  # 2 sessions of 5 pages, not 3
    assert t.admit("a") and t.admit("b") and not t.can_admit() and not t.admit("c")
    t.join(1, "a")
    with pytest.raises(PoolFull, match="cannot promise"):
        t.join(2, "c")
    t.release("b")  # never joined: its promise lapses
    assert t.admit("c")


def test_elastic_sessions_grow_while_pages_are_free():
    t = _tables(pages=30, slots=3, context=40, page_size=4, policy="elastic", min_positions=9)
    assert t.promise == 3 and t.guaranteed_window == 9  # (3 - 1) * 4 + 1
    w = Written(t)
    t.join(0, "a")
    for p in range(45):
        w.write(0, p)
        assert w.check_window(0, p) == 40  # uncapped: the whole context
    t.check()


def test_a_session_capped_from_its_start_slides_an_exact_window():
    """A pool that can give one session only its promise: the window is fixed at the first page
    start where the next page is refused, then each later page start reuses the oldest page."""
    t = _tables(pages=3, slots=2, context=40, page_size=4, policy="elastic", min_positions=9)
    w = Written(t)
    t.join(0, "a")
    windows = []
    for p in range(60):
        w.write(0, p)
        windows.append(w.check_window(0, p))
    # Pages 0 and 1 taken at once, page 2 at position 4, page 3 refused at position 8: W = 9 from there.
    assert windows[:8] == [40] * 8 and windows[8:] == [9] * 52
    assert t.held(0) == 3 and t.capped() == 1
    t.check()


def test_a_capped_window_grows_again_when_pages_free():
    t = _tables(pages=8, slots=2, context=40, page_size=4, policy="elastic", min_positions=5)
    w = Written(t)
    t.join(0, "a")
    t.join(1, "b")
    for p in range(32):
        for s in (0, 1):
            w.write(s, p)
            w.check_window(s, p)
    assert t.capped() == 2
    before = int(t.window[0])
    t.leave(1)
    for p in range(32, 48):
        w.write(0, p)
        w.check_window(0, p)
    assert t.window[0] == before + 12  # three page starts, a page taken at each: 4 positions more each
    t.check()


def test_admission_refuses_what_cannot_get_its_minimum():
    t = _tables(pages=7, slots=4, context=40, page_size=4, policy="elastic", min_positions=9)
    # promise 3, watermark 3: one session may grow until 3 unpromised pages are left.
    t.join(0, "a")
    for p in range(24):
        t.advance(0, p)
    assert t.held(0) == 4 and t.can_admit()  # grew by one page, then kept 3 free
    t.join(1, "b")
    assert not t.can_admit() and not t.admit("c")
    t.leave(0)
    assert t.admit("c")
    t.check()


@pytest.mark.parametrize("policy", ["reserve", "elastic"])
def test_churn_keeps_every_window_held_and_leaks_no_page(policy):
    rng = random.Random(policy)
    t = _tables(pages=23, slots=5, context=17, page_size=3, policy=policy, min_positions=6)
    w = Written(t)
    live: dict[int, tuple[str, int]] = {}
    n = 0
    for _ in range(3000):
        for slot in range(5):
            if slot in live and rng.random() < 0.02:
                t.leave(slot)
                del live[slot]
            elif slot not in live and rng.random() < 0.1 and t.can_admit():
                n += 1
                t.join(slot, f"s{n}")
                live[slot] = (f"s{n}", 0)
        for slot, (owner, p) in list(live.items()):
            w.write(slot, p)
            assert 1 <= w.check_window(slot, p) <= 17
            live[slot] = (owner, p + 1)
        if policy == "reserve":
            assert t.capped() == 0
    t.check()
    for slot in list(live):
        t.leave(slot)
    assert t.alloc.free == 23 and t.alloc.owed == 0
    t.check()


def test_unknown_policy_and_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="unknown KV policy"):
        PageTables(2, 10, 4, PageAllocator(5), "lru")
    with pytest.raises(ValueError):
        PageTables(2, 10, 0, PageAllocator(5))


@pytest.mark.parametrize("slots,left", [(10, 9), (2, 3)])
def test_elastic_growth_leaves_room_for_a_burst_of_callers(slots, left):
    """A tenth of the pool (three callers' minimum) stays free for callers while slots are open to
    them; with one open slot, one caller's minimum."""
    t = _tables(pages=100, slots=slots, context=400, page_size=4, policy="elastic", min_positions=9)
    assert t.promise == 3
    t.join(0, "a")
    for p in range(400):
        t.advance(0, p)
    assert t.alloc.free - t.alloc.owed == left and t.held(0) == 100 - left and t.capped() == 1
    for owner in range(left // 3):
        assert t.admit(owner)
    assert not t.can_admit()
    t.release("a")
    assert t.alloc.free == 100 and t.can_admit()
    t.check()
