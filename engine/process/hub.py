"""The engine process's side of the wire: the API processes' connections, mapped onto the loop.

The hub runs on the engine loop's own thread, in the time between ticks
(`EngineLoop.run_realtime(wait=hub.serve, after_tick=hub.flush)`): it never delays a tick by
more than one message, and no API process's traffic, however heavy, reaches the tick itself.

Which connection holds each session's input and output is the session table's business
(engine/process/session_table.py). Each tick, each connection gets one message with its frames, the
sessions that ended, how full its uploads' buffers are, and the admission state.
"""
from __future__ import annotations

import json
import logging
import selectors
import socket
import time

import numpy as np

from engine.process import wire
from engine.serving import EngineLoop
from engine.session import FrameOutput
from engine.process.session_table import SessionTable

log = logging.getLogger("lockstep")
MAX_BACKLOG = 64 << 20  # bytes waiting for an API process that does not read: it is hung
READ_SIZE = 1 << 18


class Link:
    """One API process's connection: bytes in and out, and what it gets at the next tick."""

    def __init__(self, sock: socket.socket):
        self.sock, self.reader, self.out = sock, wire.Reader(), bytearray()
        self.name = "?"
        self.frames: list[tuple[int, FrameOutput]] = []
        self.ended: list[tuple[int, str]] = []
        self.inputs: set = set()  # the session table's entries whose upload this link feeds


class Hub:
    def __init__(self, loop: EngineLoop, listener: socket.socket, heartbeat: wire.Heartbeat):
        self.loop, self.heartbeat = loop, heartbeat
        listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ, None)
        self.links: dict[socket.socket, Link] = {}
        self.table = SessionTable(loop)
        self.api_counters: dict[str, dict[str, int]] = {}  # per API process: what it refused at the door
        self._state_sent: dict | None = None

    # ---- I/O ------------------------------------------------------------------------------------
    def serve(self, timeout: float) -> None:
        """Serves the connections for `timeout` seconds; one pass when 0 (the loop is behind)."""
        self.heartbeat.beat()
        deadline = time.monotonic() + timeout
        behind: set[Link] = set()  # links left with whole messages when the last pass ran out of time
        while True:
            for key, mask in self.sel.select(0 if behind else max(0.0, deadline - time.monotonic())):
                if key.data is None:
                    self._accept(key.fileobj)
                elif mask & selectors.EVENT_READ:
                    self._read(key.data)
                if mask & selectors.EVENT_WRITE and key.data.sock in self.links:
                    self._send(key.data)
            behind = {link for link in list(self.links.values()) if self._handle(link, deadline)}
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

    def _handle(self, link: Link, deadline: float) -> bool:
        """Every whole message `link` sent, at least one even when the loop is behind; True when
        time ran out first."""
        first = True
        while link.sock in self.links:
            if not first and time.monotonic() >= deadline:
                return True
            first = False
            try:
                msg = link.reader.next()
                if msg is None:
                    return False
                kind, payload = msg
                if kind == wire.AUDIO:
                    self.table.push(link, wire.unpack_audio(payload))
                elif kind in (wire.REQUEST, wire.NOTE):
                    body = json.loads(bytes(payload))
                    reply = self._request(link, body) if kind == wire.REQUEST else self._note(link, body)
                    if kind == wire.REQUEST:
                        if body["op"] in ("open", "end"):
                            # The asker's view of free slots moves with its own admission now, not
                            # a tick later: a cluster replica reports it to the router meanwhile.
                            reply = {**reply, "state": self._state()}
                        self.send(link, wire.control(wire.REPLY, {"id": body["id"], **reply}))
                else:
                    raise wire.WireError(f"unexpected message kind {kind}")
            except (wire.WireError, ValueError, KeyError, TypeError) as e:
                self._close(link, f"it broke the protocol ({type(e).__name__}: {e})")
        return False

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
        self.table.forget(link)

    # ---- every tick -----------------------------------------------------------------------------
    def flush(self) -> None:
        """After a tick: each connection's frames, ended sessions and upload levels, one message each."""
        self.table.expire()
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

    def _request(self, link: Link, body: dict) -> dict:
        op, loop = body["op"], self.loop
        if op == "hello":
            link.name = str(body["name"])
            return {"ok": True, "max_sessions": loop.max_sessions, "frame_size": loop.runner.frame_size,
                    "max_buffer_samples": loop.max_buffer_frames * loop.runner.frame_size,
                    "defaults": loop.runner.default_sampling.__dict__, "state": self._state()}
        if op == "metrics":
            return {"ok": True, "text": loop.metrics.render() + self._render_api_counters()}
        return self.table.request(link, op, body)

    def _note(self, link: Link, body: dict) -> dict:
        op, loop = body["op"], self.loop
        if op == "rejected":
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
        else:
            self.table.note(link, op, body)
        return {}

    def _render_api_counters(self) -> str:
        names = sorted({name for counters in self.api_counters.values() for name in counters})
        lines = []
        for name in names:
            lines.append(f"# TYPE lockstep:api_{name} counter")
            lines += [f'lockstep:api_{name}{{api_process="{proc}"}} {counters.get(name, 0)}'
                      for proc, counters in sorted(self.api_counters.items())]
        return "\n".join(lines) + ("\n" if lines else "")
