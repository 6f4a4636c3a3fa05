"""Each slot's page table over the KV pool, and the policy that fills it: host-side (numpy), no model.

A slot's history is a ring of `pages_per_slot` logical pages of `page_size` positions (together at
least the context): position p is row p % page_size of logical page (p // page_size) % pages_per_slot,
which the slot's page table maps to a page of the pool (0, the scratch page, where none is mapped).
A slot also has a window W: the query at position p attends to positions p - W + 1 .. p (of those
the context still covers). Tables change only when a slot's position reaches a page start, every
`page_size` frames, so a tick has nothing to do for most slots.

At the start of absolute page a (position p = a * page_size):
- the page for p is mapped, unless the slot could not get it ahead of time; then it takes a free
  page if it may, else it reuses its own oldest page (positions that leave its window);
- the next page is taken now, one page ahead, if the slot may have it (within its promise, or
  growth while the allocator keeps its watermark free). A slot that cannot is *capped*: its window
  becomes what it holds, W = p - first + 1 (`first`: the oldest position still held), and slides
  from there, page after page, until free pages let it grow again;
- a slot that holds its whole history and is not capped has W = the context.
Taking pages one ahead is what keeps a capped window exact: when a slot learns it cannot grow it
has seen no more than it will keep seeing, so a session capped from its start attends exactly as a
model whose context is W. `reserve` promises each session all its pages, so it never caps;
`elastic` promises `min_pages` and lets sessions grow past them while free pages last.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable

import numpy as np

from engine.kv.alloc import PageAllocator

POLICIES = ("reserve", "elastic")
# Elastic growth keeps free, beside the promises, the minimum of as many callers as the open slots
# could still admit, up to this share of the pool (and at least one caller's): a pool grown full
# would otherwise refuse every caller in a burst (bench capacity: 11% of callers refused at 96
# offered on an H100 in bf16, against 0.1% with this headroom, for 59% of calls capped, not 54%).
HEADROOM = 0.1


class PoolFull(RuntimeError):
    """The pool cannot promise a session its minimum."""


def min_pages(min_positions: int, page_size: int, pages_per_slot: int) -> int:
    """Pages that guarantee a window of `min_positions` (a capped slot holding n pages sees
    (n - 1) * page_size + 1 positions); at least 2, the page written and the one taken ahead."""
    return min(pages_per_slot, max(2, math.ceil((min_positions - 1) / page_size) + 1))


@dataclass
class _Slot:
    owner: Hashable
    lo: int = 0  # absolute page number of the oldest page held
    hi: int = -1  # of the newest page mapped (one past the page written, when taken ahead)
    first: int = 0  # the oldest position still held (0 while nothing was given up)
    next: int = 0  # the next position at which the table may change (a page start)


class PageTables:
    def __init__(self, slots: int, context: int, page_size: int, allocator: PageAllocator,
                 policy: str = "reserve", min_positions: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown KV policy {policy!r}; use {' or '.join(POLICIES)}")
        if page_size < 1 or context < 1:
            raise ValueError(f"page_size and context must be >= 1, got {page_size}, {context}")
        self.context, self.page_size, self.policy = context, page_size, policy
        self.pages_per_slot = -(-context // page_size)
        self.promise = (self.pages_per_slot if policy == "reserve"
                        else min_pages(context if min_positions is None else min_positions, page_size,
                                       self.pages_per_slot))
        self.alloc = allocator
        self.table = np.zeros((slots, self.pages_per_slot), dtype=np.int32)
        self.window = np.full(slots, context, dtype=np.int32)
        self._slots: dict[int, _Slot] = {}
        self._slot_of: dict[Hashable, int] = {}
        self.dirty: set[int] = set()
        self._burst = max(1, int(HEADROOM * allocator.num_pages) // self.promise)
        self._set_watermark()

    def _set_watermark(self) -> None:
        """Growth leaves the minimum of the callers the open slots can still admit (see HEADROOM)."""
        if self.policy == "elastic":
            open_slots = len(self.table) - self.alloc.promises
            self.alloc.watermark = self.promise * min(self._burst, max(1, open_slots))

    @property
    def guaranteed_window(self) -> int:
        """Positions every admitted session is sure to attend over (its whole context under reserve)."""
        return min(self.context, (self.promise - 1) * self.page_size + 1)

    def can_admit(self) -> bool:
        return self.alloc.can_promise(self.promise)

    def admit(self, owner: Hashable) -> bool:
        """Promises `owner` its minimum (True when it already holds a promise); False when the pool
        cannot."""
        admitted = self.alloc.promise(owner, self.promise)
        self._set_watermark()
        return admitted

    def join(self, slot: int, owner: Hashable) -> None:
        """`owner` starts at position 0 in `slot` (whatever held the slot is released first)."""
        if slot in self._slots:
            self.leave(slot)
        if owner in self._slot_of:
            raise ValueError(f"{owner!r} already holds slot {self._slot_of[owner]}")
        if not self.admit(owner):
            raise PoolFull(f"the KV pool cannot promise a session its {self.promise} page(s): "
                           f"{self.alloc.free} free, {self.alloc.owed} promised to others")
        self._slots[slot] = _Slot(owner)
        self._slot_of[owner] = slot
        self.advance(slot, 0)

    def leave(self, slot: int) -> None:
        """The slot's session ended: its pages go back to the pool."""
        state = self._slots.pop(slot, None)
        if state is None:
            return
        del self._slot_of[state.owner]
        self.alloc.release(state.owner)
        self._set_watermark()
        self.table[slot] = 0
        self.window[slot] = self.context
        self.dirty.add(slot)

    def release(self, owner: Hashable) -> None:
        """`owner` is gone: its slot's pages, or the promise it was admitted with, go back."""
        if owner in self._slot_of:
            self.leave(self._slot_of[owner])
        else:
            self.alloc.release(owner)
            self._set_watermark()

    def slot_of(self, owner: Hashable) -> int | None:
        return self._slot_of.get(owner)

    def advance(self, slot: int, position: int) -> None:
        """Makes `slot`'s table ready for writing `position` (the slot's next one); positions are
        met in order, or skipped over (a benchmark filling a context), never revisited."""
        state = self._slots.get(slot)
        while state is not None and state.next <= position:
            self._page_start(slot, state, state.next)

    def _page_start(self, slot: int, s: _Slot, p: int) -> None:
        ps, M = self.page_size, self.pages_per_slot
        a = p // ps
        row = self.table[slot]
        if a > s.hi:
            page = self.alloc.take(s.owner) if s.hi - s.lo + 1 < M else None
            if page is None:  # reuse the oldest page (a full ring: the same entry, overwritten row by row)
                page = row[s.lo % M]
                row[s.lo % M] = 0
                if s.hi - s.lo + 1 < M:
                    s.first = max(s.first, (s.lo + 1) * ps)
                s.lo += 1
            row[a % M] = page
            s.hi = a
        capped = False
        if s.hi == a and s.hi - s.lo + 1 < M:
            page = self.alloc.take(s.owner)
            capped = page is None
            if not capped:
                row[(a + 1) % M] = page
                s.hi = a + 1
        self.window[slot] = min(self.context, p - s.first + 1) if capped or s.first else self.context
        s.next = p + ps
        self.dirty.add(slot)

    def capped(self) -> int:
        """Sessions whose window is narrower than the context."""
        return sum(1 for slot in self._slots if self.window[slot] < self.context)

    def held(self, slot: int) -> int:
        """Pages `slot` holds."""
        state = self._slots.get(slot)
        return 0 if state is None else self.alloc.held(state.owner)

    def check(self) -> None:
        """Raises AssertionError when a table disagrees with the allocator (tests, the soak)."""
        self.alloc.check()
        for slot in range(len(self.table)):
            state = self._slots.get(slot)
            mapped = sorted(int(p) for p in self.table[slot] if p)
            if state is None:
                assert not mapped and self.window[slot] == self.context, f"slot {slot} is free but holds pages"
                continue
            assert mapped == sorted(self.alloc._held.get(state.owner, [])), f"slot {slot}'s table and pages differ"
            assert 1 <= self.window[slot] <= self.context
