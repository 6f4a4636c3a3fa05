"""Audio I/O for the engine: WAV decoding, band-limited resampling, PCM framing.

The stdlib `wave` module only understands integer PCM with the classic header, while
clients routinely upload IEEE-float and WAVE_FORMAT_EXTENSIBLE files, so the RIFF
container is parsed here directly.
"""

from __future__ import annotations

import math
import os
import struct
import wave
from functools import lru_cache

import numpy as np

WAVE_FORMAT_PCM = 1
WAVE_FORMAT_IEEE_FLOAT = 3
WAVE_FORMAT_EXTENSIBLE = 0xFFFE

# Kaiser-windowed sinc with the "kaiser_best" parameters used by torchaudio/resampy:
# ~0.95 of the target Nyquist passes untouched and aliasing is pushed below ~-100 dB.
_ZERO_CROSSINGS = 64
_ROLLOFF = 0.9475937167399596
_KAISER_BETA = 14.769656459379492
# Past this many polyphase coefficients (odd ratios like 23999:24000) the table would
# not fit comfortably in memory, so the filter is evaluated per output sample instead.
_MAX_TABLE = 1 << 22


# The highest rate audio hardware and formats use.
MAX_SAMPLE_RATE = 768_000


class AudioError(ValueError):
    """An audio file could not be read or decoded."""


def read_audio(path: str | os.PathLike, sample_rate: int = 24000) -> np.ndarray:
    """Decodes an audio file to float32 mono in [-1, 1] at `sample_rate`."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise AudioError(f"{name}: cannot open audio file ({e.strerror or e})") from e
    if blob[:4] == b"RIFF":
        pcm, rate = _decode_wav(blob, name)
    else:
        pcm, rate = _decode_other(name, blob)
    if pcm.size == 0:
        raise AudioError(f"{name}: audio file contains no samples")
    if rate > MAX_SAMPLE_RATE:  # a corrupt header, most likely; resampling it would take minutes and GBs
        raise AudioError(f"{name}: sample rate {rate} Hz is past the {MAX_SAMPLE_RATE} Hz lockstep reads")
    out = resample(pcm, rate, sample_rate)
    return np.clip(out, -1.0, 1.0, out=out)


def _decode_other(name: str, blob: bytes) -> tuple[np.ndarray, int]:
    # Compressed uploads (mp3, flac, ogg/vorbis, opus) go through sphn's decoders, which
    # the project already depends on; anything they reject is an unreadable file.
    if not blob:
        raise AudioError(f"{name}: audio file is empty (0 bytes)")
    if len(blob) < 12:
        raise AudioError(f"{name}: not an audio file (only {len(blob)} bytes)")
    try:
        import sphn

        # symphonia (behind sphn.read) has no Opus decoder; sphn ships a separate one.
        is_opus = blob[:4] == b"OggS" and b"OpusHead" in blob[:512]
        data, rate = sphn.read_opus(name) if is_opus else sphn.read(name)
    except BaseException as e:  # Rust panics surface as BaseException subclasses.
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise AudioError(
            f"{name}: not a RIFF/WAVE file and not a decodable audio format ({e})"
        ) from e
    data = np.asarray(data, dtype=np.float32)
    pcm = data.mean(axis=0) if data.ndim == 2 else data.reshape(-1)
    return np.nan_to_num(pcm).astype(np.float32), int(rate)


def _decode_wav(blob: bytes, name: str) -> tuple[np.ndarray, int]:
    if len(blob) < 12 or blob[8:12] != b"WAVE":
        raise AudioError(f"{name}: RIFF file is not WAVE audio (truncated or wrong type)")
    fmt = None
    data = None
    pos = 12
    while pos + 8 <= len(blob):
        cid, size = struct.unpack_from("<4sI", blob, pos)
        body = pos + 8
        if cid == b"fmt ":
            if size < 16 or body + 16 > len(blob):
                raise AudioError(f"{name}: WAV fmt chunk is truncated ({size} bytes)")
            fmt = blob[body:body + min(size, len(blob) - body)]
        elif cid == b"data":
            # Streaming writers leave the size as 0 or 0xFFFFFFFF and recorders that
            # crash leave it too large: take whatever bytes are actually present.
            end = len(blob) if size in (0, 0xFFFFFFFF) else min(body + size, len(blob))
            data = blob[body:end]
            if fmt is not None:
                break
        # Chunks are word-aligned: an odd-sized chunk is followed by one pad byte.
        pos = body + size + (size & 1)
    if fmt is None:
        raise AudioError(f"{name}: WAV file has no fmt chunk (truncated header?)")
    if data is None:
        raise AudioError(f"{name}: WAV file has no data chunk")
    return _decode_samples(fmt, data, name)


def _decode_samples(fmt: bytes, data: bytes, name: str) -> tuple[np.ndarray, int]:
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt, 0)
    if tag == WAVE_FORMAT_EXTENSIBLE:
        if len(fmt) < 40:
            raise AudioError(f"{name}: WAVE_FORMAT_EXTENSIBLE header is truncated")
        # The sub-format GUID starts with the classic format code.
        tag = struct.unpack_from("<H", fmt, 24)[0]
    if channels == 0:
        raise AudioError(f"{name}: WAV header declares zero channels")
    if rate == 0:
        raise AudioError(f"{name}: WAV header declares a zero sample rate")
    width = (bits + 7) // 8
    if tag == WAVE_FORMAT_PCM and width in (1, 2, 3, 4):
        pcm = _int_pcm(data, width, channels)
    elif tag == WAVE_FORMAT_IEEE_FLOAT and width in (4, 8):
        n = len(data) // (width * channels) * channels
        pcm = np.frombuffer(data, dtype=f"<f{width}", count=n).astype(np.float32)
        pcm = np.nan_to_num(pcm, nan=0.0, posinf=1.0, neginf=-1.0)
    else:
        raise AudioError(f"{name}: unsupported WAV encoding (format {tag:#x}, {bits} bits)")
    pcm = pcm.reshape(-1, channels)
    mono = pcm[:, 0] if channels == 1 else pcm.mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32), rate


def _int_pcm(data: bytes, width: int, channels: int) -> np.ndarray:
    n = len(data) // (width * channels) * channels
    if width == 1:
        # 8-bit WAV is the one unsigned PCM width.
        raw = np.frombuffer(data, dtype=np.uint8, count=n)
        return (raw.astype(np.float32) - 128.0) / 128.0
    if width == 3:
        b = np.frombuffer(data, dtype=np.uint8, count=n * 3).reshape(-1, 3).astype(np.int32)
        # Place the 3 bytes in the top of an int32 so the sign bit lands correctly.
        raw = (b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)
        return raw.astype(np.float32) / 2.0**31
    raw = np.frombuffer(data, dtype=f"<i{width}", count=n)
    return raw.astype(np.float32) / float(2 ** (8 * width - 1))


def resample(pcm: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Band-limited resampling of a 1-D signal; length becomes ceil(n * to / from)."""
    pcm = np.ascontiguousarray(pcm, dtype=np.float32)
    if from_rate == to_rate or pcm.size == 0:
        return pcm.copy()
    g = math.gcd(int(from_rate), int(to_rate))
    up, down = int(to_rate) // g, int(from_rate) // g
    half = _half_width(up, down)
    if up * (2 * half + down) <= _MAX_TABLE:
        return _resample_polyphase(pcm, up, down)
    return _resample_direct(pcm, up, down)


def _cutoff(up: int, down: int) -> float:
    """Low-pass cutoff in cycles per input sample."""
    return 0.5 * _ROLLOFF * min(1.0, up / down)


def _half_width(up: int, down: int) -> int:
    return math.ceil(_ZERO_CROSSINGS / (2.0 * _cutoff(up, down)))


def _kernel(t: np.ndarray, up: int, down: int) -> np.ndarray:
    """Kaiser-windowed ideal low-pass evaluated at offsets `t` (in input samples)."""
    fc = _cutoff(up, down)
    span = _ZERO_CROSSINGS / (2.0 * fc)
    x = np.clip(t / span, -1.0, 1.0)
    window = np.i0(_KAISER_BETA * np.sqrt(1.0 - x * x)) / np.i0(_KAISER_BETA)
    return np.where(np.abs(t) <= span, 2.0 * fc * np.sinc(2.0 * fc * t) * window, 0.0)


@lru_cache(maxsize=16)
def _polyphase_table(up: int, down: int) -> tuple["torch.Tensor", int]:
    import torch  # here, not at the top: the API processes read WAVs and never load torch
    half = _half_width(up, down)
    # Output phase j sits at j*down/up input samples past the block start; with `half`
    # samples of left padding, tap k of the stride-`down` convolution reads input
    # sample (block_start + k - half).
    taps = np.arange(2 * half + down, dtype=np.float64)
    phase = np.arange(up, dtype=np.float64)[:, None] * down / up
    table = _kernel(phase + half - taps[None, :], up, down)
    return torch.from_numpy(table.astype(np.float32))[:, None, :], half


def _resample_polyphase(pcm: np.ndarray, up: int, down: int) -> np.ndarray:
    import torch
    table, half = _polyphase_table(up, down)
    n = pcm.size
    with torch.no_grad():
        x = torch.from_numpy(pcm)[None, None]
        x = torch.nn.functional.pad(x, (half, half + down))
        y = torch.nn.functional.conv1d(x, table, stride=down)
        y = y[0].transpose(0, 1).reshape(-1)
    out_len = -(-n * up // down)
    return y[:out_len].numpy().copy()


def _resample_direct(pcm: np.ndarray, up: int, down: int) -> np.ndarray:
    half = _half_width(up, down)
    chunk = max(1, (1 << 20) // (2 * half + 1))  # outputs a pass: ~8 MB for each [chunk, taps] array
    padded = np.concatenate([np.zeros(half + 1), pcm.astype(np.float64), np.zeros(half + 1)])
    offsets = np.arange(-half, half + 1)
    out_len = -(-pcm.size * up // down)
    out = np.empty(out_len, dtype=np.float32)
    for start in range(0, out_len, chunk):
        m = np.arange(start, min(start + chunk, out_len), dtype=np.int64)
        # Exact integer arithmetic keeps the phase from drifting on long inputs.
        base = m * down // up
        frac = (m * down % up) / up
        idx = base[:, None] + offsets[None, :]
        weights = _kernel(frac[:, None] - offsets[None, :], up, down)
        out[start:start + m.size] = np.sum(padded[idx + half + 1] * weights, axis=1)
    return out


def write_wav(path: str | os.PathLike, pcm: np.ndarray, sample_rate: int = 24000) -> None:
    """Writes mono float audio as 16-bit PCM, clipping to [-1, 1]."""
    pcm = np.asarray(pcm)
    if pcm.ndim != 1:
        raise ValueError(f"write_wav expects mono 1-D audio, got shape {pcm.shape}")
    # The file is opened first: wave.open on a path that cannot be written leaves a half-made writer
    # whose finalizer prints a second error.
    with open(path, "wb") as f, wave.open(f, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm_to_s16le(pcm))


def pcm_to_s16le(pcm: np.ndarray) -> bytes:
    """Float audio to little-endian int16 bytes; the inverse scaling of s16le_to_pcm."""
    x = np.nan_to_num(np.asarray(pcm, dtype=np.float32).reshape(-1))
    s = np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2")
    return s.tobytes()


def s16le_to_pcm(data: bytes) -> np.ndarray:
    """Little-endian int16 bytes to float32 audio in [-1, 1)."""
    if len(data) % 2:
        raise AudioError(f"s16le buffer has odd length {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def frames(pcm: np.ndarray, frame_size: int = 1920) -> np.ndarray:
    """Splits audio into [F, frame_size] frames, zero-padding the last partial frame."""
    pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
    count = -(-pcm.size // frame_size)
    out = np.zeros((count, frame_size), dtype=np.float32)
    out.reshape(-1)[: pcm.size] = pcm
    return out
