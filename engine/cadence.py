"""The real-time cadence of the engine loop, and what says a loop is stalled.

Tick i is due at t0 + i * 80 ms whatever the previous tick took; a tick that overruns its frame is
counted as late (never skipped silently), late ticks are summed into one warning every
`LATE_REPORT_SECONDS`, and after several frames of lag the cadence resyncs rather than bursting
ticks to catch up.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from engine.config import FRAME_RATE, STALL_SECONDS

log = logging.getLogger("lockstep")
FRAME_PERIOD = 1.0 / FRAME_RATE
MAX_CATCH_UP_FRAMES = 5
LATE_REPORT_SECONDS = 10.0
# This many failed ticks in a row is not one session's bad luck but a broken engine (a CUDA error
# poisons the context for every later launch): liveness then fails too.
FAILED_TICKS_UNHEALTHY = 3


def stall_reason(since_beat: float | None, failed_ticks: int, last_error: str | None) -> str | None:
    """Why a loop that last came round `since_beat` seconds ago, with `failed_ticks` failed ticks in
    a row, is not serving (it has not come round for `STALL_SECONDS`, or its last
    `FAILED_TICKS_UNHEALTHY` ticks or more all failed); None while it is."""
    if failed_ticks >= FAILED_TICKS_UNHEALTHY:
        return f"the last {failed_ticks} ticks failed ({last_error})"
    if since_beat is not None and since_beat > STALL_SECONDS:
        return f"the engine loop has not come round for {since_beat:.1f} s"
    return None


class Cadence:
    """When the next tick is due, and the late ticks' accounting. `count_late()` counts one late tick
    (the metric); `last_step()` gives the latest step's (seconds, sessions) for the warning."""

    def __init__(self, count_late: Callable[[], None], last_step: Callable[[], tuple[float, int]]):
        self.count_late, self.last_step = count_late, last_step
        self.due = time.monotonic()
        self.late, self.report_at = 0, self.due + LATE_REPORT_SECONDS

    def until_due(self) -> float:
        return max(0.0, self.due - time.monotonic())

    def ticked(self) -> None:
        self.due += FRAME_PERIOD
        behind = time.monotonic() - self.due
        if behind > 0:
            self.count_late()
            self.late += 1
            if behind > MAX_CATCH_UP_FRAMES * FRAME_PERIOD:
                self.due = time.monotonic()
        now = time.monotonic()
        if now >= self.report_at:
            if self.late:
                seconds, sessions = self.last_step()
                log.warning("%d late tick(s) in the last %.0f s: the latest step took %.0f ms with %d session(s) "
                            "(a frame is %.0f ms)", self.late, LATE_REPORT_SECONDS, seconds * 1e3, sessions,
                            FRAME_PERIOD * 1e3)
            self.late, self.report_at = 0, now + LATE_REPORT_SECONDS
