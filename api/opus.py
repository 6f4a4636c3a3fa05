"""Ogg/Opus for `/api/chat`'s audio out: libopus (through ctypes) at a chosen complexity, in Ogg
pages written here (RFC 3533 pages, RFC 7845's Opus mapping). sphn's writer, which has no
complexity setting (libopus's 10: about five times the CPU of 5), stands in where libopus cannot
be loaded. Torch-free: API processes import it."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import random
import struct
import weakref
import zlib

import numpy as np

log = logging.getLogger("lockstep")

OPUS_APPLICATION_AUDIO = 2049
OPUS_SET_BITRATE, OPUS_GET_BITRATE = 4002, 4003
OPUS_SET_COMPLEXITY, OPUS_GET_COMPLEXITY, OPUS_GET_LOOKAHEAD = 4010, 4011, 4027
OPUS_AUTO = -1000
OPUS_RATE = 48000  # granule positions and pre-skip count 48 kHz samples, whatever the input rate
PACKET_SECONDS = 0.04  # sphn's packet length, which Kyutai's clients already decode (some decoders stop at 60 ms)
PACKETS_PER_PAGE = 2  # a page per 80 ms frame: a frame leaves as soon as it is encoded
MAX_PACKET = 4000  # libopus's advice for a packet buffer
_BIT_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


@functools.cache
def load_libopus() -> ctypes.CDLL | None:
    """libopus, or None where it cannot be loaded (said once per process)."""
    for name in dict.fromkeys((ctypes.util.find_library("opus"), "libopus.so.0")):
        if name is None:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.opus_encoder_create.restype = ctypes.c_void_p
        lib.opus_encoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
        lib.opus_encode_float.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p,
                                          ctypes.c_int32]
        # opus_encoder_ctl is variadic: no argtypes, every argument passed as an explicit ctypes value.
        lib.opus_strerror.restype = ctypes.c_char_p
        lib.opus_get_version_string.restype = ctypes.c_char_p
        return lib
    log.warning("libopus not found (Debian: apt-get install libopus0): ws /api/chat encodes its audio with "
                "sphn's Opus writer, at about five times the API CPU per session, and --opus-complexity is unused")
    return None


def ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32 (polynomial 0x04c11db7, not reflected, initial value and final xor 0), computed by
    zlib's reflected CRC-32 over bit-reversed bytes, at C speed rather than a Python loop per byte."""
    reflected = zlib.crc32(data.translate(_BIT_REVERSED), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int.from_bytes(reflected.to_bytes(4, "little").translate(_BIT_REVERSED), "big")


def ogg_page(packets: list[bytes], granule: int, serial: int, sequence: int, flags: int = 0) -> bytes:
    """One Ogg page holding whole packets (flags: 2 first page, 4 last)."""
    lacing = b"".join(b"\xff" * (len(p) // 255) + bytes([len(p) % 255]) for p in packets)
    if len(lacing) > 255:
        raise ValueError(f"{sum(map(len, packets))} bytes of packets do not fit one Ogg page")
    header = struct.pack("<4sBBqIIIB", b"OggS", 0, flags, granule, serial, sequence, 0, len(lacing))
    body = lacing + b"".join(packets)
    return header[:22] + struct.pack("<I", ogg_crc(header + body)) + header[26:] + body


class OggOpusWriter:
    """One mono Ogg/Opus stream. `append_pcm` encodes float PCM (a whole number of 40 ms packets) and
    returns its pages, the two header pages before the first; b"" for no samples."""

    def __init__(self, sample_rate: int, complexity: int, lib: ctypes.CDLL, kbps: int = 0):
        if not (isinstance(complexity, int) and 0 <= complexity <= 10):
            raise ValueError(f"Opus complexity must be an integer in 0..10, got {complexity!r}")
        if not (isinstance(kbps, int) and (kbps == 0 or 6 <= kbps <= 510)):
            raise ValueError(f"Opus bitrate must be 0 (libopus's choice) or 6..510 kbit/s, got {kbps!r}")
        self._lib = lib
        error = ctypes.c_int()
        # AUDIO, not VOIP (sphn's): below complexity 7 libopus runs no speech analysis and VOIP then
        # means SILK, 250-700 us per 80 ms at any complexity; AUDIO means CELT, 60-230 us. From 7 the
        # analysis picks SILK+CELT for speech, as sphn's writer gets.
        handle = lib.opus_encoder_create(sample_rate, 1, OPUS_APPLICATION_AUDIO, ctypes.byref(error))
        if error.value != 0 or not handle:
            raise ValueError(f"libopus cannot encode at {sample_rate} Hz: {lib.opus_strerror(error.value).decode()}")
        self._encoder = ctypes.c_void_p(handle)
        weakref.finalize(self, lib.opus_encoder_destroy, self._encoder)
        self._ctl(OPUS_SET_COMPLEXITY, ctypes.c_int32(complexity))
        self._ctl(OPUS_SET_BITRATE, ctypes.c_int32(kbps * 1000 if kbps else OPUS_AUTO))
        lookahead = ctypes.c_int32()
        self._ctl(OPUS_GET_LOOKAHEAD, ctypes.byref(lookahead))
        self.sample_rate = sample_rate
        self.packet_samples = round(sample_rate * PACKET_SECONDS)
        self.pre_skip = lookahead.value * OPUS_RATE // sample_rate
        self._serial = random.getrandbits(32)
        self._sequence = 0
        self._samples = 0
        self._out = ctypes.create_string_buffer(MAX_PACKET)
        head = struct.pack("<8sBBHIhB", b"OpusHead", 1, 1, self.pre_skip, sample_rate, 0, 0)
        vendor = lib.opus_get_version_string()
        tags = b"OpusTags" + struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", 0)
        self._headers = self._page([head], 0, 2) + self._page([tags], 0)

    def _ctl(self, request: int, arg) -> None:
        status = self._lib.opus_encoder_ctl(self._encoder, ctypes.c_int(request), arg)
        if status != 0:
            raise RuntimeError(f"opus_encoder_ctl({request}): {self._lib.opus_strerror(status).decode()}")

    def _page(self, packets: list[bytes], granule: int, flags: int = 0) -> bytes:
        self._sequence += 1
        return ogg_page(packets, granule, self._serial, self._sequence - 1, flags)

    def _get(self, request: int) -> int:
        value = ctypes.c_int32()
        self._ctl(request, ctypes.byref(value))
        return value.value

    @property
    def complexity(self) -> int:
        """The complexity the encoder holds (read back from libopus)."""
        return self._get(OPUS_GET_COMPLEXITY)

    @property
    def bitrate(self) -> int:
        """The bitrate the encoder aims at, bits/s (read back from libopus)."""
        return self._get(OPUS_GET_BITRATE)

    def append_pcm(self, pcm) -> bytes:
        pcm = np.ascontiguousarray(pcm, dtype=np.float32)
        if pcm.ndim != 1 or len(pcm) % self.packet_samples:
            raise ValueError(f"Opus PCM must be one channel of whole {PACKET_SECONDS * 1000:.0f} ms packets "
                             f"({self.packet_samples} samples at {self.sample_rate} Hz), got shape {pcm.shape}")
        if not len(pcm):
            return b""
        packets = []
        for start in range(0, len(pcm), self.packet_samples):
            size = self._lib.opus_encode_float(self._encoder, pcm.ctypes.data + 4 * start, self.packet_samples,
                                               self._out, MAX_PACKET)
            if size < 0:
                raise RuntimeError(f"opus_encode_float: {self._lib.opus_strerror(size).decode()}")
            packets.append(ctypes.string_at(self._out, size))
        pages, self._headers = [self._headers], b""
        for i in range(0, len(packets), PACKETS_PER_PAGE):
            group = packets[i:i + PACKETS_PER_PAGE]
            self._samples += len(group) * self.packet_samples
            pages.append(self._page(group, self._samples * OPUS_RATE // self.sample_rate))
        return b"".join(pages)


def opus_writer(sample_rate: int, complexity: int, kbps: int = 0):
    """The `/api/chat` audio writer: ours over libopus, else sphn's (complexity 10, its own bitrate)."""
    lib = load_libopus()
    if lib is None:
        import sphn
        return sphn.OpusStreamWriter(sample_rate)
    return OggOpusWriter(sample_rate, complexity, lib, kbps)
