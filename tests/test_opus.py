"""api/opus.py: the Ogg/Opus stream that /api/chat sends. Pages are checked against RFC 3533 and
RFC 7845 by a parser written here, the audio by decoding with sphn's reader (what Kyutai's `moshi`
client uses) and with libopus."""
import asyncio
import ctypes
import logging
import struct

import numpy as np
import pytest

from api import opus
from api.opus import OggOpusWriter, load_libopus, ogg_crc, opus_writer

sphn = pytest.importorskip("sphn")
LIB = load_libopus()
needs_libopus = pytest.mark.skipif(LIB is None, reason="libopus is not installed (make install installs it)")
FRAME = 1920


def crc_by_definition(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    return crc


def pages_of(stream: bytes) -> list[dict]:
    """Every page of `stream`, each checked (capture pattern, version, CRC, whole packets)."""
    pages, at = [], 0
    while at < len(stream):
        magic, version, flags, granule, serial, sequence, crc, count = struct.unpack_from("<4sBBqIIIB", stream, at)
        assert (magic, version) == (b"OggS", 0)
        lacing = stream[at + 27:at + 27 + count]
        end = at + 27 + count + sum(lacing)
        assert crc == crc_by_definition(stream[at:at + 22] + b"\0\0\0\0" + stream[at + 26:end])
        assert lacing[-1] < 255, "a packet continues on the next page"
        packets, body, current = [], at + 27 + count, b""
        for size in lacing:
            current += stream[body:body + size]
            body += size
            if size < 255:
                packets.append(current)
                current = b""
        pages.append({"flags": flags, "granule": granule, "serial": serial, "sequence": sequence,
                      "packets": packets, "bytes": stream[at:end]})
        at = end
    return pages


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Voiced harmonics with a gliding pitch and moving formants, pauses, breath noise (24 kHz)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(24000 * seconds)) / 24000
    f0 = 130 + 40 * np.sin(2 * np.pi * 0.7 * t)
    formant = 500 + 1500 * (0.5 + 0.5 * np.sin(2 * np.pi * 2.3 * t))
    voice = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 24000) * np.exp(-((k * f0 - formant) / 600) ** 2) / k ** 0.5
                for k in range(1, 60))
    gate = (np.sin(2 * np.pi * 1.3 * t + rng.uniform(0, 6)) > -0.4).astype(np.float64)
    return (0.3 * gate * voice / np.abs(voice).max() + 0.003 * rng.standard_normal(len(t))).astype(np.float32)


def aligned_snr(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """SNR (dB) and correlation of y against x, after the codec's delay (found by cross-correlation)."""
    n = min(len(x), len(y)) - 400
    delay = max(range(400), key=lambda d: float(np.dot(x[:n], y[d:d + n])))
    ref, got = x[:n], y[delay:delay + n]
    return 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)), float(np.corrcoef(ref, got)[0, 1])


def test_ogg_crc_is_the_ogg_polynomial():
    assert ogg_crc(b"123456789") == 0x89A1897F  # CRC-32/CKSUM's check value, without its final inversion
    rng = np.random.default_rng(1)
    for size in (0, 1, 27, 300, 4000):
        data = rng.bytes(size)
        assert ogg_crc(data) == crc_by_definition(data)


@needs_libopus
@pytest.mark.parametrize("complexity, kbps", [(0, 0), (5, 56), (10, 0)])
def test_stream_decodes_close_to_the_input(complexity, kbps):
    x = speech_like(4.0)
    writer = opus_writer(24000, complexity, kbps)
    assert isinstance(writer, OggOpusWriter) and writer.complexity == complexity
    assert writer.bitrate == kbps * 1000 if kbps else writer.bitrate > 0
    reader = sphn.OpusStreamReader(24000)
    decoded = [reader.append_bytes(writer.append_pcm(x[i:i + FRAME])) for i in range(0, len(x), FRAME)]
    y = np.concatenate(decoded)
    assert len(y) == len(x)  # a page per frame, decoded as it arrives: nothing held back
    snr, corr = aligned_snr(x, y)
    assert snr > 10 and corr > 0.95, (snr, corr)


@needs_libopus
def test_pages_headers_and_granule_positions():
    writer = OggOpusWriter(24000, 5, LIB)
    x = speech_like(1.0)
    calls = [writer.append_pcm(x[i:i + FRAME]) for i in range(0, 10 * FRAME, FRAME)]
    first = pages_of(calls[0])
    assert len(first) == 3 and all(len(pages_of(c)) == 1 for c in calls[1:])
    pages = pages_of(b"".join(calls))
    assert [p["sequence"] for p in pages] == list(range(12))
    assert len({p["serial"] for p in pages}) == 1
    assert [p["flags"] for p in pages] == [2] + [0] * 11  # beginning of stream on the first page only

    (head,), (tags,) = pages[0]["packets"], pages[1]["packets"]
    assert pages[0]["granule"] == pages[1]["granule"] == 0
    magic, version, channels, pre_skip, rate, gain, mapping = struct.unpack("<8sBBHIhB", head)
    lookahead = ctypes.c_int32()
    assert (magic, version, channels, rate, gain, mapping) == (b"OpusHead", 1, 1, 24000, 0, 0)
    assert writer._lib.opus_encoder_ctl(writer._encoder, ctypes.c_int(opus.OPUS_GET_LOOKAHEAD),
                                        ctypes.byref(lookahead)) == 0
    assert pre_skip == lookahead.value * 2 > 0  # at 48 kHz
    assert pages[0]["bytes"][37] == 1  # where Kyutai's web UI (opus-recorder's worker) reads the channel count
    vendor_size, = struct.unpack_from("<I", tags, 8)
    assert tags[:8] == b"OpusTags" and tags[12:12 + vendor_size].startswith(b"libopus")
    assert struct.unpack_from("<I", tags, 12 + vendor_size) == (0,) and len(tags) == 16 + vendor_size

    audio = pages[2:]
    assert [p["granule"] for p in audio] == [3840 * (i + 1) for i in range(10)]  # 80 ms at 48 kHz per frame
    LIB.opus_packet_get_nb_samples.argtypes = [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32]
    for p in audio:
        assert [LIB.opus_packet_get_nb_samples(q, len(q), 48000) for q in p["packets"]] == [1920, 1920]


@needs_libopus
def test_odd_inputs():
    writer = OggOpusWriter(24000, 5, LIB)
    assert writer.append_pcm(np.zeros(0, np.float32)) == b""  # nothing yet, not even the headers
    with pytest.raises(ValueError, match="whole 40 ms packets .960 samples at 24000 Hz., got shape .1000,"):
        writer.append_pcm(np.zeros(1000, np.float32))
    with pytest.raises(ValueError, match=r"got shape \(2, 1920\)"):
        writer.append_pcm(np.zeros((2, FRAME), np.float32))
    with pytest.raises(ValueError):
        writer.append_pcm(["not", "audio"])
    pages = pages_of(writer.append_pcm(np.zeros(960, np.float64)))  # converted, one 40 ms packet
    assert len(pages) == 3 and pages[2]["granule"] == 1920 and len(pages[2]["packets"]) == 1
    pages = pages_of(writer.append_pcm(np.full(5 * FRAME, np.nan, np.float32)))  # a page per 80 ms
    assert [p["granule"] for p in pages] == [1920 + 3840 * (i + 1) for i in range(5)]
    assert [p["sequence"] for p in pages] == [3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="complexity must be an integer in 0..10"):
        OggOpusWriter(24000, 11, LIB)
    with pytest.raises(ValueError, match="bitrate must be 0 .* or 6..510 kbit/s"):
        OggOpusWriter(24000, 5, LIB, kbps=5)
    with pytest.raises(ValueError, match="cannot encode at 22050 Hz"):
        OggOpusWriter(22050, 5, LIB)


def test_without_libopus_sphn_writes_the_stream(monkeypatch, caplog):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)

    def missing(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", missing)
    with caplog.at_level(logging.WARNING, logger="lockstep"):
        assert load_libopus.__wrapped__() is None
    assert [r.getMessage() for r in caplog.records if "libopus not found" in r.getMessage()]

    monkeypatch.setattr(opus, "load_libopus", lambda: None)
    writer = opus_writer(24000, 5)
    assert isinstance(writer, sphn.OpusStreamWriter)
    x = speech_like(1.0)
    reader = sphn.OpusStreamReader(24000)
    y = np.concatenate([reader.append_bytes(writer.append_pcm(x[i:i + FRAME])) for i in range(0, len(x), FRAME)])
    assert aligned_snr(x, y)[1] > 0.9


@needs_libopus
def test_the_served_complexity_reaches_api_chat(monkeypatch, tiny_wrap_ckpt):
    aiohttp = pytest.importorskip("aiohttp")
    from api import moshi_ws
    from engine.config import EngineConfig, ServeConfig
    from engine.runner import ModelRunner
    from engine.serving import EngineLoop
    from tests.servers import InProcessServer

    made = []
    monkeypatch.setattr(moshi_ws, "opus_writer", lambda *args: made.append(opus_writer(*args)) or made[-1])
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=1))
    cfg = ServeConfig(admission_wait=0.0, opus_complexity=2, opus_bitrate=40)
    server = InProcessServer(EngineLoop(runner, max_buffer_frames=250, idle_timeout=cfg.idle_timeout, max_waiting=0,
                                        max_input_lag=cfg.max_input_lag), cfg)

    async def call() -> bytes:
        writer, got = sphn.OpusStreamWriter(24000), b""
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(server.url.replace("http", "ws") + "/api/chat") as ws:
                assert await ws.receive_bytes(timeout=10) == b"\x00"
                x = speech_like(1.0)
                for i in range(0, len(x), FRAME):
                    await ws.send_bytes(b"\x01" + writer.append_pcm(x[i:i + FRAME]))
                while len(pages_of(got)) < 5:
                    msg = await ws.receive_bytes(timeout=10)
                    got += msg[1:] if msg[0] == 1 else b""
        return got

    try:
        stream = asyncio.run(call())
    finally:
        server.close()
    assert [(w.complexity, w.bitrate) for w in made] == [(2, 40000)]
    pages = pages_of(stream)
    assert pages[0]["packets"][0].startswith(b"OpusHead") and [p["granule"] for p in pages[2:5]] == [3840, 7680, 11520]
