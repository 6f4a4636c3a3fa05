"""The KV pool's page allocator: which pages are free, who holds which, and what is promised.

Pages are numbered 1..num_pages; page 0 is the pool's scratch page (every unmapped page-table entry
points there, and padded rows write there), never handed out. An owner (a session: admitted, then
stepping in a slot) may be *promised* a number of pages when it is admitted; the allocator then
never lets anyone else take the free pages that promise needs. Beyond its promise an owner may
take more (its context growing) only while `watermark` unpromised pages stay free, so that a caller
who arrives can still be promised its minimum: admission comes before growth.

Pure Python and thread-safe (admission runs on the API's threads, growth on the engine's); the
model-free capacity benchmark (`bench/capacity.py`) runs this very class.
"""
from __future__ import annotations

import threading
from typing import Hashable


class PageAllocator:
    def __init__(self, num_pages: int, watermark: int = 0):
        if num_pages < 0 or watermark < 0:
            raise ValueError(f"num_pages and watermark must be >= 0, got {num_pages}, {watermark}")
        self.num_pages = num_pages
        self.watermark = watermark
        self._free = list(range(num_pages, 0, -1))  # a stack: pop() hands out the lowest page first
        self._held: dict[Hashable, list[int]] = {}
        self._promised: dict[Hashable, int] = {}
        self._owed = 0  # pages promised and not yet taken, over all owners
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def owed(self) -> int:
        """Free pages that promises still hold back."""
        return self._owed

    @property
    def promises(self) -> int:
        """Owners holding a promise (sessions admitted)."""
        return len(self._promised)

    def held(self, owner: Hashable) -> int:
        return len(self._held.get(owner, ()))

    def promised(self, owner: Hashable) -> int | None:
        """The pages promised to `owner`, or None when it holds no promise."""
        return self._promised.get(owner)

    def can_promise(self, pages: int) -> bool:
        return len(self._free) - self._owed >= pages

    def promise(self, owner: Hashable, pages: int) -> bool:
        """Promises `owner` it can take `pages` pages (counting those it holds); False, and nothing
        promised, when the free pages cannot cover that beside the other promises. An owner with a
        promise keeps it (True)."""
        if pages < 0:
            raise ValueError(f"cannot promise {pages} pages")
        with self._lock:
            if owner in self._promised:
                return True
            owe = max(0, pages - len(self._held.get(owner, ())))
            if len(self._free) - self._owed < owe:
                return False
            self._promised[owner] = pages
            self._owed += owe
            return True

    def take(self, owner: Hashable) -> int | None:
        """A free page for `owner`: always within its promise, beyond it only while `watermark`
        unpromised pages stay free; None when it may not have one."""
        with self._lock:
            held = self._held.setdefault(owner, [])
            if len(held) < self._promised.get(owner, 0):
                self._owed -= 1
            elif len(self._free) - self._owed - 1 < self.watermark:
                if not held:
                    del self._held[owner]
                return None
            page = self._free.pop()
            held.append(page)
            return page

    def release(self, owner: Hashable) -> list[int]:
        """Every page `owner` holds goes back to the pool and its promise lapses; returns the pages."""
        with self._lock:
            pages = self._held.pop(owner, [])
            promised = self._promised.pop(owner, 0)
            self._owed -= max(0, promised - len(pages))
            self._free.extend(reversed(sorted(pages)))
            return pages

    def owners(self) -> set[Hashable]:
        with self._lock:
            return set(self._held) | set(self._promised)

    def check(self) -> None:
        """Raises AssertionError when the books do not balance (tests, the soak)."""
        with self._lock:
            held = [p for pages in self._held.values() for p in pages]
            assert len(held) == len(set(held)), "a page is held twice"
            assert not set(held) & set(self._free), "a held page is also free"
            assert sorted(held + self._free) == list(range(1, self.num_pages + 1)), "pages lost or invented"
            owed = sum(max(0, n - len(self._held.get(o, ()))) for o, n in self._promised.items())
            assert owed == self._owed, f"owed {self._owed}, promises say {owed}"
            assert len(self._free) >= self._owed, "promises exceed the free pages"
