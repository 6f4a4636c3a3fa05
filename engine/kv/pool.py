"""The LM temporal transformer's KV pool: pages of keys and values on the model's device, which every
slot reaches through its page table (`engine.kv.pages`), and what the engine reads of it.

Per layer the pool holds k and v as [pages + 1, heads, page_size, head_dim] (page 0 is scratch),
and with fp8 a float32 scale per (page, head, row). The page tables ([slots, pages_per_slot] int32)
and windows ([slots] int32) are static device buffers: the host changes them between ticks, where
a slot reaches a page start, so a tick stays one CUDA-graph replay. On CPU they share the host
tables' memory, so there is nothing to copy.
"""
from __future__ import annotations

from typing import Hashable

import numpy as np
import torch

from engine.config import FRAME_RATE
from engine.kv.alloc import PageAllocator
from engine.kv.pages import PageTables
from kernels.paged_attention import FP8, PagedKV


def page_bytes(layers: int, heads: int, head_dim: int, page_size: int, dtype: torch.dtype) -> int:
    """Bytes of one page over every layer: keys and values, and their scales for fp8."""
    per_row = 2 * layers * heads * (head_dim * dtype.itemsize + (4 if dtype == FP8 else 0))
    return per_row * page_size


def dtype_name(dtype: torch.dtype) -> str:
    return "fp8 (e4m3)" if dtype == FP8 else str(dtype).removeprefix("torch.")


class KVPool:
    def __init__(self, layers: int, heads: int, head_dim: int, context: int, *, slots: int, pages: int,
                 page_size: int, dtype: torch.dtype, device, policy: str = "reserve",
                 min_positions: int | None = None):
        tables = PageTables(slots, context, page_size, PageAllocator(pages), policy, min_positions)
        self.tables, self.context, self.page_size = tables, context, page_size
        self.dtype, self.device = dtype, torch.device(device)
        shape = (layers, pages + 1, heads, page_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        fp8 = dtype == FP8
        self.k_scale = torch.zeros(shape[:-1], device=self.device) if fp8 else None
        self.v_scale = torch.zeros(shape[:-1], device=self.device) if fp8 else None
        if self.device.type == "cpu":  # the host tables themselves: nothing to copy
            self.page_table, self.window = torch.from_numpy(tables.table), torch.from_numpy(tables.window)
            tables.dirty.clear()
        else:
            self.page_table = torch.from_numpy(tables.table).to(self.device)
            self.window = torch.from_numpy(tables.window).to(self.device)
        self.layers = [PagedKV(self.k[i], self.v[i], None if not fp8 else self.k_scale[i],
                               None if not fp8 else self.v_scale[i], self.page_table, self.window)
                       for i in range(layers)]

    @property
    def page_bytes(self) -> int:
        L, _, H, ps, D = self.k.shape
        return page_bytes(L, H, D, ps, self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None)

    # ---- sessions ---------------------------------------------------------------------------------
    def can_admit(self) -> bool:
        return self.tables.can_admit()

    def admittable(self) -> int:
        """How many more sessions the pool can promise their minimum now."""
        alloc = self.tables.alloc
        return max(0, alloc.free - alloc.owed) // self.tables.promise

    def admit(self, owner: Hashable) -> bool:
        """Promises `owner` its minimum now (True when it already holds a promise); False when the
        pool cannot."""
        return self.tables.admit(owner)

    def join(self, slot: int, owner: Hashable) -> None:
        self.tables.join(slot, owner)
        self.sync()

    def leave(self, slot: int) -> None:
        self.tables.leave(slot)
        self.sync()

    def release(self, owner: Hashable) -> None:
        """`owner` is gone, joined or not: whatever it holds goes back to the pool."""
        self.tables.release(owner)
        self.sync()

    def reset(self) -> None:
        """Every page back in the pool and every promise dropped: for a new engine loop, whose
        scheduler starts with every slot free."""
        for owner in self.tables.alloc.owners():
            self.tables.release(owner)
        self.sync()

    def prepare(self, slots: list[int], positions: list[int]) -> None:
        """Before a step: each slot's table ready for writing its position (a slot's first position
        past a page start is where anything changes)."""
        tables = self.tables
        for slot, position in zip(slots, positions):
            tables.advance(slot, position)
        self.sync()

    def fill(self, slot: int, position: int) -> None:
        """Takes the pages `slot` would hold at `position` had it run there (benchmarks, the probe)."""
        self.tables.advance(slot, position)
        self.sync()

    def sync(self) -> None:
        """Copies the rows the host changed to the device buffers (nothing to do on CPU)."""
        tables = self.tables
        if not tables.dirty:
            return
        rows = sorted(tables.dirty)
        tables.dirty.clear()
        if self.device.type == "cpu":
            return
        idx = torch.tensor(rows, device=self.device)
        self.page_table.index_copy_(0, idx, torch.from_numpy(tables.table[rows]).to(self.device, non_blocking=True))
        self.window.index_copy_(0, idx, torch.from_numpy(tables.window[rows]).to(self.device, non_blocking=True))

    # ---- what the engine reports ----------------------------------------------------------------------
    def window_seconds(self, slot: int) -> float:
        """The slot's current attention window, in seconds of conversation."""
        return int(self.tables.window[slot]) / FRAME_RATE

    def gauges(self) -> dict[str, float]:
        alloc = self.tables.alloc
        return {"kv_pages_total": alloc.num_pages, "kv_pages_used": alloc.used, "kv_pages_promised": alloc.owed,
                "kv_usage_perc": alloc.used / max(1, alloc.num_pages),
                "kv_sessions_capped": self.tables.capped()}

    def describe(self) -> str:
        """The pool in a line, for the start-up message."""
        t, seconds = self.tables, self.page_size / FRAME_RATE
        total = t.alloc.num_pages * self.page_bytes
        line = (f"KV pool {t.alloc.num_pages} pages of {self.page_size} frames ({seconds:g} s, "
                f"{self.page_bytes / 1e6:.1f} MB in {dtype_name(self.dtype)}), {total / 1e9:.2f} GB, {t.policy}: ")
        full = f"{t.pages_per_slot} pages, {self.context / FRAME_RATE:g} s"
        if t.policy == "reserve":
            return line + f"each admitted session holds its whole context ({full}), so {t.alloc.num_pages // t.promise} at once"
        return line + (f"each admitted session is promised {t.guaranteed_window / FRAME_RATE:g} s ({t.promise} pages) "
                       f"and grows to its whole context ({full}) while pages are free; "
                       f"{t.alloc.num_pages // t.promise} at once at their minimum")

    def check(self) -> None:
        """Raises AssertionError where the tables, the allocator and the device buffers disagree."""
        self.tables.check()
        assert not self.tables.dirty
        assert np.array_equal(self.page_table.cpu().numpy(), self.tables.table)
        assert np.array_equal(self.window.cpu().numpy(), self.tables.window)
