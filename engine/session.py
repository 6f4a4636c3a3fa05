"""One conversation's host-side state: its input buffer, counters and where its output goes."""
from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.config import SamplingConfig

# A real-time session's input lag is judged on its lowest level over this many ticks (~1 s): the
# audio that never drains in that time is added latency, not jitter.
LAG_WINDOW_TICKS = 12


@dataclass
class FrameOutput:
    """One aligned output frame of a session."""
    frame: int
    text_token: int
    text: str
    audio_tokens: list[int]
    pcm: np.ndarray  # float32 [frame_size]


class SampleQueue:
    """Float32 samples in arrival-sized chunks: a push or a drop never copies what is queued."""

    def __init__(self) -> None:
        self._chunks: deque[np.ndarray] = deque()
        self._head = 0  # samples of the first chunk already taken
        self.size = 0

    def push(self, pcm: np.ndarray) -> None:
        if len(pcm):
            self._chunks.append(pcm)
            self.size += len(pcm)

    def drop(self, n: int) -> None:
        """Drops the oldest `n` samples (at most all)."""
        n = min(n, self.size)
        self.size -= n
        while n:
            left = len(self._chunks[0]) - self._head
            if n < left:
                self._head += n
                return
            n -= left
            self._chunks.popleft()
            self._head = 0

    def take(self, n: int) -> np.ndarray:
        """The oldest `n` samples (fewer if fewer are queued), removed."""
        out = np.empty(min(n, self.size), np.float32)
        at = 0
        while at < len(out):
            chunk = self._chunks[0]
            part = chunk[self._head:self._head + len(out) - at]
            out[at:at + len(part)] = part
            at += len(part)
            self.drop(len(part))
        return out


class Session:
    """Thread-safe: the API side pushes input and ends sessions; the engine thread pops frames.

    `sink(event)` receives FrameOutput objects and, last, the end reason (a str). A real-time
    session (`max_lag` samples set) keeps its input lag down: when its buffered input stays above
    that for a whole window (after a stall, or a burst from its client), the oldest is dropped."""

    def __init__(self, sampling: SamplingConfig, frame_size: int, max_buffer_frames: int,
                 end_on_input_end: bool, sink: Callable[[FrameOutput | str], None], sid: str | None = None,
                 max_lag: int | None = None):
        self.id = sid or secrets.token_urlsafe(18)
        self.sampling = sampling
        self.frame_size = frame_size
        self.max_buffer = max_buffer_frames * frame_size
        self.max_lag = max_lag
        self.end_on_input_end = end_on_input_end
        self.sink = sink
        self._lock = threading.Lock()
        self._buf = SampleQueue()
        self.input_ended = False
        self.end_reason: str | None = None
        self.created = time.monotonic()
        self.last_activity = self.created
        self.first_audio_at: float | None = None
        self.frames_out = 0
        self.underruns = 0
        self.received_samples = 0
        self.dropped_samples = 0  # all input dropped: past the buffer, to cut lag, or cleared
        self.lag_dropped_samples = 0  # the part dropped to bring a real-time session's lag back
        self._lag_low, self._lag_ticks = None, 0

    @property
    def realtime(self) -> bool:
        return self.max_lag is not None

    def push(self, pcm: np.ndarray) -> None:
        with self._lock:
            if self.input_ended:
                return
            self._buf.push(np.asarray(pcm, dtype=np.float32))
            self.received_samples += len(pcm)
            if self._buf.size > self.max_buffer:
                # Too far ahead of real time: keep the newest audio, count what is dropped.
                drop = self._buf.size - self.max_buffer
                self.dropped_samples += drop
                self._buf.drop(drop)
            self.last_activity = time.monotonic()

    def end_input(self) -> None:
        with self._lock:
            self.input_ended = True
            self.last_activity = time.monotonic()

    def clear_input(self) -> None:
        """Drops the input received and not yet stepped (counted as dropped)."""
        with self._lock:
            self.dropped_samples += self._buf.size
            self._buf.drop(self._buf.size)
            self.last_activity = time.monotonic()

    def buffered_samples(self) -> int:
        """Input received and not yet stepped."""
        with self._lock:
            return self._buf.size

    def has_frame(self) -> bool:
        with self._lock:
            return self._buf.size >= self.frame_size or (self.input_ended and self._buf.size > 0)

    def pop_frame(self) -> tuple[np.ndarray, bool]:
        """Next input frame (silence on underrun) and whether the input is now exhausted."""
        with self._lock:
            n = self.frame_size
            if self._buf.size >= n:
                frame = self._buf.take(n)
            elif self.input_ended:
                frame = np.zeros(n, dtype=np.float32)
                last = self._buf.take(n)
                frame[: len(last)] = last  # a partial last frame is padded with silence
            else:
                # Underrun: the tick cannot wait, so it hears silence; buffered samples stay queued.
                frame = np.zeros(n, dtype=np.float32)
                self.underruns += 1
            if self.max_lag is not None and not self.input_ended:
                self._keep_lag_down()
            exhausted = self.input_ended and self._buf.size == 0
            return frame, exhausted

    def _keep_lag_down(self) -> None:
        """Once a window's lowest input level is above the limit, that much audio never drained in
        the window: it is latency the call would carry for good. The oldest is dropped down to half
        the limit, clear of it, so a client's jitter does not trip it again at once."""
        low = self._buf.size if self._lag_low is None else min(self._lag_low, self._buf.size)
        self._lag_low, self._lag_ticks = low, self._lag_ticks + 1
        if self._lag_ticks < LAG_WINDOW_TICKS:
            return
        if low > self.max_lag:
            drop = low - self.max_lag // 2
            self._buf.drop(drop)
            self.dropped_samples += drop
            self.lag_dropped_samples += drop
        self._lag_low, self._lag_ticks = None, 0
