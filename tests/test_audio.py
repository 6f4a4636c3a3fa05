import struct
import time
import wave

import numpy as np
import pytest

from engine.audio import (
    AudioError,
    frames,
    pcm_to_s16le,
    read_audio,
    resample,
    s16le_to_pcm,
    write_wav,
)

PCM, FLOAT, EXTENSIBLE = 1, 3, 0xFFFE
GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


def riff(tag, channels, rate, bits, payload, extensible=False, extra=b""):
    """A WAV file built by hand, so float and extensible headers can be exercised."""
    block = channels * ((bits + 7) // 8)
    fmt = struct.pack("<HHIIHH", EXTENSIBLE if extensible else tag, channels, rate,
                      (rate * block) % 2**32, block, bits)
    if extensible:
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", tag) + GUID_TAIL
    body = b"WAVE" + chunk(b"fmt ", fmt) + extra + chunk(b"data", payload)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def chunk(cid, data):
    return cid + struct.pack("<I", len(data)) + data + (b"\x00" if len(data) % 2 else b"")


def ramp(n=1000):
    # Exactly representable in 8-bit PCM, so every integer width round-trips exactly.
    return (np.arange(n) % 256 - 128).astype(np.float32) / 128.0


def encode(x, bits):
    if bits == 8:
        return (np.round(x * 128) + 128).astype(np.uint8).tobytes()
    if bits == 24:
        v = np.round(x * 2**23).astype(np.int32)
        b = v.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
        return b.tobytes()
    return np.round(x * 2.0 ** (bits - 1)).astype(f"<i{bits // 8}").tobytes()


def put(tmp_path, blob, name="a.wav"):
    p = tmp_path / name
    p.write_bytes(blob)
    return p


@pytest.mark.parametrize("bits", [8, 16, 24, 32])
@pytest.mark.parametrize("extensible", [False, True])
def test_int_pcm_round_trip(tmp_path, bits, extensible):
    x = ramp()
    p = put(tmp_path, riff(PCM, 1, 24000, bits, encode(x, bits), extensible))
    y = read_audio(p)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=1e-6)


@pytest.mark.parametrize("extensible", [False, True])
def test_float32_round_trip(tmp_path, extensible):
    x = np.linspace(-0.9, 0.9, 777).astype(np.float32)
    p = put(tmp_path, riff(FLOAT, 1, 24000, 32, x.astype("<f4").tobytes(), extensible))
    np.testing.assert_array_equal(read_audio(p), x)


def test_float64_and_out_of_range_values_are_clipped(tmp_path):
    x = np.array([0.5, 2.0, -3.0, np.nan], dtype="<f8")
    y = read_audio(put(tmp_path, riff(FLOAT, 1, 24000, 64, x.tobytes())))
    np.testing.assert_allclose(y, [0.5, 1.0, -1.0, 0.0])


def test_stereo_and_multichannel_are_averaged(tmp_path):
    left, right = ramp(), -ramp() * 0.5
    stereo = np.stack([left, right], axis=1).reshape(-1)
    y = read_audio(put(tmp_path, riff(PCM, 2, 24000, 16, encode(stereo, 16))))
    np.testing.assert_allclose(y, (left + right) / 2, atol=1e-4)
    quad = np.stack([left, left, right, right], axis=1).reshape(-1).astype("<f4")
    y = read_audio(put(tmp_path, riff(FLOAT, 4, 24000, 32, quad.tobytes(), True), "q.wav"))
    np.testing.assert_allclose(y, (left + right) / 2, atol=1e-6)


def test_unknown_and_odd_sized_chunks_are_skipped(tmp_path):
    x = ramp(301)  # odd byte count for 8-bit data: the data chunk itself needs padding
    extra = chunk(b"LIST", b"odd") + chunk(b"junk", b"\x01" * 10)
    y = read_audio(put(tmp_path, riff(PCM, 1, 24000, 8, encode(x, 8), extra=extra)))
    np.testing.assert_allclose(y, x, atol=1e-6)


def test_stdlib_wave_file_and_write_wav(tmp_path):
    x = np.sin(np.linspace(0, 50, 4800)).astype(np.float32) * 0.7
    write_wav(tmp_path / "w.wav", x)
    with wave.open(str(tmp_path / "w.wav")) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
    np.testing.assert_allclose(read_audio(tmp_path / "w.wav"), x, atol=1 / 32768)
    write_wav(tmp_path / "c.wav", np.array([2.0, -2.0, 0.25]))
    np.testing.assert_allclose(read_audio(tmp_path / "c.wav"), [32767 / 32768, -1, 0.25])


def tone_peak(y, rate):
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return np.argmax(spectrum) * rate / len(y)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_resampled_file_keeps_pitch_level_and_duration(tmp_path, rate):
    n = rate  # one second
    t = np.arange(n) / rate
    x = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    y = read_audio(put(tmp_path, riff(FLOAT, 1, rate, 32, x.astype("<f4").tobytes())))
    assert abs(len(y) - n * 24000 / rate) <= 1
    assert abs(tone_peak(y, 24000) - 1000) <= 2
    core = y[500:-500]
    assert np.sqrt(np.mean(core**2)) == pytest.approx(0.5 / np.sqrt(2), rel=1e-3)
    expected = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(len(y)) / 24000)
    assert np.abs(y - expected)[500:-500].max() < 1e-4


def test_downsampling_removes_content_above_new_nyquist():
    t = np.arange(48000) / 48000
    x = np.sin(2 * np.pi * 15000 * t).astype(np.float32)
    assert np.sqrt(np.mean(resample(x, 48000, 24000)[200:-200] ** 2)) < 1e-4


def test_resample_identity_odd_ratio_and_speed():
    x = np.random.default_rng(0).standard_normal(48000 * 60).astype(np.float32) * 0.1
    np.testing.assert_array_equal(resample(x[:100], 24000, 24000), x[:100])
    resample(x[:4800], 48000, 24000)  # builds the cached filter table
    start = time.perf_counter()
    assert resample(x, 48000, 24000).shape == (24000 * 60,)
    assert time.perf_counter() - start < 1.0
    # A coprime ratio too large for a polyphase table takes the direct path.
    t = np.arange(2399) / 23990
    y = resample(np.sin(2 * np.pi * 500 * t).astype(np.float32), 23990, 24001)
    ref = np.sin(2 * np.pi * 500 * np.arange(len(y)) / 24001)
    assert len(y) == -(-2399 * 24001 // 23990) and np.abs(y - ref)[300:-300].max() < 1e-4


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"", "empty"),
        (b"\x8f\x01garbage bytes that are not audio \x00\xff" * 3, "not a RIFF/WAVE"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00", "fmt"),
        (b"RIFF\x04\x00\x00\x00WA", "not WAVE"),
        (riff(PCM, 1, 24000, 16, b""), "no samples"),
        (riff(PCM, 1, 24000, 16, b"")[:36], "no data chunk"),
        (riff(PCM, 0, 24000, 16, b"\x00\x00"), "zero channels"),
        (riff(7, 1, 8000, 8, b"\x00" * 8), "unsupported WAV encoding"),
        (riff(PCM, 1, 4294967295, 16, b"\x00\x01" * 2000), "sample rate 4294967295 Hz is past the 768000 Hz"),
    ],
)
def test_invalid_files_raise_audio_error(tmp_path, blob, message):
    p = put(tmp_path, blob, "bad.wav")
    with pytest.raises(AudioError, match=message) as info:
        read_audio(p)
    assert "bad.wav" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_file_raises_audio_error(tmp_path):
    with pytest.raises(AudioError, match="nope.wav"):
        read_audio(tmp_path / "nope.wav")


def test_s16le_round_trip():
    x = np.array([-1.0, -0.5, 0.0, 0.25, 32767 / 32768, 1.5], dtype=np.float32)
    data = pcm_to_s16le(x)
    assert data[:2] == struct.pack("<h", -32768) and len(data) == 12
    np.testing.assert_array_equal(s16le_to_pcm(data), np.append(x[:5], 32767 / 32768))
    with pytest.raises(AudioError):
        s16le_to_pcm(b"\x00")


def test_frames_pad_with_silence():
    x = np.arange(1, 4001, dtype=np.float32)
    f = frames(x)
    assert f.shape == (3, 1920) and f.dtype == np.float32
    np.testing.assert_array_equal(f.reshape(-1)[:4000], x)
    assert not f.reshape(-1)[4000:].any()
    assert frames(np.zeros(3840)).shape == (2, 1920)
    assert frames(np.zeros(0)).shape == (0, 1920)
    assert frames(np.ones(5), frame_size=2).shape == (3, 2)
