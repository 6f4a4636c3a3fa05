"""G.711 μ-law and A-law (ITU-T G.711, the telephone network's 8 kHz codecs), as lookup tables.

Each direction is one table lookup per sample: decoding indexes 256 entries by the code byte,
encoding indexes 65,536 entries by the 16-bit sample. The tables are built once at import from the
segment arithmetic of the reference implementation (Sun's g711.c, which Python's audioop follows).
"""
from __future__ import annotations

import numpy as np

_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159  # in 14-bit units
_ULAW_SEGMENT_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEGMENT_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def _ulaw_encode(pcm16: np.ndarray) -> np.ndarray:
    x = pcm16.astype(np.int32) >> 2  # 14-bit magnitude
    mask = np.where(x < 0, 0x7F, 0xFF)
    x = np.minimum(np.abs(x), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    seg = np.searchsorted(_ULAW_SEGMENT_ENDS, x)  # first segment whose end is >= x
    code = (seg << 4) | ((x >> (seg + 1)) & 0x0F)
    return (np.where(seg >= 8, 0x7F, code) ^ mask).astype(np.uint8)


def _ulaw_decode(code: np.ndarray) -> np.ndarray:
    u = ~code.astype(np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + _ULAW_BIAS) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _ULAW_BIAS - t, t - _ULAW_BIAS).astype(np.int16)


def _alaw_encode(pcm16: np.ndarray) -> np.ndarray:
    x = pcm16.astype(np.int32) >> 3  # 13-bit
    mask = np.where(x >= 0, 0xD5, 0x55)
    x = np.where(x >= 0, x, -x - 1)
    seg = np.searchsorted(_ALAW_SEGMENT_ENDS, x)
    mantissa = np.where(seg < 2, x >> 1, x >> np.maximum(seg, 1)) & 0x0F
    code = np.where(seg >= 8, 0x7F, (seg << 4) | mantissa)
    return (code ^ mask).astype(np.uint8)


def _alaw_decode(code: np.ndarray) -> np.ndarray:
    a = code.astype(np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)


_ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int32)
_ALL_CODES = np.arange(256, dtype=np.int32)
# Indexed by sample + 32768 (encode) or by code (decode, as float32 in [-1, 1)).
_TABLES = {
    "audio/pcmu": (_ulaw_encode(_ALL_SAMPLES), _ulaw_decode(_ALL_CODES).astype(np.float32) / 32768.0),
    "audio/pcma": (_alaw_encode(_ALL_SAMPLES), _alaw_decode(_ALL_CODES).astype(np.float32) / 32768.0),
}
LAWS = tuple(_TABLES)


def encode(law: str, pcm: np.ndarray) -> bytes:
    """Float audio in [-1, 1) to G.711 code bytes (`law`: 'audio/pcmu' or 'audio/pcma')."""
    x = np.nan_to_num(np.asarray(pcm, dtype=np.float32).reshape(-1))
    s = np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int32)
    return _TABLES[law][0][s + 32768].tobytes()


def decode(law: str, data: bytes) -> np.ndarray:
    """G.711 code bytes to float32 audio in [-1, 1)."""
    return _TABLES[law][1][np.frombuffer(data, dtype=np.uint8)]
