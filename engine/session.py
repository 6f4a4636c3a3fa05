"""One conversation's host-side state: its input buffer, counters and where its output goes."""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.config import SamplingConfig


@dataclass
class FrameOutput:
    """One aligned output frame of a session."""
    frame: int
    text_token: int
    text: str
    audio_tokens: list[int]
    pcm: np.ndarray  # float32 [frame_size]


class Session:
    """Thread-safe: the API side pushes input and ends sessions; the engine thread pops frames.

    `sink(event)` receives FrameOutput objects and, last, the end reason (a str)."""

    def __init__(self, sampling: SamplingConfig, frame_size: int, max_buffer_frames: int,
                 end_on_input_end: bool, sink: Callable[[FrameOutput | str], None], sid: str | None = None):
        self.id = sid or secrets.token_urlsafe(18)
        self.sampling = sampling
        self.frame_size = frame_size
        self.max_buffer = max_buffer_frames * frame_size
        self.end_on_input_end = end_on_input_end
        self.sink = sink
        self._lock = threading.Lock()
        self._buf = np.zeros(0, dtype=np.float32)
        self.input_ended = False
        self.end_reason: str | None = None
        self.created = time.monotonic()
        self.last_activity = self.created
        self.first_audio_at: float | None = None
        self.frames_out = 0
        self.underruns = 0
        self.dropped_samples = 0

    def push(self, pcm: np.ndarray) -> None:
        with self._lock:
            if self.input_ended:
                return
            buf = np.concatenate([self._buf, pcm.astype(np.float32, copy=False)])
            if len(buf) > self.max_buffer:
                # Too far ahead of real time: keep the newest audio, count what is dropped.
                drop = len(buf) - self.max_buffer
                self.dropped_samples += drop
                buf = buf[drop:]
            self._buf = buf
            self.last_activity = time.monotonic()

    def end_input(self) -> None:
        with self._lock:
            self.input_ended = True
            self.last_activity = time.monotonic()

    def buffered_samples(self) -> int:
        """Input received and not yet stepped."""
        with self._lock:
            return len(self._buf)

    def has_frame(self) -> bool:
        with self._lock:
            return len(self._buf) >= self.frame_size or (self.input_ended and len(self._buf) > 0)

    def pop_frame(self) -> tuple[np.ndarray, bool]:
        """Next input frame (silence on underrun) and whether the input is now exhausted."""
        with self._lock:
            n = self.frame_size
            if len(self._buf) >= n:
                frame, self._buf = self._buf[:n], self._buf[n:]
            elif self.input_ended:
                frame = np.zeros(n, dtype=np.float32)
                frame[: len(self._buf)] = self._buf  # a partial last frame is padded with silence
                self._buf = self._buf[:0]
            else:
                # Underrun: the tick cannot wait, so it hears silence; buffered samples stay queued.
                frame = np.zeros(n, dtype=np.float32)
                self.underruns += 1
            exhausted = self.input_ended and len(self._buf) == 0
            return frame, exhausted
