"""The engine process's side of the wire: the API processes' connections, mapped onto the loop.

The hub runs on the engine loop's own thread, in the time between ticks
(`EngineLoop.run_realtime(wait=hub.serve, after_tick=hub.flush)`): it never delays a tick by
more than one message, and no API process's traffic, however heavy, reaches the tick itself.

A session is not tied to one API process: its input and its output are each attached to at most
one connection (a REST session is made by one request, uploaded to by a second and streamed by a
third, and these may reach different API processes). Output nobody has attached yet is kept, up
to `MAX_UNREAD_FRAMES`, for the stream that will. Each tick, each connection gets one message with
its frames, the sessions that ended, how full its uploads' buffers are, and the admission state.
"""
from __future__ import annotations

import json
import logging
import selectors
import socket
import time
from dataclasses import dataclass, field

import numpy as np

from engine import wire
from engine.config import FRAME_RATE, SAMPLE_RATE, SamplingConfig
from engine.serving import EngineLoop
from engine.session import FrameOutput, Session

log = logging.getLogger("lockstep")
MAX_UNREAD_FRAMES = 250  # 20 s of output kept for a stream not yet attached
# A session that ends before its stream is attached (an upload that ran through first) keeps its
# output and end for the stream that comes, this long, at most this many sessions at once.
KEEP_ENDED_SECONDS, KEEP_ENDED_SESSIONS = 30.0, 64
MAX_BACKLOG = 64 << 20  # bytes waiting for an API process that does not read: it is hung
READ_SIZE = 1 << 18


@dataclass(eq=False)
class Entry:
    handle: int
    session: Session
    output: "Link | None" = None
    input: "Link | None" = None
    pending: list[FrameOutput] = field(default_factory=list)  # output kept until a stream attaches
    end: str | None = None  # why it ended, kept with `pending` for a stream that comes after
    kept_until: float = 0.0


class Link:
    """One API process's connection: bytes in and out, and what it gets at the next tick."""

    def __init__(self, sock: socket.socket):
        self.sock, self.reader, self.out = sock, wire.Reader(), bytearray()
        self.name = "?"
        self.frames: list[tuple[int, FrameOutput]] = []
        self.ended: list[tuple[int, str]] = []
        self.inputs: set[Entry] = set()


class Hub:
    def __init__(self, loop: EngineLoop, listener: socket.socket, heartbeat: wire.Heartbeat):
        self.loop, self.heartbeat = loop, heartbeat
        listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ, None)
        self.links: dict[socket.socket, Link] = {}
        self.entries: dict[int, Entry] = {}
        self.by_sid: dict[str, Entry] = {}
        self.ended: dict[str, Entry] = {}  # ended before a stream was attached, oldest first
        self._next_handle = 1
        self.api_counters: dict[str, dict[str, int]] = {}  # per API process: what it refused at the door
        self._state_sent: dict | None = None

    # ---- I/O ------------------------------------------------------------------------------------
    def serve(self, timeout: float) -> None:
        """Serves the connections for `timeout` seconds; one pass when 0 (the loop is behind)."""
        self.heartbeat.beat()
        deadline = time.monotonic() + timeout
        while True:
            busy = any(link.reader.pending for link in self.links.values())
            for key, mask in self.sel.select(0 if busy else max(0.0, deadline - time.monotonic())):
                if key.data is None:
                    self._accept(key.fileobj)
                elif mask & selectors.EVENT_READ:
                    self._read(key.data)
                if mask & selectors.EVENT_WRITE and key.data.sock in self.links:
                    self._send(key.data)
            for link in list(self.links.values()):
                self._handle(link, deadline)
            self._broadcast_state()
            self.heartbeat.beat()
            if time.monotonic() >= deadline:
                return

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        link = Link(sock)
        self.links[sock] = link
        self.sel.register(sock, selectors.EVENT_READ, link)

    def _read(self, link: Link) -> None:
        try:
            data = link.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(link, "its connection closed")
        else:
            link.reader.feed(data)

    def _handle(self, link: Link, deadline: float) -> None:
        """Every whole message `link` sent, at least one even when the loop is behind."""
        first = True
        while link.sock in self.links and (first or time.monotonic() < deadline):
            first = False
            try:
                msg = link.reader.next()
                if msg is None:
                    return
                kind, payload = msg
                if kind == wire.AUDIO:
                    for handle, pcm in wire.unpack_audio(payload):
                        entry = self.entries.get(handle)
                        if entry is not None and entry.input is link:
                            entry.session.push(pcm)
                elif kind in (wire.REQUEST, wire.NOTE):
                    body = json.loads(bytes(payload))
                    reply = self._request(link, body) if kind == wire.REQUEST else self._note(link, body)
                    if kind == wire.REQUEST:
                        self.send(link, wire.control(wire.REPLY, {"id": body["id"], **reply}))
                else:
                    raise wire.WireError(f"unexpected message kind {kind}")
            except (wire.WireError, ValueError, KeyError, TypeError) as e:
                self._close(link, f"it broke the protocol ({type(e).__name__}: {e})")

    def send(self, link: Link, data: bytes) -> None:
        link.out += data
        self._send(link)

    def _send(self, link: Link) -> None:
        try:
            sent = link.sock.send(link.out) if link.out else 0
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(link, "its connection broke")
            return
        del link.out[:sent]
        if len(link.out) > MAX_BACKLOG:
            self._close(link, f"it stopped reading ({len(link.out) >> 20} MB unread)")
            return
        self.sel.modify(link.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if link.out else 0), link)

    def _close(self, link: Link, why: str) -> None:
        if self.links.pop(link.sock, None) is None:
            return
        self.sel.unregister(link.sock)
        link.sock.close()
        log.warning("API process %s left the engine: %s", link.name, why)
        for entry in list(self.entries.values()):
            if entry.output is link:
                self.loop.end_session(entry.session.id, "api_process_lost")
            if entry.input is link:  # as if its upload had ended there
                entry.input = None
                if entry.session.end_on_input_end:
                    entry.session.end_input()

    # ---- every tick -----------------------------------------------------------------------------
    def flush(self) -> None:
        """After a tick: each connection's frames, ended sessions and upload levels, one message each."""
        now = time.monotonic()
        while self.ended and next(iter(self.ended.values())).kept_until < now:
            self.ended.pop(next(iter(self.ended)))
        state = self._state()
        changed = state != self._state_sent
        for link in list(self.links.values()):
            fills = [[e.handle, e.session.buffered_samples(), e.session.received_samples] for e in link.inputs]
            if not (link.frames or link.ended or fills or changed):
                continue
            info = {"ended": link.ended, "fill": fills, **({"state": state} if changed else {})}
            self.send(link, wire.pack_tick(self._frames(link.frames), info))
            link.frames, link.ended = [], []
        self._state_sent = state
        self.heartbeat.beat()

    @staticmethod
    def _frames(rows: list[tuple[int, FrameOutput]]) -> wire.Frames | None:
        if not rows:
            return None
        outs = [out for _, out in rows]
        return wire.Frames(np.array([h for h, _ in rows]), np.array([o.frame for o in outs]),
                           np.array([o.text_token for o in outs]), np.array([o.audio_tokens for o in outs]),
                           np.stack([o.pcm for o in outs]), [o.text for o in outs])

    def _state(self) -> dict:
        loop = self.loop
        return {"free": loop.admissions_free(), "draining": loop.draining, "sessions": len(loop.sessions),
                "free_slots": loop.sched.free_slots, "failed_ticks": loop.failed_ticks,
                "last_error": loop.last_error}

    def _broadcast_state(self) -> None:
        """Admission freed or draining begun between ticks: waiting callers hear of it now."""
        state = self._state()
        if state != self._state_sent:
            for link in list(self.links.values()):
                self.send(link, wire.control(wire.STATE, state))
            self._state_sent = state

    # ---- sessions -------------------------------------------------------------------------------
    def _sink(self, entry: Entry):
        def sink(event: FrameOutput | str) -> None:
            if isinstance(event, str):
                for link in {entry.output, entry.input} - {None}:
                    link.ended.append((entry.handle, event))
                    link.inputs.discard(entry)
                self.entries.pop(entry.handle, None)
                self.by_sid.pop(entry.session.id, None)
                if entry.output is None and event != "output_not_read":
                    entry.end, entry.kept_until = event, time.monotonic() + KEEP_ENDED_SECONDS
                    self.ended[entry.session.id] = entry
                    while len(self.ended) > KEEP_ENDED_SESSIONS:
                        self.ended.pop(next(iter(self.ended)))
            elif entry.output is not None:
                entry.output.frames.append((entry.handle, event))
            else:
                entry.pending.append(event)
                if len(entry.pending) > MAX_UNREAD_FRAMES:  # nobody reads it: stop it before it grows
                    self.loop.end_session(entry.session.id, "output_not_read")
        return sink

    def describe(self, session: Session) -> dict:
        return {"id": session.id, "sample_rate": SAMPLE_RATE, "frame_size": session.frame_size,
                "frame_rate": FRAME_RATE, "format": "s16le", "channels": 1,
                "end_on_input_end": session.end_on_input_end, "realtime": session.realtime,
                "output_delay_frames": self.loop.runner.max_delay, "sampling": session.sampling.__dict__}

    def _attach(self, link: Link, entry: Entry, output: bool, input: bool) -> dict:
        if output:
            entry.output = link
            link.frames += [(entry.handle, out) for out in entry.pending]
            entry.pending = []
        if input:
            entry.input = link
            link.inputs.add(entry)
        return {"ok": True, "sid": entry.session.id, "handle": entry.handle, "info": self.describe(entry.session),
                "input_ended": entry.session.input_ended, "received": entry.session.received_samples}

    def _request(self, link: Link, body: dict) -> dict:
        op, loop = body["op"], self.loop
        if op == "hello":
            link.name = str(body["name"])
            return {"ok": True, "max_sessions": loop.max_sessions, "frame_size": loop.runner.frame_size,
                    "max_buffer_samples": loop.max_buffer_frames * loop.runner.frame_size,
                    "defaults": loop.runner.default_sampling.__dict__, "state": self._state()}
        if op == "open":
            try:
                sampling = SamplingConfig(**body["sampling"])
                entry = Entry(self._next_handle, None)  # type: ignore[arg-type]
                session = loop.create_session(sampling, self._sink(entry), body["end_on_input_end"],
                                              count_rejection=False, realtime=body["realtime"])
            except (ValueError, TypeError) as e:
                return {"ok": False, "status": 422, "detail": str(e)}
            if session is None:
                return {"ok": False, "status": 503, "detail": "server is shutting down" if loop.draining
                        else "all session slots are busy"}
            self._next_handle += 1
            entry.session = session
            self.entries[entry.handle], self.by_sid[session.id] = entry, entry
            return self._attach(link, entry, body.get("output", False), body.get("input", False))
        if op == "attach":
            kept = self.ended.get(body["sid"])
            if kept is not None and body["role"] == "output":  # its output, then its end, at the next tick
                del self.ended[body["sid"]]
                reply = self._attach(link, kept, output=True, input=False)
                link.ended.append((kept.handle, kept.end))
                return reply
            if kept is not None:
                return {"ok": False, "status": 409, "detail": "this session's input has ended"
                        if kept.session.input_ended else f"this session has ended ({kept.end})"}
            entry = self.by_sid.get(body["sid"])
            if entry is None or entry.session.end_reason is not None:
                return {"ok": False, "status": 404, "detail": f"no session {body['sid']!r} (unknown or already ended)"}
            if body["role"] == "output":
                if entry.output is not None:
                    return {"ok": False, "status": 409, "detail": "this session's stream is already being read"}
                return self._attach(link, entry, output=True, input=False)
            if entry.session.input_ended:
                return {"ok": False, "status": 409, "detail": "this session's input has ended"}
            if entry.input is not None:
                return {"ok": False, "status": 409, "detail": "this session's audio is already being uploaded"}
            return self._attach(link, entry, output=False, input=True)
        if op == "status":
            entry = self.by_sid.get(body["sid"])
            status = None if entry is None else loop.status(entry.session.id)
            if status is None:
                return {"ok": False, "status": 404, "detail": f"no session {body['sid']!r} (unknown or already ended)"}
            return {"ok": True, "status": {**self.describe(entry.session), **status, **self._where(entry.session.id)}}
        if op == "end":  # DELETE: unlike the note, it says whether there was a session to end
            entry = self.by_sid.get(body["sid"])
            if entry is None or entry.session.end_reason is not None:
                return {"ok": False, "status": 404, "detail": f"no session {body['sid']!r} (unknown or already ended)"}
            loop.end_session(entry.session.id, body["reason"])
            return {"ok": True}
        if op == "list":
            return {"ok": True, "sessions": [{**s, **self._where(s["id"])} for s in loop.statuses()],
                    "slots_total": loop.max_sessions, "free_slots": loop.sched.free_slots}
        if op == "metrics":
            return {"ok": True, "text": loop.metrics.render() + self._render_api_counters()}
        raise KeyError(f"unknown request {op!r}")

    def _where(self, sid: str) -> dict:
        """Which API process streams a session's output (None while nobody does)."""
        entry = self.by_sid.get(sid)
        return {"api_process": entry.output.name if entry is not None and entry.output is not None else None}

    def _note(self, link: Link, body: dict) -> dict:
        op, loop = body["op"], self.loop
        entry = self.entries.get(body.get("handle", -1))
        if op == "end":
            loop.end_session(body["sid"], body["reason"])
        elif op == "detach" and entry is not None and entry.input is link:
            entry.input = None
            link.inputs.discard(entry)
        elif op == "end_input" and entry is not None and entry.input is link:
            entry.session.end_input()
        elif op == "clear_input" and entry is not None and entry.input is link:
            entry.session.clear_input()
        elif op == "rejected":
            loop.metrics.inc("sessions_rejected_total")
        elif op == "counters":
            self.api_counters[link.name] = {str(k): int(v) for k, v in body["values"].items()}
        elif op == "drain":
            loop.drain()
        elif op == "end_all":
            for sid in list(loop.sessions):
                loop.end_session(sid, body["reason"])
        elif op == "stop":
            loop.stop()
        return {}

    def _render_api_counters(self) -> str:
        names = sorted({name for counters in self.api_counters.values() for name in counters})
        lines = []
        for name in names:
            lines.append(f"# TYPE lockstep:api_{name} counter")
            lines += [f'lockstep:api_{name}{{api_process="{proc}"}} {counters.get(name, 0)}'
                      for proc, counters in sorted(self.api_counters.items())]
        return "\n".join(lines) + ("\n" if lines else "")
