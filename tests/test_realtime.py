"""`/v1/realtime` against a real `lockstep serve` process, driven by the official `openai` SDK (and a
bare websocket where a client must misbehave), only over the network: every server event is checked
against the SDK's own event models with no unknown field, and session state is read from
GET /v1/sessions."""
import asyncio
import base64
import json
import os
import signal
import time
import warnings

import numpy as np
import pydantic
import pytest
import soxr
import websockets
from openai import AsyncOpenAI
from openai.types.realtime import RealtimeServerEvent

from api.client import chat
from engine.audio import frames, pcm_to_s16le, read_audio, s16le_to_pcm
from engine.config import EngineConfig, SamplingConfig
from engine.generate import run_sessions
from engine.runner import ModelRunner
from servers import LiveServer

with warnings.catch_warnings():  # an independent G.711 reference: Python 3.11 still ships it
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop
EVENTS = pydantic.TypeAdapter(RealtimeServerEvent)
LEAD_SECONDS = 0.16  # a real-time client sends this far ahead of the clock (api/client.py says why)


def strict(raw: bytes | str):
    """The event parsed by the SDK's server-event models in strict mode (no coercion), with no field
    the models do not know, at any depth."""
    event = EVENTS.validate_json(raw, strict=True)
    assert event.type == json.loads(raw)["type"]

    def known(value, path):
        if isinstance(value, pydantic.BaseModel):
            assert not value.model_extra, f"{path}: fields the SDK does not know: {sorted(value.model_extra)}"
            for name in value.model_fields_set:
                known(getattr(value, name), f"{path}.{name}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                known(v, f"{path}[{i}]")
    known(event, event.type)
    return event


@pytest.fixture(scope="module")
def server(tiny_wrap_ckpt, tmp_path_factory):
    srv = LiveServer(tiny_wrap_ckpt, "--max-sessions", "10",
                     # a loaded machine may tick slower than real time: input sent ahead must not
                     # look idle while it waits its turn
                     "--idle-timeout", "120")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def runner(tiny_wrap_ckpt):
    return ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=1))


def generate(runner, pcm24: np.ndarray):
    """What `lockstep generate` gives for this 24 kHz input, greedy: (frames in, s16le out, transcript,
    float frames out)."""
    fr = frames(pcm24)
    res = run_sessions(runner, {"x": fr}, {"x": SamplingConfig(greedy=True)})["x"]
    text = "".join(runner.tokenizer.piece(t) for t in res.text_tokens)
    return fr, pcm_to_s16le(np.concatenate(res.pcm)), text, res.pcm


@pytest.fixture(scope="module")
def expected(runner, wav_inputs):
    # Quantized to s16 first: that is what the client sends.
    return {p.stem: generate(runner, s16le_to_pcm(pcm_to_s16le(read_audio(p)))) for p in wav_inputs}


class Call:
    """One SDK connection: every event it receives is strictly validated and kept."""

    def __init__(self, conn):
        self.conn, self.events, self.audio, self.transcript = conn, [], [], []

    async def next(self, timeout: float = 20):
        try:
            raw = await asyncio.wait_for(self.conn.recv_bytes(), timeout)
        except websockets.ConnectionClosed as e:
            raise AssertionError(f"closed ({e.rcvd}) after {[ev.type for ev in self.events][-8:]}") from e
        event = strict(raw)
        self.events.append(event)
        if event.type == "response.output_audio.delta":
            self.audio.append(base64.b64decode(event.delta))
        elif event.type == "response.output_audio_transcript.delta":
            self.transcript.append(event.delta)
        return event

    async def until(self, kind: str, timeout: float = 20):
        while (event := await self.next(timeout)).type != kind:
            pass
        return event

    async def audio_bytes(self, n: int) -> bytes:
        while sum(map(len, self.audio)) < n:
            await self.next()
        return b"".join(self.audio)

    async def send_audio(self, data: bytes, chunk: int, pace: float | None = None) -> None:
        start = time.monotonic()
        for i, offset in enumerate(range(0, len(data), chunk)):
            if pace is not None:
                await asyncio.sleep(max(0.0, start + i * pace - LEAD_SECONDS - time.monotonic()))
            await self.conn.input_audio_buffer.append(audio=base64.b64encode(data[offset:offset + chunk]).decode())


def client(server: LiveServer, key: str = "unused") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key)


def check_response_ids(events) -> None:
    """Every response event names the one response, its one item and indexes 0."""
    created = next(e for e in events if e.type == "response.created")
    added = next(e for e in events if e.type == "response.output_item.added")
    for e in events:
        if e.type.startswith("response.") and e.type not in ("response.created", "response.done"):
            assert e.response_id == created.response.id and e.output_index == 0
            if hasattr(e, "content_index"):
                assert e.item_id == added.item.id and e.content_index == 0
    assert len({e.event_id for e in events}) == len(events)


def test_strict_validation_refuses_unknown_fields_and_coercion():
    good = {"type": "input_audio_buffer.cleared", "event_id": "event_1"}
    assert strict(json.dumps(good)).event_id == "event_1"
    for bad in ({**good, "extra": 1}, {**good, "event_id": 1}, {"type": "response.output_audio.delta", "event_id": "e",
                "response_id": "r", "item_id": "i", "output_index": "0", "content_index": 0, "delta": ""}):
        with pytest.raises((AssertionError, pydantic.ValidationError)):
            strict(json.dumps(bad))


def test_sdk_streams_a_wav_in_real_time_and_gets_generates_tokens_and_pcm(server, expected):
    fr, want_pcm, want_text, _ = expected["alpha"]

    async def main():
        async with client(server).realtime.connect(model="moshi-test", extra_query={"greedy": "true"}) as conn:
            call = Call(conn)
            created = await call.next()
            assert created.type == "session.created" and created.session.model == "moshi-test"
            assert created.session.audio.input.turn_detection is None
            sender = asyncio.create_task(call.send_audio(pcm_to_s16le(fr), 3840, pace=0.08))
            got = await call.audio_bytes(len(want_pcm))
            await sender
            await conn.response.cancel()
            done = await call.until("response.done")
            return call, got, done

    call, got, done = asyncio.run(main())
    kinds = [e.type for e in call.events]
    assert kinds[:5] == ["session.created", "response.created", "response.output_item.added",
                         "conversation.item.added", "response.content_part.added"]
    assert kinds[-6:] == ["response.output_audio.done", "response.output_audio_transcript.done",
                          "response.content_part.done", "response.output_item.done", "conversation.item.done",
                          "response.done"]
    assert all(len(a) == 3840 for a in call.audio)  # one delta per 80 ms frame
    # Alone on the server, the call is bit-identical to generate's.
    assert got[:len(want_pcm)] == want_pcm
    assert "".join(call.transcript).startswith(want_text)
    assert done.response.status == "cancelled" and done.response.status_details.reason == "client_cancelled"
    item = done.response.output[0]
    assert item.content[0].transcript == "".join(call.transcript)
    assert done.response.usage.output_token_details.text_tokens == len(call.audio)
    check_response_ids(call.events)


def test_input_buffer_commit_and_clear(server):
    """Audio reaches Moshi as it arrives: `commit` only marks a user item; `clear` drops what is
    buffered and not yet stepped (seen in the session's status)."""
    async def main():
        # realtime=false: 5 s sent at once must stay buffered (a live call drops input lag past
        # --max-input-lag), so that clear has something to drop.
        async with client(server).realtime.connect(model="m", extra_query={"realtime": "false"}) as conn:
            call = Call(conn)
            await call.until("response.content_part.added")
            await conn.input_audio_buffer.commit(event_id="c0")
            error = await call.until("error")
            assert error.error.code == "input_audio_buffer_commit_empty" and error.error.event_id == "c0"
            await call.send_audio(b"\x10\x00" * 24000 * 5, 24000)  # 5 s at once: far ahead of the ticks
            await conn.input_audio_buffer.commit()
            committed = await call.until("input_audio_buffer.committed")
            added = await call.until("conversation.item.added")
            assert added.item.id == committed.item_id
            assert added.item.role == "user" and added.item.content[0].type == "input_audio"
            (before,) = server.sessions()
            await conn.input_audio_buffer.clear()
            await call.until("input_audio_buffer.cleared")
            (after,) = server.sessions()
            return before, after

    before, after = asyncio.run(main())
    assert before["buffered_seconds"] > 3
    assert after["buffered_seconds"] < 0.1 and after["dropped_samples"] >= 24000 * 3


@pytest.mark.parametrize("law, encode, decode", [("audio/pcmu", "lin2ulaw", "ulaw2lin"),
                                                 ("audio/pcma", "lin2alaw", "alaw2lin")])
def test_g711_round_trip_at_8k(server, runner, wav_inputs, law, encode, decode):
    """G.711 in and out at 8 kHz: Moshi hears exactly the input decoded and resampled chunk by chunk
    (python-soxr's stream, state kept across messages), and what comes back is its output resampled
    and encoded the same way."""
    # Sent all at once (realtime=false: nothing dropped as lag), so the output can be compared.
    pcm8 = soxr.resample(read_audio(wav_inputs[0]), 24000, 8000)
    sent = getattr(audioop, encode)(pcm_to_s16le(pcm8), 2)
    chunks = [sent[i:i + 160] for i in range(0, len(sent), 160)]  # 20 ms, as telephony sends
    up = soxr.ResampleStream(8000, 24000, 1, dtype="float32", quality="HQ")
    heard = np.concatenate([up.resample_chunk(s16le_to_pcm(getattr(audioop, decode)(c, 2))) for c in chunks])
    whole = len(heard) // 1920  # the partial frame after them is never stepped
    _, _, want_text, out_frames = generate(runner, heard[:whole * 1920])
    down = soxr.ResampleStream(24000, 8000, 1, dtype="float32", quality="HQ")
    want = b"".join(getattr(audioop, encode)(pcm_to_s16le(down.resample_chunk(f)), 2) for f in out_frames)

    async def main():
        async with client(server).realtime.connect(model="m", extra_query={"greedy": "1", "realtime": "false"}) as conn:
            call = Call(conn)
            fmt = {"type": law}
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"format": fmt},
                                                                              "output": {"format": fmt}}})
            updated = await call.until("session.updated")
            assert updated.session.audio.input.format.type == law == updated.session.audio.output.format.type
            for c in chunks:
                await conn.input_audio_buffer.append(audio=base64.b64encode(c).decode())
            got = await call.audio_bytes(len(want))
            await conn.response.cancel()  # the text of the last frame compared follows its audio
            await call.until("response.done")
            return got, call

    got, call = asyncio.run(main())
    assert len(want) > 8000 * 0.5
    assert got[:len(want)] == want
    assert "".join(call.transcript).startswith(want_text)
    # And the codec itself: what was sent decodes to within G.711's step of the 8 kHz audio.
    back = s16le_to_pcm(getattr(audioop, decode)(sent, 2))
    assert np.abs(back - pcm8).max() < 0.04


@pytest.mark.parametrize("law, encode, decode", [("audio/pcmu", "lin2ulaw", "ulaw2lin"),
                                                 ("audio/pcma", "lin2alaw", "alaw2lin")])
def test_g711_tables_match_the_reference_codec_everywhere(law, encode, decode):
    from api import g711
    every = np.arange(-32768, 32768, dtype="<i2")
    assert g711.encode(law, every.astype(np.float32) / 32768) == getattr(audioop, encode)(every.tobytes(), 2)
    codes = bytes(range(256))
    assert pcm_to_s16le(g711.decode(law, codes)) == getattr(audioop, decode)(codes, 2)
    # Silence, the codes every telephone line idles on.
    assert g711.encode(law, np.zeros(1, np.float32)) == {"audio/pcmu": b"\xff", "audio/pcma": b"\xd5"}[law]


def test_streaming_resampler_keeps_its_state_across_chunks():
    """Odd chunk sizes resample to what the whole signal does at once: no click at any boundary."""
    from api.realtime_audio import InputDecoder, OutputEncoder
    x = (0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.float32)
    encoded = audioop.lin2ulaw(pcm_to_s16le(x), 2)
    dec, cuts = InputDecoder("audio/pcmu"), [0, 7, 160, 161, 999, 4000, len(encoded)]
    got = np.concatenate([dec.decode(encoded[a:b]) for a, b in zip(cuts, cuts[1:])])
    whole = soxr.resample(s16le_to_pcm(audioop.ulaw2lin(encoded, 2)), 8000, 24000)
    assert len(got) > 23000 and np.array_equal(got, whole[:len(got)])
    enc = OutputEncoder("audio/pcma")
    y = soxr.resample(x, 8000, 24000)
    out = b"".join(enc.encode(y[i:i + 1920]) for i in range(0, len(y), 1920)) + enc.flush()
    assert out == audioop.lin2alaw(pcm_to_s16le(soxr.resample(y, 24000, 8000)), 2)


def test_eight_realtime_sessions_beside_v1_and_moshi_websocket_sessions(server, expected):
    """Ten callers at once over three protocols; the realtime ones greedy, against generate (to the
    last bit of the PCM but one: sharing a batch moves the float's last bits, see batch_invariant).
    The realtime callers send their audio at once, as uploads (realtime=false)."""
    import aiohttp
    import sphn
    names = list(expected) * 2

    async def realtime(name):
        fr, want_pcm, want_text, _ = expected[name]
        async with client(server).realtime.connect(model="m", extra_query={"greedy": "true", "realtime": "false"}) as conn:
            call = Call(conn)
            await call.send_audio(pcm_to_s16le(fr), 3840 * 2)
            got = await call.audio_bytes(len(want_pcm))
            await conn.response.cancel()
            await call.until("response.done", 30)
        return got[:len(want_pcm)], "".join(call.transcript)

    async def moshi_ws():
        writer, got = sphn.OpusStreamWriter(24000), 0
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"ws://127.0.0.1:{server.port}/api/chat") as ws:
                assert await ws.receive_bytes(timeout=20) == b"\x00"
                pcm = expected["charlie"][0].reshape(-1)
                for i in range(0, len(pcm), 1920):
                    page = writer.append_pcm(pcm[i:i + 1920])
                    if page:
                        await ws.send_bytes(b"\x01" + page)
                while got < 3:
                    got += (await ws.receive_bytes(timeout=20))[0] == 1
        return got

    async def main():
        v1 = chat(server.url, expected["delta"][0].reshape(-1), realtime=False,
                  params={"greedy": True, "tokens": True})
        return await asyncio.gather(v1, moshi_ws(), *[realtime(n) for n in names])

    v1, opus_pages, *calls = asyncio.run(main())
    assert v1.end_reason == "input_end" and len(v1.pcm) == len(expected["delta"][1]) // 3840
    assert opus_pages >= 3
    for name, (got, transcript) in zip(names, calls):
        _, want_pcm, want_text, _ = expected[name]
        diff = np.abs(np.frombuffer(got, "<i2").astype(int) - np.frombuffer(want_pcm, "<i2"))
        assert diff.max() <= 1, name
        assert transcript.startswith(want_text), name


def test_bad_input_gets_an_error_naming_it_and_the_call_goes_on(server):
    bad = [
        ("not json {", "invalid_json", None),
        ('["a list"]', "invalid_event", None),
        ('{"type": "no.such.event", "event_id": "e1"}', "invalid_event_type", "e1"),
        ('{"type": "input_audio_buffer.append", "event_id": "e2", "audio": "%%%"}', "invalid_base64", "e2"),
        ('{"type": "input_audio_buffer.append", "event_id": "e3", "audio": 5}', "invalid_type", "e3"),
        ('{"type": "session.update", "event_id": "e4", "session": {"type": "realtime", "audio": {"input": '
         '{"format": {"type": "audio/opus"}}}}}', "invalid_value", "e4"),
        ('{"type": "session.update", "event_id": "e5", "session": {"audio": {"output": {"format": "g711_ulaw"}}}}',
         "invalid_type", "e5"),
        ('{"type": "session.update", "event_id": "e6", "session": {"type": "realtime", "audio": {"input": '
         '{"format": {"type": "audio/pcm", "rate": 16000}}}}}', "invalid_value", "e6"),
        ('{"type": "session.update", "event_id": "e7", "session": {"voices": "alloy"}}', "unknown_parameter", "e7"),
        ('{"type": "session.update", "event_id": "e8", "session": {"type": "transcription"}}', "invalid_value", "e8"),
        ('{"type": "conversation.item.create", "event_id": "e9", "item": {}}', "unsupported_event", "e9"),
        ('{"type": "response.create", "event_id": "e10"}', "conversation_already_has_active_response", "e10"),
        ('{"event_id": "e11", "type": "input_audio_buffer.append", "audio": "' + "A" * (1 << 21) + '"}',
         "message_too_large", "e11"),
    ]

    async def main():
        async with client(server).realtime.connect(model="m") as conn:
            call = Call(conn)
            await call.until("response.content_part.added")
            errors = []
            for raw, _, _ in bad:
                await conn.send_raw(raw)
                errors.append((await call.until("error")).error)
            await conn.send_raw(b"\x00binary")
            errors.append((await call.until("error")).error)
            # Accepted settings that Moshi cannot honour are shown as they are in force.
            await conn.session.update(session={"type": "realtime", "instructions": "be brief", "tools": [
                {"type": "function", "name": "f"}], "audio": {"input": {"turn_detection": {"type": "server_vad"}},
                                                             "output": {"voice": "alloy"}}})
            updated = await call.until("session.updated")
            await call.send_audio(b"\x00\x01" * 1920 * 8, 3840)
            await call.audio_bytes(3840 * 3)  # still serving
            (status,) = server.sessions()
            return errors, updated, status

    errors, updated, status = asyncio.run(main())
    for error, (_, code, event_id) in zip(errors, bad):
        assert (error.code, error.event_id) == (code, event_id), error.message
        assert error.message
    assert errors[-1].code == "invalid_message"
    s = updated.session
    assert s.instructions is None and s.tools == [] and s.audio.input.turn_detection is None
    assert s.audio.output.voice == "moshi" and s.output_modalities == ["audio"]
    assert s.audio.input.format.type == "audio/pcm"  # the refused formats changed nothing
    assert status["state"] == "running"


def test_cancel_ends_the_call_and_create_starts_another(server):
    async def main():
        async with client(server).realtime.connect(model="m") as conn:
            call = Call(conn)
            first = (await call.until("response.created")).response.id
            await call.send_audio(b"\x00\x01" * 1920 * 4, 3840)
            await call.audio_bytes(3840)
            await conn.response.cancel()
            assert (await call.until("response.done")).response.status == "cancelled"
            for _ in range(40):
                if not server.sessions():
                    break
                await asyncio.sleep(0.05)
            assert server.sessions() == []  # the slot is free while no call runs
            await conn.response.cancel(event_id="c1")
            assert (await call.until("error")).error.code == "response_cancel_not_active"
            await conn.input_audio_buffer.append(audio=base64.b64encode(b"\0\0" * 100).decode(), event_id="a1")
            assert (await call.until("error")).error.code == "no_active_response"
            await conn.response.create()
            second = (await call.until("response.created")).response
            n = len(call.audio)
            await call.send_audio(b"\x00\x01" * 1920 * 4, 3840)
            await call.until("response.output_audio.delta")
            assert len(call.audio) > n and second.id != first
            check_response_ids(call.events[call.events.index(next(
                e for e in call.events if e.type == "response.created" and e.response.id == second.id)):])

    asyncio.run(main())


def test_a_client_that_vanishes_frees_its_slot(server):
    async def main():
        ws = await websockets.connect(f"ws://127.0.0.1:{server.port}/v1/realtime?model=m")
        strict(await ws.recv())
        audio = base64.b64encode(b"\x00\x01" * 1920 * 10).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        while strict(await ws.recv()).type != "response.output_audio.delta":
            pass
        (status,) = server.sessions()
        assert status["state"] == "running"
        ws.transport.abort()  # no close frame: the process died, the cable was pulled
        start = time.monotonic()
        while server.sessions() and time.monotonic() - start < 3:
            await asyncio.sleep(0.02)
        return time.monotonic() - start

    assert asyncio.run(main()) < 1.0  # gone within a few ticks, not at the idle timeout


def test_bad_sampling_parameters_are_refused_with_an_error_then_close(server):
    async def main():
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/v1/realtime?model=m&temperature=-1") as ws:
            error = strict(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            return error, ws.close_code

    error, code = asyncio.run(main())
    assert error.error.code == "invalid_query_parameter" and "temperature" in error.error.message
    assert code == 1008


def test_keys_busy_idle_and_drain(tiny_wrap_ckpt, tmp_path):
    """A server with a key and one slot: the key by header or browser subprotocol, a wrong one
    refused, a second caller told no slot is free, an idle call ended, then a drain ending a call."""
    srv = LiveServer(tiny_wrap_ckpt, "--max-sessions", "1", "--no-warmup", "--api-key", "sekret",
                     "--idle-timeout", "1", "--shutdown-timeout", "0.5", "--admission-wait", "0.2", key="sekret")
    url = f"ws://127.0.0.1:{srv.port}/v1/realtime?model=m"

    async def refused(**kwargs):
        async with websockets.connect(url, **kwargs) as ws:
            error = strict(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            return error.error.code, ws.close_code, ws.close_reason

    async def main():
        assert (await refused())[:2] == ("invalid_api_key", 1008)
        assert (await refused(additional_headers={"Authorization": "Bearer wrong"}))[:2] == ("invalid_api_key", 1008)
        assert (await refused(subprotocols=["realtime", "openai-insecure-api-key.wrong"]))[:2] == \
            ("invalid_api_key", 1008)
        # A browser's way: the key as a subprotocol, and "realtime" chosen back.
        async with websockets.connect(url, subprotocols=["realtime", "openai-insecure-api-key.sekret"]) as ws:
            assert ws.subprotocol == "realtime"
            assert strict(await ws.recv()).type == "session.created"
            code, close, reason = await refused(additional_headers={"Authorization": "Bearer sekret"})
            assert (code, close) == ("no_free_slot", 1013) and "slots are busy" in reason
            # No audio for --idle-timeout: the call ends, its response completed, the socket closed.
            events = []
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    events.append(strict(await asyncio.wait_for(ws.recv(), 10)))
            assert events[-1].type == "response.done" and events[-1].response.status == "completed"
            assert (ws.close_code, ws.close_reason) == (1000, "idle_timeout")
        async with client(srv, "sekret").realtime.connect(model="m") as conn:
            call = Call(conn)
            sender = asyncio.create_task(call.send_audio(b"\x00\x01" * 1920 * 100, 3840, pace=0.08))
            await call.audio_bytes(3840 * 2)
            srv.proc.send_signal(signal.SIGTERM)
            done = await call.until("response.done", 20)
            sender.cancel()
            return done

    try:
        done = asyncio.run(main())
        assert done.response.status == "incomplete"
        assert done.response.status_details.error.code == "server_shutdown"
        assert srv.proc.wait(timeout=30) == 0
    finally:
        srv.stop()


def test_an_unavailable_or_lost_engine_is_said_then_closes_1011(tiny_wrap_ckpt):
    """A hung engine: a new caller gets an `error` (engine_unavailable) and close 1011 once the
    engine link's request times out. A dead one: a call in progress closes its response as failed
    (engine_lost) and the socket with 1011."""
    srv = LiveServer(tiny_wrap_ckpt, "--max-sessions", "2", "--no-warmup", "--idle-timeout", "120")
    engine = srv.pids()["engine"][0]
    url = f"ws://127.0.0.1:{srv.port}/v1/realtime?model=m"

    async def main():
        async with client(srv).realtime.connect(model="m") as conn:
            call = Call(conn)
            await call.send_audio(b"\x00\x01" * 1920 * 4, 3840)
            await call.audio_bytes(3840)
            os.kill(engine, signal.SIGSTOP)  # as a hung device or a deadlock would
            try:
                async with websockets.connect(url) as ws:
                    error = strict(await asyncio.wait_for(ws.recv(), 30))
                    with pytest.raises(websockets.ConnectionClosed):
                        await ws.recv()
            finally:
                os.kill(engine, signal.SIGCONT)
            assert error.error.code == "engine_unavailable" and ws.close_code == 1011
            os.kill(engine, signal.SIGKILL)
            done = await call.until("response.done", 30)
            with pytest.raises(AssertionError, match=r"closed \(1011"):
                await call.next()
            return done

    try:
        done = asyncio.run(main())
        assert done.response.status == "failed" and done.response.status_details.error.code == "engine_lost"
    finally:
        srv.stop(signal.SIGKILL)
