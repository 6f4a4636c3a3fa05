"""The engine <-> API process wire: messages cut from any byte boundaries, audio and frames as raw
arrays, and the heartbeat."""
import numpy as np
import pytest

from engine.process import wire


def test_messages_survive_any_read_boundaries():
    stream = b"".join([wire.control(wire.REQUEST, {"id": 1, "op": "hello"}), wire.message(wire.NOTE, b"{}"),
                       wire.pack_audio([(3, np.arange(5, dtype=np.float32))])])
    for cut in (1, 2, 5, 7, len(stream)):
        reader, got = wire.Reader(), []
        for i in range(0, len(stream), cut):
            reader.feed(stream[i:i + cut])
            while (msg := reader.next()) is not None:
                got.append(msg)
        assert [k for k, _ in got] == [wire.REQUEST, wire.NOTE, wire.AUDIO] and reader.pending == 0


def test_a_broken_stream_is_refused():
    reader = wire.Reader()
    reader.feed(b"\xff\xff\xff\x7f\x01")  # 2 GB
    with pytest.raises(wire.WireError):
        reader.next()
    reader = wire.Reader()
    reader.feed(wire.message(42, b""))
    with pytest.raises(wire.WireError):
        reader.next()


def test_audio_round_trip():
    chunks = [(1, np.linspace(-1, 1, 7, dtype=np.float32)), (2, np.zeros(0, np.float32)),
              (2**32 - 1, np.float64([0.5, 0.25]))]
    reader = wire.Reader()
    reader.feed(wire.pack_audio(chunks))
    kind, payload = reader.next()
    out = wire.unpack_audio(payload)
    assert [h for h, _ in out] == [1, 2, 2**32 - 1]
    for (_, a), (_, b) in zip(chunks, out):
        assert b.dtype == np.float32 and np.array_equal(np.asarray(a, np.float32), b)
    bad = bytearray(payload)
    bad[8:12] = (99).to_bytes(4, "little")  # an index that claims more samples than sent
    with pytest.raises(wire.WireError):
        wire.unpack_audio(memoryview(bytes(bad)))


def test_tick_round_trip_with_and_without_frames():
    rng = np.random.default_rng(0)
    frames = wire.Frames(np.array([4, 9]), np.array([0, 17]), np.array([3, 31999]), rng.integers(0, 2048, (2, 8)),
                         rng.standard_normal((2, 1920)).astype(np.float32), ["", "▁héllo"])
    reader = wire.Reader()
    reader.feed(wire.pack_tick(frames, {"ended": [[4, "input_end"]], "fill": [], "state": {"free": 1}}))
    got, info = wire.unpack_tick(reader.next()[1])
    assert info == {"ended": [[4, "input_end"]], "fill": [], "state": {"free": 1}}
    for name in ("handles", "frames", "text_tokens", "audio_tokens", "pcm"):
        assert np.array_equal(getattr(got, name), getattr(frames, name)), name
    assert got.text == frames.text
    reader.feed(wire.pack_tick(None, {"ended": [], "fill": [[1, 2, 3]]}))
    assert wire.unpack_tick(reader.next()[1]) == (None, {"ended": [], "fill": [[1, 2, 3]]})


def test_heartbeat_is_seen_by_another_mapping(tmp_path):
    beat = wire.Heartbeat(str(tmp_path / "hb"), create=True)
    watcher = wire.Heartbeat(str(tmp_path / "hb"))
    assert watcher.age() is None  # before the first beat
    beat.beat()
    assert 0 <= watcher.age() < 1
