"""The KV page allocator on its own: promises, growth above the watermark, release, no model."""
import random
import threading

import pytest

from engine.kv.alloc import PageAllocator


def test_pages_are_handed_out_lowest_first_and_come_back():
    a = PageAllocator(5)
    assert [a.take("x") for _ in range(3)] == [1, 2, 3]
    assert a.take("y") == 4 and a.used == 4 and a.free == 1
    assert sorted(a.release("x")) == [1, 2, 3] and a.free == 4
    assert a.take("z") == 1  # the lowest free page again
    a.check()
    assert a.release("nobody") == []


def test_a_promise_holds_back_pages_from_everyone_else():
    a = PageAllocator(6)
    assert a.promise("x", 4) and a.owed == 4
    assert a.take("y") == 1 and a.take("y") == 2
    assert a.take("y") is None  # the 4 left are x's
    assert not a.can_promise(1) and not a.promise("z", 1)
    assert [a.take("x") for _ in range(4)] == [3, 4, 5, 6] and a.owed == 0
    assert a.take("x") is None  # past its promise, and nothing free
    assert a.promise("x", 9)  # an owner with a promise keeps it
    a.check()
    a.release("y")
    assert a.can_promise(2) and not a.can_promise(3)


def test_growth_keeps_the_watermark_free_for_the_next_caller():
    a = PageAllocator(10, watermark=3)
    assert a.promise("x", 2)
    grown = [a.take("x") for _ in range(8)]
    assert grown[:7] == list(range(1, 8)) and grown[7] is None  # 2 promised + 5 grown, 3 kept free
    assert a.can_promise(3) and a.promise("y", 3)
    assert a.take("x") is None and [a.take("y") for _ in range(3)] == [8, 9, 10]
    a.check()


def test_release_of_a_partly_used_promise_returns_what_was_owed():
    a = PageAllocator(4)
    assert a.promise("x", 3) and a.take("x") == 1
    assert a.owed == 2
    a.release("x")
    assert a.owed == 0 and a.free == 4 and a.owners() == set()
    a.check()


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        PageAllocator(-1)
    with pytest.raises(ValueError):
        PageAllocator(3).promise("x", -2)


def test_the_books_balance_under_concurrent_churn():
    a = PageAllocator(200, watermark=5)
    rng = random.Random(0)

    def churn(seed):
        r = random.Random(seed)
        for i in range(2000):
            owner = (seed, i % 7)
            roll = r.random()
            if roll < 0.2:
                a.promise(owner, r.randrange(1, 12))
            elif roll < 0.8:
                a.take(owner)
            else:
                a.release(owner)
    threads = [threading.Thread(target=churn, args=(rng.randrange(1 << 30),)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a.check()
    for owner in a.owners():
        a.release(owner)
    assert a.free == 200 and a.owed == 0
