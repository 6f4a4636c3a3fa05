"""How many slots and KV pages fit on a device, under either KV policy: decided before any state is
allocated, and said in words for the start-up line or the error.

A slot's own state is small (the depth transformer's ring of one frame, Mimi's two rings of 250
positions; conv states add kB); the LM's keys and values, ~1.6 GB per 4-minute context for
Moshi 7B in bf16, live in the pool's pages. `reserve` needs every slot's whole context in pages;
`elastic` needs each session's promised minimum, and takes whatever else fits as pages to grow into.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine import capacity
from engine.config import FRAME_RATE, ConfigError, KVConfig
from engine.kv.pages import min_pages
from engine.kv.pool import dtype_name, page_bytes

# The most slots `--max-sessions 0` picks: the largest CUDA-graph bucket.
MAX_AUTO_SESSIONS = 128


@dataclass(frozen=True)
class StatePlan:
    slots: int
    pages: int  # in the KV pool, beside its scratch page
    why: str  # how the two were chosen, for the start-up line


def slot_state_bytes(lm, mimi) -> int:
    """State one slot holds outside the KV pool: the depth transformer's ring and Mimi's two."""
    rings = (lm.depformer, mimi.encoder_transformer.transformer, mimi.decoder_transformer.transformer)
    return sum(t.kv_bytes(t.capacity) for t in rings)


def lm_page_bytes(lm, kv: KVConfig, dtype: torch.dtype) -> int:
    t = lm.transformer
    return page_bytes(len(t.layers), t.num_heads, t.head_dim, kv.page_size, dtype)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def plan_state(lm, mimi, kv: KVConfig, dtype: torch.dtype, max_sessions: int, device,
               free: int | None = None) -> StatePlan:
    """Slots and pages for `max_sessions` (0: as many as fit) under `kv`, or a ConfigError saying
    what fits and what would make room. `free`: the device's free bytes, when not read from it (the
    capacity benchmark's devices)."""
    device = torch.device(device)
    context = lm.cfg.context
    per_slot = math.ceil(context / kv.page_size)
    promise = per_slot if kv.policy == "reserve" else min_pages(kv.min_positions, kv.page_size, per_slot)
    slot_b, page_b = slot_state_bytes(lm, mimi), lm_page_bytes(lm, kv, dtype)
    memory = capacity._budget(device) if free is None else capacity.budget_of(free)
    budget = None if memory is None else memory[1]

    def pages_of(n: int) -> str:
        return f"{n} pages of {kv.page_size} frames, {_gb(n * page_b)} in {dtype_name(dtype)}"
    least = (f"its whole context, {context / FRAME_RATE:g} s ({pages_of(per_slot)})" if kv.policy == "reserve" else
             f"{min(context, (promise - 1) * kv.page_size + 1) / FRAME_RATE:g} s promised ({pages_of(promise)})")
    session = f"{_gb(slot_b + promise * page_b)} a session ({least}, and {_gb(slot_b)} of other state)"

    def need(slots: int, pages: int) -> int:  # one scratch slot and one scratch page beside them
        return (slots + 1) * slot_b + (pages + 1) * page_b

    if kv.pages and kv.pages < promise:
        raise ConfigError(f"--kv-pages {kv.pages} cannot hold one session's {promise} pages ({least}): give more "
                          f"pages, or 0 to size the pool from memory")
    if max_sessions == 0:
        if budget is None:
            raise ConfigError(f"--max-sessions 0 sizes the slots by free memory, which this process cannot read "
                              f"on {device}: give --max-sessions N")
        if kv.pages:
            fit = min(kv.pages // promise, (budget - (kv.pages + 1) * page_b) // slot_b - 1)
        else:
            fit = (budget - page_b - slot_b) // (slot_b + promise * page_b)
        slots = min(MAX_AUTO_SESSIONS, fit)
        if slots < 1:
            raise ConfigError(f"--max-sessions 0: not even one session fits in {device}'s free memory, "
                              f"{_gb(budget)} after the headroom: {session}{_fixes(kv, dtype, lm, 0)}")
        cap = " (the most --max-sessions 0 takes)" if slots < fit else ""
        why = f"{slots} slots{cap}: {_gb(budget)} of {device}'s free memory holds {fit} at {session}"
    else:
        slots, why = max_sessions, f"{max_sessions} slots (--max-sessions), {session}"
    if kv.pages:
        pages = kv.pages
    elif kv.policy == "reserve" or budget is None:
        pages = slots * per_slot
    else:  # elastic: every byte left is pages to grow into, up to each slot's whole context
        pages = max(0, min(slots * per_slot, (budget - (slots + 1) * slot_b) // page_b - 1))
        why += f"; the pages past their minimum ({max(0, pages - slots * promise)}) let sessions grow"
    if budget is not None and need(slots, max(pages, promise)) > budget:
        fit = max(0, (budget - page_b - slot_b) // (slot_b + promise * page_b))
        raise ConfigError(f"--max-sessions {max_sessions} needs {_gb(need(slots, max(pages, promise)))} of session "
                          f"state on {device}, {session}, plus one scratch slot, but {_gb(memory[0])} is free after "
                          f"the weights, of which {_gb(budget)} may hold state: at most {fit} session(s) fit"
                          f"{_fixes(kv, dtype, lm, fit)}.")
    if pages < promise:  # elastic, sized from memory
        raise ConfigError(f"{_gb(budget or 0)} of {device}'s free memory holds {pages} KV pages, fewer than one "
                          f"session's {promise} ({least}){_fixes(kv, dtype, lm, 0)}")
    return StatePlan(slots, pages, why)


def _fixes(kv: KVConfig, dtype: torch.dtype, lm, fit: int) -> str:
    """What would make room."""
    fixes = ["lower --max-sessions (0 takes as many as fit)"] if fit > 0 else []
    if kv.policy == "reserve":
        fixes.append("--kv-policy elastic (each session promised --kv-min-seconds, growing while pages are free)")
    elif fit == 0:
        fixes.append("a smaller --kv-min-seconds")
    if dtype.itemsize > 1:
        fixes.append("--kv-dtype fp8 (half of bf16's KV)" if dtype.itemsize == 2
                     else "--kv-dtype bf16 or fp8 (a half or a quarter of fp32's KV)")
    if fit == 0:
        fixes.append("a checkpoint with a shorter context (config.json's context, the Mimi config's "
                     "transformer.context)")
    return "; " + " or ".join(fixes)
