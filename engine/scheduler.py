"""The scheduler: a plain state machine deciding, each tick, who joins, who leaves and who steps.

It knows nothing about models; the runner executes its plans. A session joins at the first tick
where it is admitted and has input, taking the lowest free slot; a finished session's slot is
freed at the start of the next tick, so a waiting session can take it in that same tick.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable


@dataclass
class Plan:
    tick: int
    leaves: list[tuple[Hashable, int]] = field(default_factory=list)  # (session, slot) freed this tick
    joins: list[tuple[Hashable, int]] = field(default_factory=list)  # (session, slot) reset and started
    step: list[tuple[Hashable, int]] = field(default_factory=list)  # every session stepped, by slot

    @property
    def slots(self) -> list[int]:
        return [slot for _, slot in self.step]


class Scheduler:
    def __init__(self, max_sessions: int):
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.max_sessions = max_sessions
        self.waiting: deque[Hashable] = deque()
        self.slot_of: dict[Hashable, int] = {}
        self._leaving: set[Hashable] = set()
        self.tick_index = 0

    @property
    def free_slots(self) -> int:
        return self.max_sessions - len(self.slot_of)

    def submit(self, session: Hashable) -> None:
        if session in self.slot_of or session in self.waiting:
            raise ValueError(f"session {session!r} already submitted")
        self.waiting.append(session)

    def finish(self, session: Hashable) -> None:
        """The session leaves at the next tick (or is dropped from the queue if it never joined)."""
        if session in self.slot_of:
            self._leaving.add(session)
        else:
            try:
                self.waiting.remove(session)
            except ValueError:
                pass

    def tick(self, has_input: Callable[[Hashable], bool] = lambda s: True) -> Plan:
        plan = Plan(self.tick_index)
        self.tick_index += 1
        for session in sorted(self._leaving, key=self.slot_of.__getitem__):
            plan.leaves.append((session, self.slot_of.pop(session)))
        self._leaving.clear()
        used = set(self.slot_of.values())
        free = [s for s in range(self.max_sessions) if s not in used]
        still_waiting: deque[Hashable] = deque()
        while self.waiting:
            session = self.waiting.popleft()
            if free and has_input(session):
                slot = free.pop(0)
                self.slot_of[session] = slot
                plan.joins.append((session, slot))
            else:
                still_waiting.append(session)
        self.waiting = still_waiting
        plan.step = sorted(self.slot_of.items(), key=lambda item: item[1])
        return plan
