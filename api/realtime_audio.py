"""Audio of `/v1/realtime`: its formats, and per connection a decoder (client bytes to Moshi's
24 kHz float samples) and an encoder (Moshi's frames to client bytes).

`audio/pcm` is 24 kHz s16le, Moshi's own rate: no resampling. G.711 `audio/pcmu` and `audio/pcma`
are 8 kHz: each direction keeps one soxr streaming resampler for the whole call, so a chunk's
filter tail carries into the next message instead of clicking at every boundary.
"""
from __future__ import annotations

import numpy as np
import soxr

from api import g711
from api.protocol import PcmReassembler
from engine.config import SAMPLE_RATE

PCM = "audio/pcm"
FORMATS = (PCM, *g711.LAWS)
TELEPHONE_RATE = 8000


def rate_of(fmt: str) -> int:
    return SAMPLE_RATE if fmt == PCM else TELEPHONE_RATE


class InputDecoder:
    """Client audio bytes in `fmt` to float32 samples at 24 kHz, chunk by chunk."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.reset()

    def reset(self) -> None:
        """Forgets what is held back (an odd PCM byte, the resampler's filter tail)."""
        self._pcm = PcmReassembler()
        self._resampler = None if self.fmt == PCM else \
            soxr.ResampleStream(TELEPHONE_RATE, SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    def decode(self, data: bytes) -> np.ndarray:
        if self._resampler is None:
            return self._pcm.feed(data)
        return self._resampler.resample_chunk(g711.decode(self.fmt, data))


class OutputEncoder:
    """Moshi's 24 kHz float32 frames to bytes in `fmt`, chunk by chunk."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self._resampler = None if fmt == PCM else \
            soxr.ResampleStream(SAMPLE_RATE, TELEPHONE_RATE, 1, dtype="float32", quality="HQ")

    def encode(self, pcm: np.ndarray) -> bytes:
        from engine.audio import pcm_to_s16le
        if self._resampler is None:
            return pcm_to_s16le(pcm)
        return g711.encode(self.fmt, self._resampler.resample_chunk(np.asarray(pcm, dtype=np.float32)))

    def flush(self) -> bytes:
        """The resampler's held-back tail, at the end of the audio."""
        if self._resampler is None:
            return b""
        return g711.encode(self.fmt, self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
