"""The wire between the engine process and the API processes, and the engine's heartbeat.

Each message is a 5-byte header (payload length, kind) and a payload. Control messages (requests,
replies, notes, state) are JSON; audio in and frames out are raw arrays behind a small index, so no
frame is ever pickled or JSON-encoded on its way through (the text pieces of a tick ride in its
JSON header, a few bytes a session).

The heartbeat is a shared 8-byte page holding the engine loop's last `time.monotonic()` (the clock
is system-wide on Linux): an API process or the supervisor tells a hung engine from a busy one
without asking it anything.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import time
from dataclasses import dataclass

import numpy as np

HEADER = struct.Struct("<IB")
MAX_MESSAGE = 256 << 20  # far past any tick's frames; a longer header means a broken stream

REQUEST, REPLY, NOTE, AUDIO, TICK, STATE = range(1, 7)


class WireError(RuntimeError):
    """The peer sent something that is not this protocol."""


def message(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), kind) + payload


def control(kind: int, body: dict) -> bytes:
    return message(kind, json.dumps(body, separators=(",", ":")).encode())


class Reader:
    """Cuts a byte stream into (kind, payload) messages, whatever the reads' boundaries."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> tuple[int, memoryview] | None:
        if len(self._buf) < HEADER.size:
            return None
        length, kind = HEADER.unpack_from(self._buf)
        if length > MAX_MESSAGE or not REQUEST <= kind <= STATE:
            raise WireError(f"bad message header (kind {kind}, {length} bytes)")
        end = HEADER.size + length
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[HEADER.size:end])
        del self._buf[:end]
        return kind, memoryview(payload)

    @property
    def pending(self) -> int:
        return len(self._buf)


def pack_audio(chunks: list[tuple[int, np.ndarray]]) -> bytes:
    """(handle, float32 samples) pairs into one AUDIO message."""
    index = np.array([(h, len(pcm)) for h, pcm in chunks], dtype="<u4").reshape(-1)
    return message(AUDIO, struct.pack("<I", len(chunks)) + index.tobytes()
                   + b"".join(np.ascontiguousarray(pcm, dtype="<f4").tobytes() for _, pcm in chunks))


def unpack_audio(payload: memoryview) -> list[tuple[int, np.ndarray]]:
    (n,) = struct.unpack_from("<I", payload)
    index = np.frombuffer(payload, dtype="<u4", count=2 * n, offset=4).reshape(n, 2)
    samples = np.frombuffer(payload, dtype="<f4", offset=4 + 8 * n)
    if int(index[:, 1].sum()) != len(samples):
        raise WireError("an AUDIO message's index does not match its samples")
    out, at = [], 0
    for handle, count in index.tolist():
        out.append((handle, samples[at:at + count]))
        at += count
    return out


@dataclass
class Frames:
    """One tick's output frames for one API process, row by row."""
    handles: np.ndarray  # u4 [n]
    frames: np.ndarray  # u4 [n]: each session's output frame number
    text_tokens: np.ndarray  # i4 [n]
    audio_tokens: np.ndarray  # i4 [n, codebooks]
    pcm: np.ndarray  # f4 [n, frame_size]
    text: list[str]


def pack_tick(frames: Frames | None, info: dict) -> bytes:
    """A tick's frames plus `info` (ended sessions, input fill, admission) in one TICK message."""
    head = dict(info)
    arrays = b""
    if frames is not None and len(frames.handles):
        head.update(n=len(frames.handles), codebooks=frames.audio_tokens.shape[1], frame_size=frames.pcm.shape[1],
                    text=frames.text)
        arrays = b"".join(np.ascontiguousarray(a, dtype=d).tobytes() for a, d in (
            (frames.handles, "<u4"), (frames.frames, "<u4"), (frames.text_tokens, "<i4"),
            (frames.audio_tokens, "<i4"), (frames.pcm, "<f4")))
    blob = json.dumps(head, separators=(",", ":")).encode()
    return message(TICK, struct.pack("<I", len(blob)) + blob + arrays)


def unpack_tick(payload: memoryview) -> tuple[Frames | None, dict]:
    (size,) = struct.unpack_from("<I", payload)
    head = json.loads(bytes(payload[4:4 + size]))
    n = head.pop("n", 0)
    if not n:
        return None, head
    k, f = head.pop("codebooks"), head.pop("frame_size")
    at = 4 + size

    def take(dtype: str, count: int) -> np.ndarray:
        nonlocal at
        a = np.frombuffer(payload, dtype=dtype, count=count, offset=at)
        at += 4 * count
        return a

    frames = Frames(take("<u4", n), take("<u4", n), take("<i4", n), take("<i4", n * k).reshape(n, k),
                    take("<f4", n * f).reshape(n, f), head.pop("text"))
    return frames, head


class Heartbeat:
    """The engine loop's last beat, in a file mapped by every process that watches it."""

    def __init__(self, path: str, create: bool = False):
        self.path = path
        if create:
            with open(path, "wb") as f:
                f.write(struct.pack("<d", 0.0))
        fd = os.open(path, os.O_RDWR if create else os.O_RDONLY)
        try:
            self._map = mmap.mmap(fd, 8, access=mmap.ACCESS_WRITE if create else mmap.ACCESS_READ)
        finally:
            os.close(fd)

    def beat(self) -> None:
        struct.pack_into("<d", self._map, 0, time.monotonic())

    def last(self) -> float | None:
        """When the engine last beat (time.monotonic()), None before its first beat."""
        (t,) = struct.unpack_from("<d", self._map, 0)
        return t or None

    def age(self) -> float | None:
        last = self.last()
        return None if last is None else time.monotonic() - last
