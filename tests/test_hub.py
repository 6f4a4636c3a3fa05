"""The engine process's hub driven over real sockets by peers speaking the wire, with the engine
loop ticked by hand: sessions opened and attached from different API processes, frames and ends
routed to whoever holds them, a peer that leaves or breaks the protocol."""
import json
import socket

import numpy as np
import pytest

from engine.process import wire
from engine.config import EngineConfig
from engine.process.hub import Hub
from engine.runner import ModelRunner
from engine.serving import EngineLoop

FRAME = np.zeros(1920, np.float32)


@pytest.fixture(scope="module")
def runner(tiny_wrap_ckpt):
    return ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=2))


class Peer:
    """An API process's end of the wire, served by `hub` whenever it waits for something."""

    def __init__(self, hub: Hub, path: str, name: str):
        self.hub, self.sock, self.reader = hub, socket.socket(socket.AF_UNIX), wire.Reader()
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.ids, self.inbox = 0, []
        self.request("hello", name=name)

    def pump(self) -> None:
        self.hub.serve(0.01)
        try:
            while data := self.sock.recv(1 << 20):
                self.reader.feed(data)
        except BlockingIOError:
            pass
        while (msg := self.reader.next()) is not None:
            self.inbox.append(msg)

    def request(self, op: str, **fields) -> dict:
        self.ids += 1
        self.sock.sendall(wire.control(wire.REQUEST, {"id": self.ids, "op": op, **fields}))
        for _ in range(100):
            self.pump()
            for i, (kind, payload) in enumerate(self.inbox):
                if kind == wire.REPLY and json.loads(bytes(payload))["id"] == self.ids:
                    del self.inbox[i]
                    return json.loads(bytes(payload))
        raise AssertionError(f"no reply to {op}")

    def note(self, op: str, **fields) -> None:
        self.sock.sendall(wire.control(wire.NOTE, {"op": op, **fields}))
        self.pump()

    def push(self, handle: int, frames: int) -> None:
        self.sock.sendall(wire.pack_audio([(handle, np.tile(FRAME, frames))]))
        self.pump()

    def ticks(self) -> list[tuple]:
        """The TICK messages received so far, as (frames, info)."""
        self.pump()
        out = [wire.unpack_tick(p) for k, p in self.inbox if k == wire.TICK]
        self.inbox = [(k, p) for k, p in self.inbox if k != wire.TICK]
        return out


@pytest.fixture
def hub(runner, tmp_path):
    loop = EngineLoop(runner, max_buffer_frames=250, max_waiting=0, max_input_lag=0.3)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "engine.sock"))
    listener.listen(8)
    hub = Hub(loop, listener, wire.Heartbeat(str(tmp_path / "hb"), create=True))
    hub.path = str(tmp_path / "engine.sock")
    yield hub
    for sid in list(loop.sessions):
        loop.end_session(sid, "done")
    loop.tick()


def tick(hub: Hub, n: int = 1) -> None:
    for _ in range(n):
        hub.loop.tick()
        hub.flush()


def frames_for(ticks: list[tuple], handle: int) -> list[int]:
    return [int(f.frames[i]) for f, _ in ticks if f is not None for i, h in enumerate(f.handles) if h == handle]


def ended(ticks: list[tuple]) -> list:
    return [e for _, info in ticks for e in info["ended"]]


def test_a_call_opened_with_its_input_and_output_runs_to_its_end(hub):
    peer = Peer(hub, hub.path, "api-0")
    opened = peer.request("open", sampling={"greedy": True}, end_on_input_end=True, realtime=True,
                          input=True, output=True)
    assert opened["ok"] and opened["info"]["realtime"] and opened["info"]["output_delay_frames"] == 1
    h = opened["handle"]
    peer.push(h, 3)
    peer.note("end_input", handle=h)
    tick(hub, 5)
    got = peer.ticks()
    assert frames_for(got, h) == [0, 1] and ended(got) == [[h, "input_end"]]
    assert got[0][1]["fill"] == [[h, 1920 * 2, 1920 * 3]]  # its upload's level after the first tick


def test_a_rest_session_across_three_api_processes(hub):
    """Made by one, uploaded to by a second, streamed by a third: frames reach only the stream, the
    upload's level only the uploader, the end both; a second stream or upload is refused."""
    maker, uploader, streamer = (Peer(hub, hub.path, f"api-{i}") for i in range(3))
    made = maker.request("open", sampling={}, end_on_input_end=True, realtime=False, input=False, output=False)
    sid = made["sid"]
    stream = streamer.request("attach", sid=sid, role="output")
    assert stream["ok"] and streamer.request("attach", sid=sid, role="output")["status"] == 409
    upload = uploader.request("attach", sid=sid, role="input")
    assert upload["ok"] and maker.request("attach", sid=sid, role="input")["status"] == 409
    assert maker.request("attach", sid="nope", role="output")["status"] == 404
    maker.push(made["handle"], 2)  # not its upload: ignored
    uploader.push(upload["handle"], 3)
    assert hub.loop.status(sid)["buffered_seconds"] == 3 * 0.08
    uploader.note("end_input", handle=upload["handle"])
    uploader.note("detach", handle=upload["handle"])
    assert uploader.request("attach", sid=sid, role="input")["status"] == 409  # its input has ended
    tick(hub, 5)
    assert frames_for(streamer.ticks(), stream["handle"]) == [0, 1]
    up, mk = uploader.ticks(), maker.ticks()
    assert not frames_for(up, upload["handle"]) and not frames_for(mk, made["handle"])
    status = streamer.request("status", sid=sid)
    assert status["status"] == 404


def test_a_session_that_ended_before_its_stream_keeps_its_output_for_it(hub):
    peer = Peer(hub, hub.path, "api-0")
    made = peer.request("open", sampling={}, end_on_input_end=True, realtime=False, input=True, output=False)
    peer.push(made["handle"], 3)
    peer.note("end_input", handle=made["handle"])
    tick(hub, 5)
    assert not hub.loop.sessions
    late = Peer(hub, hub.path, "api-1")
    stream = late.request("attach", sid=made["sid"], role="output")
    assert stream["ok"]
    tick(hub)
    got = late.ticks()
    assert frames_for(got, stream["handle"]) == [0, 1] and ended(got) == [[stream["handle"], "input_end"]]
    assert late.request("attach", sid=made["sid"], role="output")["status"] == 404  # given once


def test_an_api_process_that_leaves_takes_only_its_streams(hub):
    staying, leaving = Peer(hub, hub.path, "api-0"), Peer(hub, hub.path, "api-1")
    kept = staying.request("open", sampling={}, end_on_input_end=False, realtime=True, input=True, output=True)
    cut = leaving.request("open", sampling={}, end_on_input_end=False, realtime=True, input=True, output=True)
    listed = {s["id"]: s["api_process"] for s in staying.request("list")["sessions"]}
    assert listed == {kept["sid"]: "api-0", cut["sid"]: "api-1"}
    for peer, s in ((staying, kept), (leaving, cut)):
        peer.push(s["handle"], 2)
    tick(hub)
    leaving.sock.close()
    hub.serve(0.01)
    tick(hub, 2)
    assert set(hub.loop.sessions) == {kept["sid"]}
    assert frames_for(staying.ticks(), kept["handle"])


def test_a_peer_that_breaks_the_protocol_is_dropped_alone(hub):
    good, bad = Peer(hub, hub.path, "api-0"), Peer(hub, hub.path, "api-1")
    bad.sock.sendall(wire.message(wire.NOTE, b"{not json"))
    hub.serve(0.01)
    assert len(hub.links) == 2 - 1
    assert good.request("list")["ok"]


def test_admission_freeing_is_told_to_every_api_process_at_once(hub):
    a, b = Peer(hub, hub.path, "api-0"), Peer(hub, hub.path, "api-1")
    held = [a.request("open", sampling={}, end_on_input_end=False, realtime=True, input=True, output=True)
            for _ in range(2)]
    refused = b.request("open", sampling={}, end_on_input_end=False, realtime=True, input=True, output=True)
    state = refused.pop("state")  # an admission's reply carries the engine's state after it
    assert refused == {"id": 2, "ok": False, "status": 503, "detail": "all session slots are busy"}
    assert state["free"] == 0 and state["sessions"] == 2
    b.pump()
    b.inbox.clear()
    a.note("end", sid=held[0]["sid"], reason="deleted")
    b.pump()
    states = [json.loads(bytes(p)) for k, p in b.inbox if k == wire.STATE]
    assert states and states[-1]["free"] == 1
