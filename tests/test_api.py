"""The real server (uvicorn on loopback, real-time ticks) driven over HTTP and the Moshi websocket."""
import asyncio
import base64
import json
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn

from api.app import create_app
from api.client import chat
from engine.audio import frames, pcm_to_s16le, read_audio
from engine.config import EngineConfig, SamplingConfig, ServeConfig
from engine.generate import run_sessions
from engine.runner import ModelRunner
from engine.serving import EngineLoop

aiohttp = pytest.importorskip("aiohttp")
MAX_SESSIONS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_wrap_ckpt):
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=MAX_SESSIONS))
    engine = EngineLoop(runner, max_buffer_frames=250, idle_timeout=5.0, max_waiting=0)
    engine.start()
    cfg = ServeConfig(port=free_port(), admission_wait=0.2)
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, cfg), host="127.0.0.1", port=cfg.port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{cfg.port}", engine
    srv.should_exit = True
    thread.join(timeout=5)
    engine.stop()


@pytest.fixture(scope="module")
def expected(tiny_wrap_ckpt, wav_inputs):
    """What `lockstep generate` gives for each input alone (greedy)."""
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=1))
    out = {}
    for path in wav_inputs:
        fr = frames(read_audio(path))
        res = run_sessions(runner, {path.stem: fr}, {path.stem: SamplingConfig(greedy=True)})[path.stem]
        out[path.stem] = (fr, res.text_tokens, res.audio_tokens)
    return out


async def gone(engine, sid: str, timeout: float = 5.0) -> bool:
    """Whether the session leaves the engine within `timeout` seconds."""
    for _ in range(int(timeout / 0.05)):
        if sid not in engine.sessions:
            return True
        await asyncio.sleep(0.05)
    return sid not in engine.sessions


async def v1_session(http, base, pcm: np.ndarray, body: dict):
    async with http.post(f"{base}/v1/sessions", json=body) as r:
        assert r.status == 201, await r.text()
        info = await r.json()
    events = []

    async def read_stream():
        async with http.get(f"{base}/v1/sessions/{info['id']}/stream", params={"tokens": "1"}) as r:
            assert r.status == 200
            async for line in r.content:
                events.append(json.loads(line))
                if events[-1]["type"] == "end":
                    return

    reader = asyncio.create_task(read_stream())
    # Arbitrary chunk sizes, one odd: frames are reassembled whatever the HTTP chunking.
    raw = pcm_to_s16le(pcm)

    async def chunks():
        for i in range(0, len(raw), 3001):
            yield raw[i:i + 3001]

    async with http.post(f"{base}/v1/sessions/{info['id']}/audio", data=chunks()) as r:
        assert r.status == 200, await r.text()
    await asyncio.wait_for(reader, 30)
    return info, events


def test_eight_concurrent_sessions_get_generate_tokens(server, expected):
    base, engine = server
    names = list(expected) * 2

    async def main():
        async with aiohttp.ClientSession() as http:
            return await asyncio.gather(*[
                v1_session(http, base, expected[n][0].reshape(-1), {"greedy": True, "end_on_input_end": True})
                for n in names])

    results = asyncio.run(main())
    for name, (info, events) in zip(names, results):
        assert info["sample_rate"] == 24000 and info["frame_size"] == 1920
        tokens = [e for e in events if e["type"] == "tokens"]
        assert [e["text_token"] for e in tokens] == expected[name][1]
        assert [e["audio_tokens"] for e in tokens] == expected[name][2]
        audio = [e for e in events if e["type"] == "audio"]
        assert [e["frame"] for e in audio] == list(range(len(expected[name][1])))
        assert all(len(base64.b64decode(e["pcm"])) == 3840 for e in audio)
        assert events[-1] == {"type": "end", "reason": "input_end"}
    assert engine.metrics.counters["input_underruns_total"] == 0


def test_chat_is_full_duplex(server, expected):
    """The client sends its next frame only after reading output: this deadlocks unless the server
    reads the body while it streams the response."""
    base, _ = server
    pcm, want_text, want_audio = expected["alpha"]

    async def main():
        got_output = asyncio.Event()
        sent = 0

        async def body():
            nonlocal sent
            for i, frame in enumerate(pcm):
                if i >= 2:  # the first output needs two input frames (one frame of acoustic delay)
                    await asyncio.wait_for(got_output.wait(), 10)
                    got_output.clear()
                sent += 1
                yield pcm_to_s16le(frame)

        tokens = []
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v1/chat", params={"greedy": "1", "tokens": "1"}, data=body()) as r:
                assert r.status == 200
                async for line in r.content:
                    event = json.loads(line)
                    if event["type"] == "tokens":
                        tokens.append(event)
                        got_output.set()
                    if event["type"] == "end":
                        return tokens, event, sent

    tokens, end, sent = asyncio.run(main())
    assert sent == len(pcm) and end["reason"] == "input_end"
    assert [t["text_token"] for t in tokens] == want_text
    assert [t["audio_tokens"] for t in tokens] == want_audio


def test_client_helper_streams_in_real_time(server, expected):
    base, _ = server
    pcm = expected["delta"][0].reshape(-1)
    res = asyncio.run(chat(base, pcm, realtime=True, params={"greedy": True}))
    assert res.text_tokens == expected["delta"][1] and res.end_reason == "input_end"
    # Paced input: output frames arrive about one per 80 ms, not all at once.
    assert res.frame_times[-1] - res.frame_times[0] > 0.05 * (len(res.frame_times) - 1)


def test_moshi_websocket_protocol_with_opus(server, expected):
    sphn = pytest.importorskip("sphn")
    base, _ = server
    pcm = expected["charlie"][0].reshape(-1)

    async def main():
        writer, reader = sphn.OpusStreamWriter(24000), sphn.OpusStreamReader(24000)
        out_pcm, texts = [], []
        async with aiohttp.ClientSession() as http:
            url = base.replace("http", "ws") + "/api/chat?text_temperature=0.7&text_topk=25&audio_temperature=0.8" \
                  "&audio_topk=250&text_seed=4&audio_seed=5"
            async with http.ws_connect(url) as ws:
                first = await ws.receive_bytes(timeout=10)
                assert first == b"\x00"
                for i in range(0, len(pcm), 1920):
                    page = writer.append_pcm(pcm[i:i + 1920])
                    if page:
                        await ws.send_bytes(b"\x01" + page)
                deadline = time.monotonic() + 10
                while sum(map(len, out_pcm)) < 24000 * 0.5 and time.monotonic() < deadline:
                    msg = await ws.receive_bytes(timeout=10)
                    if msg[0] == 1:
                        decoded = reader.append_bytes(msg[1:])
                        if decoded is not None and len(decoded):
                            out_pcm.append(decoded)
                    elif msg[0] == 2:
                        texts.append(msg[1:].decode())
        return out_pcm, texts

    out_pcm, texts = asyncio.run(main())
    assert sum(map(len, out_pcm)) >= 24000 * 0.5
    assert all("▁" not in t for t in texts)


def test_errors_leave_the_server_serving(server, expected):
    base, engine = server

    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v1/sessions", data=b"{not json",
                                 headers={"content-type": "application/json"}) as r:
                assert r.status == 422
            async with http.post(f"{base}/v1/sessions", json={"temperature": -1}) as r:
                assert r.status == 422
            async with http.post(f"{base}/v1/sessions", json={"bogus": 1}) as r:
                assert r.status == 422
            for method, path in (("get", "/stream"), ("post", "/audio"), ("delete", "")):
                async with getattr(http, method)(f"{base}/v1/sessions/nope{path}") as r:
                    assert r.status == 404
            # Odd byte count: the whole samples are kept, the request is told it was malformed.
            async with http.post(f"{base}/v1/sessions", json={}) as r:
                sid = (await r.json())["id"]
            async with http.post(f"{base}/v1/sessions/{sid}/audio", data=b"\x01\x02\x03") as r:
                assert r.status == 400
            async with http.delete(f"{base}/v1/sessions/{sid}") as r:
                assert r.status == 204
            # Over capacity: 503 with Retry-After once every slot is taken.
            ids = []
            for _ in range(MAX_SESSIONS):
                async with http.post(f"{base}/v1/sessions", json={}) as r:
                    assert r.status == 201
                    ids.append((await r.json())["id"])
            async with http.post(f"{base}/v1/sessions", json={}) as r:
                assert r.status == 503 and "Retry-After" in r.headers
            for sid in ids:
                async with http.delete(f"{base}/v1/sessions/{sid}"):
                    pass
            # A client vanishing mid-stream frees its slot.
            async with http.post(f"{base}/v1/sessions", json={"greedy": True}) as r:
                sid = (await r.json())["id"]
            async with http.post(f"{base}/v1/sessions/{sid}/audio", data=pcm_to_s16le(expected["alpha"][0].reshape(-1))):
                pass
            resp = await http.get(f"{base}/v1/sessions/{sid}/stream")
            await resp.content.readline()
            resp.close()
            assert await gone(engine, sid)
            async with http.get(f"{base}/metrics") as r:
                text = await r.text()
                assert "lockstep:step_duration_seconds_bucket" in text and "lockstep:sessions_rejected_total" in text

    asyncio.run(main())
    # Still serving: a fresh session gets the right tokens.
    test_client_helper_streams_in_real_time(server, expected)


def test_session_status_and_listing(server, expected):
    base, engine = server

    async def poll(http, sid, until):
        for _ in range(100):
            async with http.get(f"{base}/v1/sessions/{sid}") as r:
                if r.status == 404 or until(await r.json()):
                    return r.status, await r.json()
            await asyncio.sleep(0.05)
        raise AssertionError(f"session {sid} never reached the state asked for")

    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/v1/sessions/nope") as r:
                assert r.status == 404
            async with http.post(f"{base}/v1/sessions", json={"greedy": True}) as r:
                sid = (await r.json())["id"]
            async with http.get(f"{base}/v1/sessions/{sid}") as r:
                status = await r.json()
            assert status["id"] == sid and status["sample_rate"] == 24000 and status["sampling"]["greedy"]
            assert status["state"] == "waiting" and status["slot"] is None and status["frames_out"] == 0
            async with http.post(f"{base}/v1/sessions/{sid}/audio",
                                 data=pcm_to_s16le(expected["alpha"][0].reshape(-1))) as r:
                assert r.status == 200
            _, status = await poll(http, sid, lambda s: s["frames_out"] > 2)
            assert status["state"] == "running" and status["slot"] is not None and status["buffered_seconds"] >= 0
            async with http.get(f"{base}/v1/sessions") as r:
                listing = await r.json()
            assert listing["slots_total"] == MAX_SESSIONS
            assert [s["state"] for s in listing["sessions"] if s["id"] == sid] == ["running"]
            async with http.delete(f"{base}/v1/sessions/{sid}") as r:
                assert r.status == 204
            code, _ = await poll(http, sid, lambda s: False)
            assert code == 404

    asyncio.run(main())


def test_api_key_required_when_configured(tiny_wrap_ckpt):
    httpx = pytest.importorskip("httpx")
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=1))
    app = create_app(EngineLoop(runner), ServeConfig(api_key=("sekrit",)))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.post("/v1/sessions", json={})).status_code == 401
            bad = await c.post("/v1/sessions", json={}, headers={"authorization": "Bearer nope"})
            assert bad.status_code == 401
            ok = await c.post("/v1/sessions", json={}, headers={"authorization": "Bearer sekrit"})
            assert ok.status_code == 201
            assert (await c.get("/healthz")).status_code == 200

    asyncio.run(main())


def test_chat_endpoint_refusals(tiny_wrap_ckpt):
    """/v1/chat's error replies; the engine does not tick, so a session never joins and ends at once."""
    httpx = pytest.importorskip("httpx")
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=1))
    engine = EngineLoop(runner, max_waiting=0)
    app = create_app(engine, ServeConfig(api_key=("sekrit",), admission_wait=0.0, max_body_mb=0.01))
    key = {"authorization": "Bearer sekrit"}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            reply = await c.get("/v1/chat", headers=key)
            assert reply.status_code == 405 and reply.headers["allow"] == "POST"
            assert (await c.post("/v1/chat", content=b"")).status_code == 401
            reply = await c.post("/v1/chat", params={"top_k": "-3"}, content=b"", headers=key)
            assert reply.status_code == 422 and "invalid query parameters" in reply.json()["detail"]
            # Over --max-body-mb (10 KB here): the session ends with that reason.
            reply = await c.post("/v1/chat", content=b"\0" * 20_000, headers=key)
            assert reply.status_code == 200
            assert json.loads(reply.text.splitlines()[-1]) == {"type": "end", "reason": "body_too_large"}
            assert not engine.sessions
            # Every slot taken: 503 with Retry-After.
            held = engine.create_session(SamplingConfig(), lambda event: None)
            reply = await c.post("/v1/chat", content=b"", headers=key)
            assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
            assert reply.json()["detail"] == "all session slots are busy"
            engine.end_session(held.id, "done")
            engine.drain()
            reply = await c.post("/v1/chat", content=b"", headers=key)
            assert reply.status_code == 503 and reply.json()["detail"] == "server is shutting down"

    asyncio.run(main())


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_websocket_refusals_say_why(tiny_wrap_ckpt):
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=1))
    engine = EngineLoop(runner, max_waiting=0)
    client = TestClient(create_app(engine, ServeConfig(admission_wait=0.0)))
    held = engine.create_session(SamplingConfig(), lambda event: None)
    for expected in ("all session slots are busy; try again later", "server is shutting down"):
        with client.websocket_connect("/api/chat") as ws:
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_bytes()
        assert (closed.value.code, closed.value.reason) == (1013, expected)
        engine.end_session(held.id, "done")
        engine.drain()


def test_liveness_and_readiness_fail_while_the_engine_is_stuck(tiny_wrap_ckpt, monkeypatch):
    httpx = pytest.importorskip("httpx")
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=1))
    engine = EngineLoop(runner)
    app = create_app(engine, ServeConfig())

    async def get(path="/healthz"):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get(path)

    assert asyncio.run(get()).status_code == 200 and asyncio.run(get("/readyz")).status_code == 200
    monkeypatch.setattr(engine, "stalled", lambda: "the engine loop has not come round for 7.0 s")
    for path in ("/healthz", "/readyz"):
        reply = asyncio.run(get(path))
        assert reply.status_code == 503
        assert reply.json() == {"status": "stalled", "reason": "the engine loop has not come round for 7.0 s"}


def test_static_folder_is_served_beside_the_api(tiny_wrap_ckpt, tmp_path):
    httpx = pytest.importorskip("httpx")
    (tmp_path / "index.html").write_text("<html>moshi ui</html>")
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "app.js").write_text("console.log(1)")
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=1))
    app = create_app(EngineLoop(runner), ServeConfig(static=str(tmp_path)).validate())

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.get("/")).text == "<html>moshi ui</html>"
            assert (await c.get("/assets/app.js")).text == "console.log(1)"
            assert (await c.get("/nope.css")).status_code == 404
            assert (await c.get("/healthz")).json() == {"status": "ok"}  # the API comes first
            assert (await c.post("/v1/sessions", json={})).status_code == 201

    asyncio.run(main())


def test_client_command_saves_audio_and_transcript(server, expected, wav_inputs, tmp_path, capsys):
    from engine.cli import main
    base, _ = server
    out = tmp_path / "reply.wav"
    main(["client", base, str(wav_inputs[3]), "--output", str(out), "--greedy", "--no-pace"])
    assert len(read_audio(out)) == 1920 * len(expected["delta"][1])
    assert out.with_suffix(".txt").exists()
    assert "end: input_end" in capsys.readouterr().out


def test_websocket_garbage_ends_nothing_but_its_own_session(server, expected):
    base, engine = server

    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(base.replace("http", "ws") + "/api/chat") as ws:
                assert await ws.receive_bytes(timeout=10) == b"\x00"
                await ws.send_str("not binary")
                await ws.send_bytes(b"")
                await ws.send_bytes(b"\x07junk")
                await ws.send_bytes(b"\x01" + bytes(range(256)) * 4)  # not Ogg/Opus
                await asyncio.sleep(0.3)
                assert not ws.closed
            # Bad settings: refused with a close frame that says why.
            async with http.ws_connect(base.replace("http", "ws") + "/api/chat?audio_topk=-3") as ws:
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1008
                assert msg.extra.startswith("bad sampling parameters: top_k must be an integer")

    asyncio.run(main())
    for _ in range(100):
        if not engine.sessions:
            break
        time.sleep(0.05)
    assert not engine.sessions
    test_client_helper_streams_in_real_time(server, expected)


def test_unread_output_ends_the_session(server, monkeypatch):
    import api.bridge
    monkeypatch.setattr(api.bridge, "MAX_UNREAD_FRAMES", 3)
    base, engine = server

    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v1/sessions", json={}) as r:
                sid = (await r.json())["id"]
            async with http.post(f"{base}/v1/sessions/{sid}/audio", data=b"\x00\x00" * 1920 * 12):
                pass
            assert await gone(engine, sid)
            async with http.get(f"{base}/v1/sessions/{sid}/stream") as r:
                assert r.status == 404

    asyncio.run(main())


def test_unset_sampling_fields_take_the_checkpoints_defaults(tiny_wrap_ckpt):
    httpx = pytest.importorskip("httpx")
    from api.moshi_ws import sampling_from_query
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=2))
    runner.default_sampling = SamplingConfig(temperature=0.5, top_k=9, text_temperature=0.3, text_top_k=4)
    app = create_app(EngineLoop(runner), ServeConfig())

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            plain = (await c.post("/v1/sessions", json={})).json()["sampling"]
            assert plain == {**runner.default_sampling.__dict__}
            some = (await c.post("/v1/sessions", json={"top_k": 3, "greedy": True, "seed": 5})).json()["sampling"]
            assert some == {**plain, "top_k": 3, "greedy": True, "seed": 5}

    asyncio.run(main())
    got = sampling_from_query({"audio_topk": "7", "text_temperature": ""}, runner.default_sampling)
    assert got == SamplingConfig(temperature=0.5, top_k=7, text_temperature=0.3, text_top_k=4)


def test_abuse_gets_clear_refusals_and_harms_no_one(server, expected):
    """Found by an adversarial run: out-of-range settings, bodies that are too big or too deep,
    bad query flags, uploads that collide or come after the input ended, and inputless sessions."""
    base, engine = server
    created = engine.metrics.counters["sessions_created_total"]

    async def main():
        async with aiohttp.ClientSession() as http:
            for body in ({"top_k": 2**63}, {"text_top_k": 2**31}, {"temperature": "NaN"}, {"temperature": 1e309}):
                async with http.post(f"{base}/v1/sessions", json=body) as r:
                    assert r.status == 422, body
            async with http.post(f"{base}/v1/sessions", data=b"[" * 60000) as r:
                assert r.status == 422 and "nested too deeply" in (await r.json())["detail"]
            async with http.post(f"{base}/v1/sessions", data=b" " * (1 << 20)) as r:
                assert r.status == 413
            for query in ("top_k=18446744073709551616", "greedy=maybe", "temperature=inf"):
                async with http.post(f"{base}/v1/chat?{query}", data=b"") as r:
                    assert r.status == 422, query
            async with http.ws_connect(base.replace("http", "ws") + "/api/chat?text_topk=99999999999") as ws:
                await ws.receive(timeout=10)
                assert ws.close_code == 1008
            # An input that ends before a whole frame came: the session ends at once, slot never taken.
            async with http.post(f"{base}/v1/sessions", json={"end_on_input_end": True}) as r:
                sid = (await r.json())["id"]
            async with http.post(f"{base}/v1/sessions/{sid}/audio", data=b"\x01") as r:
                assert r.status == 400  # an odd byte count
            async with http.get(f"{base}/v1/sessions/{sid}/stream") as r:
                assert [json.loads(line) async for line in r.content] == [{"type": "end", "reason": "input_end"}]
            async with http.post(f"{base}/v1/chat", data=b"") as r:
                assert [json.loads(line) async for line in r.content] == [{"type": "end", "reason": "input_end"}]
            # Uploads: not two at once, and none after the input ended.
            async with http.post(f"{base}/v1/sessions", json={"end_on_input_end": True}) as r:
                sid = (await r.json())["id"]
            gate = asyncio.Event()

            async def slow_body():
                yield b"\x00\x00" * 1920
                await gate.wait()
            first = asyncio.create_task(http.post(f"{base}/v1/sessions/{sid}/audio", data=slow_body()))
            await asyncio.sleep(0.3)
            async with http.post(f"{base}/v1/sessions/{sid}/audio", data=b"\x00\x00") as r:
                assert r.status == 409 and "already being uploaded" in (await r.json())["detail"]
            gate.set()
            assert (await first).status == 200
            async with http.post(f"{base}/v1/sessions/{sid}/audio", data=b"\x00\x00") as r:
                assert r.status == 409 and "input has ended" in (await r.json())["detail"]
            await http.delete(f"{base}/v1/sessions/{sid}")

    asyncio.run(main())
    assert engine.metrics.counters["sessions_created_total"] == created + 3
    for _ in range(100):
        if not engine.sessions:
            break
        time.sleep(0.05)
    assert not engine.sessions and engine.stalled() is None
    test_client_helper_streams_in_real_time(server, expected)


def test_a_listener_that_leaves_after_its_body_frees_the_slot(server):
    """/v1/chat?end_on_input_end=0 keeps a call going after its body; a client that then goes away
    must end it, not leave it to the idle timeout."""
    base, engine = server

    async def main():
        async with aiohttp.ClientSession() as http:
            r = await http.post(f"{base}/v1/chat?end_on_input_end=0&greedy=1", data=b"\x00\x00" * 1920 * 3)
            sid = r.headers["x-session-id"]
            await r.content.readline()  # the first frame
            assert sid in engine.sessions
            r.close()
            for _ in range(100):
                if sid not in engine.sessions:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("the session outlived its client")

    asyncio.run(main())


def test_admission_waits_on_the_event_loop_and_counts_each_refusal_once(tiny_wrap_ckpt):
    httpx = pytest.importorskip("httpx")
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=1))
    engine = EngineLoop(runner, max_waiting=0)
    app = create_app(engine, ServeConfig(admission_wait=0.3))
    held = engine.create_session(SamplingConfig(), lambda event: None)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            # More waiting callers than the default thread pool has threads: none waits on another.
            replies = await asyncio.gather(*(c.post("/v1/sessions", json={}) for _ in range(16)))
            assert [r.status_code for r in replies] == [503] * 16
            assert engine.metrics.counters["sessions_rejected_total"] == 16
            # A slot that frees during the wait admits the caller.
            waiting = asyncio.create_task(c.post("/v1/sessions", json={}))
            await asyncio.sleep(0.1)
            engine.end_session(held.id, "done")
            assert (await waiting).status_code == 201

    asyncio.run(main())


def test_throttle_slows_only_a_reader_whose_buffer_is_full():
    from api.bridge import throttle
    from engine.session import Session
    session = Session(SamplingConfig(), 1920, 2, False, lambda event: None)

    async def timed() -> float:
        start = time.perf_counter()
        await throttle(session)
        return time.perf_counter() - start

    session.push(np.zeros(1920, dtype=np.float32))
    assert asyncio.run(timed()) < 0.05
    session.push(np.zeros(3 * 1920, dtype=np.float32))  # over two frames: the oldest dropped
    assert session.dropped_samples == 2 * 1920 and asyncio.run(timed()) >= 0.07


def test_uploads_stop_with_their_session_and_a_413_ends_it(tiny_wrap_ckpt):
    httpx = pytest.importorskip("httpx")
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=2))
    engine = EngineLoop(runner, max_waiting=0)
    app = create_app(engine, ServeConfig(max_body_mb=0.01))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            sid = (await c.post("/v1/sessions", json={})).json()["id"]
            deleted = asyncio.Event()

            async def body():
                yield b"\x00\x00" * 100
                await c.delete(f"/v1/sessions/{sid}")
                deleted.set()
                yield b"\x00\x00" * 100
            r = await c.post(f"/v1/sessions/{sid}/audio", content=body())
            assert deleted.is_set() and r.status_code == 409 and "has ended (deleted)" in r.json()["detail"]
            # Past --max-body-mb: 413, and the session ends (its input was cut short).
            sid = (await c.post("/v1/sessions", json={})).json()["id"]
            r = await c.post(f"/v1/sessions/{sid}/audio", content=b"\x00" * 20000)
            assert r.status_code == 413 and sid not in engine.sessions  # never joined: gone at once
            assert engine.metrics.counters["sessions_finished_total"] == 2
            # A header that is not UTF-8 is read as Latin-1, as HTTP defines it: no 500.
            r = await c.post("/v1/chat?tokens=maybe", content=b"", headers={"x-note": b"caf\xe9"})
            assert r.status_code == 422 and "tokens must be one of" in r.json()["detail"]

    asyncio.run(main())


def test_a_caller_gone_during_the_admission_wait_gets_no_session(tiny_wrap_ckpt, monkeypatch):
    httpx = pytest.importorskip("httpx")
    from starlette.requests import Request
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=1))
    engine = EngineLoop(runner, max_waiting=0)
    app = create_app(engine, ServeConfig())

    async def gone(self):
        return True
    monkeypatch.setattr(Request, "is_disconnected", gone)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.post("/v1/sessions", json={})).status_code == 400

    asyncio.run(main())
    assert [s.end_reason for s in engine.sessions.values()] in ([], ["client_disconnected"])
    assert engine.sched.free_slots == 1


def test_message_rate_lets_a_burst_through_then_paces():
    from api.bridge import MessageRate
    rate = MessageRate(100.0, 5.0)

    async def take(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await rate.take()
        return time.perf_counter() - start

    assert asyncio.run(take(5)) < 0.03  # the burst
    assert asyncio.run(take(10)) >= 0.08  # then 100 a second


@pytest.fixture
def fake_server():
    """A server that answers /v1/chat as lockstep would not: `mode` is 503, garbage or noend."""
    import http.server
    mode = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            while size := int(self.rfile.readline().split(b";")[0], 16):  # the chunked upload, to its end
                self.rfile.read(size + 2)
            self.rfile.readline()
            if mode["mode"] == "503":
                self.send_response(503)
                self.send_header("Content-Length", "4")
                self.end_headers()
                self.wfile.write(b"busy")
                return
            self.send_response(200)
            if mode["mode"] == "abort":  # promises more than it sends, then hangs up
                self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"<html>hello</html>\n" if mode["mode"] == "garbage"
                             else b'{"type":"text","frame":0,"text":"hi"}\n')

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", mode
    srv.shutdown()


@pytest.mark.parametrize("mode, said", [("503", "server answered 503: busy"),
                                        ("garbage", "answered something that is not lockstep's event stream"),
                                        ("noend", "stream broke off after 0 frames, before its end event"),
                                        ("abort", "ClientPayloadError")])
def test_client_command_says_why_a_call_failed(fake_server, mode, said, wav_inputs, tmp_path, capsys):
    from engine.cli import main
    url, state = fake_server
    state["mode"] = mode
    with pytest.raises(SystemExit) as exc:
        main(["client", url, str(wav_inputs[0]), "--output", str(tmp_path / "r.wav"), "--no-pace"])
    assert exc.value.code == 1 and said in capsys.readouterr().err
    if mode in ("noend", "abort"):  # what came is kept
        assert (tmp_path / "r.txt").read_text() == "hi\n"


def test_client_command_refuses_what_it_cannot_do_before_calling(wav_inputs, tmp_path, capsys):
    from engine.cli import main
    wav = str(wav_inputs[0])
    for argv, said in [([f"http://127.0.0.1:{free_port()}", wav, "--output", str(tmp_path / "a.wav")], "cannot talk to"),
                       (["127.0.0.1:8998", wav, "--output", str(tmp_path / "a.wav")], "as http://HOST:PORT"),
                       (["http://127.0.0.1:1", str(tmp_path / "none.wav"), "--output", str(tmp_path / "a.wav")],
                        "cannot read"),
                       (["http://127.0.0.1:1", wav, "--output", str(tmp_path / "a.txt")], "transcript goes beside"),
                       (["http://127.0.0.1:1", wav, "--output", str(tmp_path / "no" / "a.wav")],
                        "is not a writable folder"),
                       (["http://127.0.0.1:1", wav, "--output", ""], "name a file to write"),
                       (["http://127.0.0.1:1", wav, "--output", str(tmp_path)], "name a file to write"),
                       (["http://127.0.0.1:99999", wav, "--output", str(tmp_path / "a.wav")],
                        "is not a server address")]:
        with pytest.raises(SystemExit) as exc:
            main(["client", *argv, "--no-pace"])
        assert exc.value.code == 1 and said in capsys.readouterr().err, argv
