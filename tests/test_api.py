"""The HTTP and websocket API. Parity runs through `lockstep serve` as users run it (a supervisor,
an engine process and an API process, over loopback in real time); refusals and corner cases run
through the same parts in the test's process, where a test can hold slots or drain the engine."""
import asyncio
import base64
import json
import socket
import time

import numpy as np
import pytest

from api.client import chat
from engine.audio import frames, pcm_to_s16le, read_audio
from engine.config import EngineConfig, SamplingConfig, ServeConfig
from engine.generate import run_sessions
from engine.runner import ModelRunner
from engine.serving import EngineLoop
from tests.servers import InProcessServer, LiveServer, read_events

aiohttp = pytest.importorskip("aiohttp")
MAX_SESSIONS = 8


@pytest.fixture(scope="module")
def server(tiny_wrap_ckpt):
    srv = LiveServer(tiny_wrap_ckpt, "--max-sessions", str(MAX_SESSIONS), "--idle-timeout", "5",
                     "--admission-wait", "0.2")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def runner(tiny_wrap_ckpt):
    return ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=2))


@pytest.fixture
def local(runner):
    """`local(**serve_settings)`: the server's parts in this process, over a fresh engine loop."""
    made = []

    def make(max_sessions: int | None = None, **settings) -> InProcessServer:
        cfg = ServeConfig(**{"admission_wait": 0.0, **settings})
        loop = EngineLoop(runner, max_buffer_frames=250, idle_timeout=cfg.idle_timeout, max_waiting=0,
                          max_input_lag=cfg.max_input_lag)
        if max_sessions is not None:
            loop.limit_admission(max_sessions)
        made.append(InProcessServer(loop, cfg))
        return made[-1]

    yield make
    for srv in made:
        srv.close()


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


async def gone(base: str, sid: str, timeout: float = 5.0) -> bool:
    """Whether the session has ended within `timeout` seconds."""
    async with aiohttp.ClientSession() as http:
        for _ in range(int(timeout / 0.05)):
            async with http.get(f"{base}/v1/sessions/{sid}") as r:
                if r.status == 404:
                    return True
            await asyncio.sleep(0.05)
    return False


async def v1_session(http, base, pcm: np.ndarray, body: dict):
    async with http.post(f"{base}/v1/sessions", json=body) as r:
        assert r.status == 201, await r.text()
        info = await r.json()
    events = []

    reader = asyncio.create_task(read_events(http, f"{base}/v1/sessions/{info['id']}/stream", events))
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
    names = list(expected) * 2
    underruns = server.metric("input_underruns_total")

    async def main():
        async with aiohttp.ClientSession() as http:
            return await asyncio.gather(*[
                v1_session(http, server.url, expected[n][0].reshape(-1), {"greedy": True, "end_on_input_end": True})
                for n in names])

    results = asyncio.run(main())
    for name, (info, events) in zip(names, results):
        assert info["sample_rate"] == 24000 and info["frame_size"] == 1920 and not info["realtime"]
        tokens = [e for e in events if e["type"] == "tokens"]
        assert [e["text_token"] for e in tokens] == expected[name][1]
        assert [e["audio_tokens"] for e in tokens] == expected[name][2]
        audio = [e for e in events if e["type"] == "audio"]
        assert [e["frame"] for e in audio] == list(range(len(expected[name][1])))
        assert all(len(base64.b64decode(e["pcm"])) == 3840 for e in audio)
        assert events[-1] == {"type": "end", "reason": "input_end"}
    assert server.metric("input_underruns_total") == underruns


def test_chat_is_full_duplex(server, expected):
    """The client sends its next frame only after reading output: this deadlocks unless the server
    reads the body while it streams the response."""
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
            async with http.post(f"{server.url}/v1/chat", params={"greedy": "1", "tokens": "1"}, data=body()) as r:
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


def client_streams_in_real_time(base: str, expected) -> None:
    pcm = expected["delta"][0].reshape(-1)
    res = asyncio.run(chat(base, pcm, realtime=True, params={"greedy": True}))
    assert res.text_tokens == expected["delta"][1] and res.end_reason == "input_end"
    # Paced input: output frames arrive about one per 80 ms, not all at once.
    assert res.frame_times[-1] - res.frame_times[0] > 0.05 * (len(res.frame_times) - 1)


def test_client_helper_streams_in_real_time(server, expected):
    client_streams_in_real_time(server.url, expected)


def test_moshi_websocket_protocol_with_opus(server, expected):
    sphn = pytest.importorskip("sphn")
    pcm = expected["charlie"][0].reshape(-1)

    async def main():
        writer, reader = sphn.OpusStreamWriter(24000), sphn.OpusStreamReader(24000)
        out_pcm, texts = [], []
        async with aiohttp.ClientSession() as http:
            url = server.url.replace("http", "ws") + "/api/chat?text_temperature=0.7&text_topk=25" \
                "&audio_temperature=0.8&audio_topk=250&text_seed=4&audio_seed=5"
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
    base = server.url

    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v1/sessions", data=b"{not json",
                                 headers={"content-type": "application/json"}) as r:
                assert r.status == 422
            async with http.post(f"{base}/v1/sessions", json={"temperature": -1}) as r:
                assert r.status == 422
            async with http.post(f"{base}/v1/sessions", json={"bogus": 1}) as r:
                assert r.status == 422
            for method, path in (("get", "/stream"), ("post", "/audio"), ("delete", ""), ("get", "")):
                async with getattr(http, method)(f"{base}/v1/sessions/nope{path}") as r:
                    assert r.status == 404
            # Odd byte count: the whole samples are kept, the request is told it was malformed.
            async with http.post(f"{base}/v1/sessions", json={}) as r:
                sid = (await r.json())["id"]
            async with http.post(f"{base}/v1/sessions/{sid}/audio", data=b"\x01\x02\x03") as r:
                assert r.status == 400
            async with http.delete(f"{base}/v1/sessions/{sid}") as r:
                assert r.status == 204
            async with http.delete(f"{base}/v1/sessions/{sid}") as r:  # ended: there is nothing to delete
                assert r.status == 404
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
            assert await gone(base, sid)
            async with http.get(f"{base}/metrics") as r:
                text = await r.text()
                assert "lockstep:step_duration_seconds_bucket" in text and "lockstep:sessions_rejected_total" in text

    asyncio.run(main())
    # Still serving: a fresh session gets the right tokens.
    client_streams_in_real_time(base, expected)


def test_session_status_and_listing(server, expected):
    base = server.url

    async def poll(http, sid, until):
        for _ in range(100):
            async with http.get(f"{base}/v1/sessions/{sid}") as r:
                if r.status == 404 or until(await r.json()):
                    return r.status, await r.json()
            await asyncio.sleep(0.05)
        raise AssertionError(f"session {sid} never reached the state asked for")

    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v1/sessions", json={"greedy": True, "realtime": True}) as r:
                sid = (await r.json())["id"]
            async with http.get(f"{base}/v1/sessions/{sid}") as r:
                status = await r.json()
            assert status["id"] == sid and status["sample_rate"] == 24000 and status["sampling"]["greedy"]
            assert status["state"] == "waiting" and status["slot"] is None and status["frames_out"] == 0
            assert status["realtime"] and status["lag_dropped_samples"] == 0
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


def test_client_command_saves_audio_and_transcript(server, expected, wav_inputs, tmp_path, capsys):
    from engine.cli import main
    out = tmp_path / "reply.wav"
    main(["client", server.url, str(wav_inputs[3]), "--output", str(out), "--greedy", "--no-pace"])
    assert len(read_audio(out)) == 1920 * len(expected["delta"][1])
    assert out.with_suffix(".txt").exists()
    assert "end: input_end" in capsys.readouterr().out


def test_websocket_garbage_ends_nothing_but_its_own_session(server, expected):
    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(server.url.replace("http", "ws") + "/api/chat") as ws:
                assert await ws.receive_bytes(timeout=10) == b"\x00"
                await ws.send_str("not binary")
                await ws.send_bytes(b"")
                await ws.send_bytes(b"\x07junk")
                await ws.send_bytes(b"\x01" + bytes(range(256)) * 4)  # not Ogg/Opus
                await asyncio.sleep(0.3)
                assert not ws.closed
            # Bad settings: refused with a close frame that says why.
            async with http.ws_connect(server.url.replace("http", "ws") + "/api/chat?audio_topk=-3") as ws:
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1008
                assert msg.extra.startswith("bad sampling parameters: top_k must be an integer")

    asyncio.run(main())
    assert server.wait_idle()
    client_streams_in_real_time(server.url, expected)


def test_abuse_gets_clear_refusals_and_harms_no_one(server, expected):
    """Found by an adversarial run: out-of-range settings, bodies that are too big or too deep,
    bad query flags, uploads that collide or come after the input ended, and inputless sessions."""
    base = server.url
    created = server.metric("sessions_created_total")

    async def main():
        async with aiohttp.ClientSession() as http:
            for body in ({"top_k": 2**63}, {"text_top_k": 2**31}, {"temperature": "NaN"}, {"temperature": 1e309}):
                async with http.post(f"{base}/v1/sessions", json=body) as r:
                    assert r.status == 422, body
            async with http.post(f"{base}/v1/sessions", data=b"[" * 60000) as r:
                assert r.status == 422 and "nested too deeply" in (await r.json())["detail"]
            async with http.post(f"{base}/v1/sessions", data=b" " * (1 << 20)) as r:
                assert r.status == 413
            for query in ("top_k=18446744073709551616", "greedy=maybe", "temperature=inf", "realtime=2"):
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
    assert server.metric("sessions_created_total") == created + 3
    assert server.wait_idle() and server.get("/healthz")[0] == 200
    client_streams_in_real_time(base, expected)


def test_a_listener_that_leaves_after_its_body_frees_the_slot(server):
    """/v1/chat?end_on_input_end=0 keeps a call going after its body; a client that then goes away
    must end it, not leave it to the idle timeout."""
    async def main():
        async with aiohttp.ClientSession() as http:
            r = await http.post(f"{server.url}/v1/chat?end_on_input_end=0&greedy=1", data=b"\x00\x00" * 1920 * 3)
            sid = r.headers["x-session-id"]
            await r.content.readline()  # the first frame
            async with http.get(f"{server.url}/v1/sessions/{sid}") as status:
                assert status.status == 200
            r.close()
            assert await gone(server.url, sid), "the session outlived its client"

    asyncio.run(main())


def test_api_key_required_when_configured(local):
    srv = local(api_key=("sekrit", "clé"))

    async def main():
        async with aiohttp.ClientSession() as http:
            for headers in ({}, {"authorization": "Bearer nope"}):
                async with http.post(f"{srv.url}/v1/sessions", json={}, headers=headers) as r:
                    assert r.status == 401
            # A key that is not ASCII is compared as bytes: a 401 when it is wrong, not a 500.
            async with http.get(f"{srv.url}/v1/sessions", headers={"authorization": "Bearer clè"}) as r:
                assert r.status == 401
            async with http.get(f"{srv.url}/v1/sessions", headers={"authorization": "Bearer clé"}) as r:
                assert r.status == 200  # sent as UTF-8, as aiohttp sends it
            async with http.post(f"{srv.url}/v1/sessions", json={}, headers={"authorization": "Bearer sekrit"}) as r:
                assert r.status == 201
            async with http.get(f"{srv.url}/metrics") as r:  # behind the key too, on the API port
                assert r.status == 401
            async with http.get(f"{srv.url}/metrics", headers={"authorization": "Bearer sekrit"}) as r:
                assert r.status == 200
            async with http.get(f"{srv.url}/healthz") as r:
                assert r.status == 200

    asyncio.run(main())
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:  # a byte that is not UTF-8 either
        s.sendall(b"GET /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cl\xe9\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 401")


def test_chat_endpoint_refusals(local):
    """/v1/chat's error replies."""
    srv = local(api_key=("sekrit",), max_body_mb=0.01)
    key = {"authorization": "Bearer sekrit"}

    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{srv.url}/v1/chat", headers=key) as r:
                assert r.status == 405 and r.headers["allow"] == "POST"
            async with http.post(f"{srv.url}/v1/chat", data=b"") as r:
                assert r.status == 401
            async with http.post(f"{srv.url}/v1/chat", params={"top_k": "-3"}, data=b"", headers=key) as r:
                assert r.status == 422 and "invalid query parameters" in (await r.json())["detail"]
            # Over --max-body-mb (10 KB here) as it streams in: the session ends with that reason...
            async def body():
                yield b"\0" * 8000
                yield b"\0" * 8000
            async with http.post(f"{srv.url}/v1/chat", data=body(), headers=key) as r:
                assert r.status == 200
                assert [json.loads(line) async for line in r.content][-1] == {"type": "end", "reason": "body_too_large"}
            # ...and declared so: refused before anything is read or any session made.
            async with http.post(f"{srv.url}/v1/chat", data=b"\0" * 20_000, headers=key) as r:
                assert r.status == 413
            # Every slot taken: 503 with Retry-After.
            held = [srv.engine.create_session(SamplingConfig(), lambda event: None) for _ in range(2)]
            async with http.post(f"{srv.url}/v1/chat", data=b"", headers=key) as r:
                assert r.status == 503 and r.headers["retry-after"] == "1"
                assert (await r.json())["detail"] == "all session slots are busy"
            for session in held:
                srv.engine.end_session(session.id, "done")
            srv.engine.drain()
            await asyncio.sleep(0.3)  # the engine tells the API process at its next pass
            async with http.post(f"{srv.url}/v1/chat", data=b"", headers=key) as r:
                assert r.status == 503 and (await r.json())["detail"] == "server is shutting down"

    asyncio.run(main())


def test_websocket_refusals_say_why(local):
    srv = local()

    async def closed_with() -> tuple:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(srv.url.replace("http", "ws") + "/api/chat") as ws:
                msg = await ws.receive(timeout=10)
                return ws.close_code, msg.extra

    held = [srv.engine.create_session(SamplingConfig(), lambda event: None) for _ in range(2)]
    assert asyncio.run(closed_with()) == (1013, "all session slots are busy; try again later")
    for session in held:
        srv.engine.end_session(session.id, "done")
    srv.engine.drain()
    time.sleep(0.3)
    assert asyncio.run(closed_with()) == (1013, "server is shutting down")


def test_static_folder_is_served_beside_the_api(local, tmp_path):
    (tmp_path / "index.html").write_text("<html>moshi ui</html>")
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "app.js").write_text("console.log(1)")
    srv = local(static=str(tmp_path))

    async def main():
        async with aiohttp.ClientSession() as http:
            assert await (await http.get(f"{srv.url}/")).text() == "<html>moshi ui</html>"
            assert await (await http.get(f"{srv.url}/assets/app.js")).text() == "console.log(1)"
            assert (await http.get(f"{srv.url}/nope.css")).status == 404
            assert await (await http.get(f"{srv.url}/healthz")).json() == {"status": "ok"}  # the API comes first
            assert (await http.post(f"{srv.url}/v1/sessions", json={})).status == 201

    asyncio.run(main())


def test_unread_output_ends_the_session(local, monkeypatch):
    import engine.process.session_table
    monkeypatch.setattr(engine.process.session_table, "MAX_UNREAD_FRAMES", 3)
    srv = local()

    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{srv.url}/v1/sessions", json={}) as r:
                sid = (await r.json())["id"]
            async with http.post(f"{srv.url}/v1/sessions/{sid}/audio", data=b"\x00\x00" * 1920 * 12):
                pass
            assert await gone(srv.url, sid)
            async with http.get(f"{srv.url}/v1/sessions/{sid}/stream") as r:
                assert r.status == 404

    asyncio.run(main())
    assert srv.engine.metrics.counters["sessions_finished_total"] == 1


def test_unset_sampling_fields_take_the_checkpoints_defaults(local, runner, monkeypatch):
    from api.moshi_ws import sampling_from_query
    monkeypatch.setattr(runner, "default_sampling", SamplingConfig(temperature=0.5, top_k=9, text_temperature=0.3,
                                                                   text_top_k=4))
    srv = local()

    async def main():
        async with aiohttp.ClientSession() as http:
            plain = (await (await http.post(f"{srv.url}/v1/sessions", json={})).json())["sampling"]
            assert plain == {**runner.default_sampling.__dict__}
            some = await (await http.post(f"{srv.url}/v1/sessions", json={"top_k": 3, "greedy": True,
                                                                           "seed": 5})).json()
            assert some["sampling"] == {**plain, "top_k": 3, "greedy": True, "seed": 5}

    asyncio.run(main())
    got = sampling_from_query({"audio_topk": "7", "text_temperature": ""}, runner.default_sampling)
    assert got == SamplingConfig(temperature=0.5, top_k=7, text_temperature=0.3, text_top_k=4)


def test_admission_waits_on_the_event_loop_and_counts_each_refusal_once(local):
    srv = local(admission_wait=0.3)
    held = [srv.engine.create_session(SamplingConfig(), lambda event: None) for _ in range(2)]

    async def main():
        async with aiohttp.ClientSession() as http:
            # More waiting callers than the default thread pool has threads: none waits on another.
            replies = await asyncio.gather(*(http.post(f"{srv.url}/v1/sessions", json={}) for _ in range(16)))
            assert [r.status for r in replies] == [503] * 16
            await asyncio.sleep(0.2)  # the last refusal's note reaches the engine
            assert srv.engine.metrics.counters["sessions_rejected_total"] == 16
            # A slot that frees during the wait admits the caller.
            waiting = asyncio.create_task(http.post(f"{srv.url}/v1/sessions", json={}))
            await asyncio.sleep(0.1)
            srv.engine.end_session(held[0].id, "done")
            assert (await waiting).status == 201

    asyncio.run(main())


def test_uploads_stop_with_their_session_and_a_413_ends_it(local):
    srv = local(max_body_mb=0.01)

    async def main():
        async with aiohttp.ClientSession() as http:
            sid = (await (await http.post(f"{srv.url}/v1/sessions", json={})).json())["id"]
            deleted = asyncio.Event()

            async def body():
                yield b"\x00\x00" * 100
                async with http.delete(f"{srv.url}/v1/sessions/{sid}") as r:
                    assert r.status == 204
                deleted.set()
                await asyncio.sleep(0.3)  # the end reaches the upload's API process at the next tick
                yield b"\x00\x00" * 100
            async with http.post(f"{srv.url}/v1/sessions/{sid}/audio", data=body()) as r:
                assert deleted.is_set() and r.status == 409 and "has ended (deleted)" in (await r.json())["detail"]
            # Past --max-body-mb as it streams: 413, and the session ends (its input was cut short).
            sid = (await (await http.post(f"{srv.url}/v1/sessions", json={})).json())["id"]

            async def big():
                for _ in range(4):
                    yield b"\x00" * 5000
            async with http.post(f"{srv.url}/v1/sessions/{sid}/audio", data=big()) as r:
                assert r.status == 413
            assert await gone(srv.url, sid)
            # A header that is not UTF-8 is read as Latin-1, as HTTP defines it: no 500.
            async with http.post(f"{srv.url}/v1/chat?tokens=maybe", data=b"",
                                 headers={"x-note": "caf\xe9"}) as r:
                assert r.status == 422 and "tokens must be one of" in (await r.json())["detail"]

    asyncio.run(main())
    assert srv.engine.metrics.counters["sessions_finished_total"] == 2


def test_a_caller_gone_during_the_admission_wait_gets_no_session(local, monkeypatch):
    from starlette.requests import Request
    srv = local()

    async def gone_(self):
        return True
    monkeypatch.setattr(Request, "is_disconnected", gone_)

    async def main():
        async with aiohttp.ClientSession() as http:
            assert (await http.post(f"{srv.url}/v1/sessions", json={})).status == 400

    asyncio.run(main())
    time.sleep(0.3)
    assert [s.end_reason for s in srv.engine.sessions.values()] in ([], ["client_disconnected"])
    assert srv.engine.sched.free_slots == 2


def test_throttle_slows_only_a_reader_whose_buffer_is_full():
    from api.bridge import throttle
    from api.link import EngineLink, RemoteSession
    link = EngineLink("test")
    link.max_buffer_samples = 2 * 1920
    pushed = []
    link.push = lambda handle, pcm: pushed.append(pcm)
    session = RemoteSession(link, {"sid": "s", "handle": 1, "input_ended": False, "received": 0,
                                   "info": {"frame_size": 1920, "end_on_input_end": False}})

    async def timed() -> float:
        start = time.perf_counter()
        await throttle(session)
        return time.perf_counter() - start

    session.push(np.zeros(1920, dtype=np.float32))
    assert asyncio.run(timed()) < 0.05
    session.push(np.zeros(1920, dtype=np.float32))  # two frames not yet stepped: the buffer is full
    assert asyncio.run(timed()) >= 0.07
    session._fill = (1920, 3840)  # the engine has stepped one of them
    assert asyncio.run(timed()) < 0.05


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
