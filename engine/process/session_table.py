"""Which API connection holds each session's input and output, for the engine process's hub.

A session is not tied to one API process: its input and its output are each attached to at most
one connection (a REST session is made by one request, uploaded to by a second and streamed by a
third, and these may reach different API processes). Output nobody has attached yet is kept, up
to `MAX_UNREAD_FRAMES`, for the stream that will; a session that ends before its stream comes keeps
its output and end for it a while. Sessions are known to connections by a small integer handle, so
no frame carries its session's id.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from engine.config import FRAME_RATE, SAMPLE_RATE, SamplingConfig
from engine.serving import EngineLoop
from engine.session import FrameOutput, Session

MAX_UNREAD_FRAMES = 250  # 20 s of output kept for a stream not yet attached
# A session that ends before its stream is attached (an upload that ran through first) keeps its
# output and end for the stream that comes, this long, at most this many sessions at once.
KEEP_ENDED_SECONDS, KEEP_ENDED_SESSIONS = 30.0, 64


@dataclass(eq=False)
class Entry:
    handle: int
    session: Session
    output: object | None = None  # the hub's Link that streams its output
    input: object | None = None  # the Link that feeds its upload
    pending: list[FrameOutput] = field(default_factory=list)  # output kept until a stream attaches
    end: str | None = None  # why it ended, kept with `pending` for a stream that comes after
    kept_until: float = 0.0


def _missing(sid: str) -> dict:
    return {"ok": False, "status": 404, "detail": f"no session {sid!r} (unknown or already ended)"}


def _conflict(detail: str) -> dict:
    return {"ok": False, "status": 409, "detail": detail}


class SessionTable:
    def __init__(self, loop: EngineLoop):
        self.loop = loop
        self.entries: dict[int, Entry] = {}
        self.by_sid: dict[str, Entry] = {}
        self.ended: dict[str, Entry] = {}  # ended before a stream was attached, oldest first
        self._next_handle = 1

    def push(self, link, chunks: list[tuple[int, np.ndarray]]) -> None:
        """Audio from `link`, for the uploads it holds (any other handle is ignored)."""
        for handle, pcm in chunks:
            entry = self.entries.get(handle)
            if entry is not None and entry.input is link:
                entry.session.push(pcm)

    def forget(self, link) -> None:
        """`link` is gone: the sessions it streamed end, its uploads end as if their body had."""
        for entry in list(self.entries.values()):
            if entry.output is link:
                self.loop.end_session(entry.session.id, "api_process_lost")
            if entry.input is link:
                entry.input = None
                if entry.session.end_on_input_end:
                    entry.session.end_input()

    def expire(self) -> None:
        now = time.monotonic()
        while self.ended and next(iter(self.ended.values())).kept_until < now:
            self.ended.pop(next(iter(self.ended)))

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

    def _where(self, sid: str) -> dict:
        """Which API process streams a session's output (None while nobody does)."""
        entry = self.by_sid.get(sid)
        return {"api_process": entry.output.name if entry is not None and entry.output is not None else None}

    def _attach(self, link, entry: Entry, output: bool, input: bool) -> dict:
        if output:
            entry.output = link
            link.frames += [(entry.handle, out) for out in entry.pending]
            entry.pending = []
        if input:
            entry.input = link
            link.inputs.add(entry)
        return {"ok": True, "sid": entry.session.id, "handle": entry.handle, "info": self.describe(entry.session),
                "input_ended": entry.session.input_ended, "received": entry.session.received_samples}

    def _open(self, link, body: dict) -> dict:
        loop = self.loop
        try:
            entry = Entry(self._next_handle, None)  # type: ignore[arg-type]
            session = loop.create_session(SamplingConfig(**body["sampling"]), self._sink(entry),
                                          body["end_on_input_end"], count_rejection=False, realtime=body["realtime"])
        except (ValueError, TypeError) as e:
            return {"ok": False, "status": 422, "detail": str(e)}
        if session is None:
            slots_full = loop.max_admitted is not None and len(loop.sessions) >= loop.max_admitted
            busy = ("all session slots are busy" if slots_full or loop.runner.kv.can_admit() else
                    "the KV pool cannot promise another session its minimum context (--kv-min-seconds)")
            return {"ok": False, "status": 503, "detail": "server is shutting down" if loop.draining else busy}
        self._next_handle += 1
        entry.session = session
        self.entries[entry.handle], self.by_sid[session.id] = entry, entry
        return self._attach(link, entry, body.get("output", False), body.get("input", False))

    def _attach_to(self, link, sid: str, role: str) -> dict:
        kept = self.ended.get(sid)
        if kept is not None and role == "output":  # its output, then its end, at the next tick
            del self.ended[sid]
            reply = self._attach(link, kept, output=True, input=False)
            link.ended.append((kept.handle, kept.end))
            return reply
        if kept is not None:
            return _conflict("this session's input has ended" if kept.session.input_ended
                             else f"this session has ended ({kept.end})")
        entry = self.by_sid.get(sid)
        if entry is None or entry.session.end_reason is not None:
            return _missing(sid)
        if role == "output":
            if entry.output is not None:
                return _conflict("this session's stream is already being read")
            return self._attach(link, entry, output=True, input=False)
        if entry.session.input_ended:
            return _conflict("this session's input has ended")
        if entry.input is not None:
            return _conflict("this session's audio is already being uploaded")
        return self._attach(link, entry, output=False, input=True)

    def request(self, link, op: str, body: dict) -> dict:
        loop = self.loop
        if op == "open":
            return self._open(link, body)
        if op == "attach":
            return self._attach_to(link, body["sid"], body["role"])
        if op == "status":
            entry = self.by_sid.get(body["sid"])
            status = None if entry is None else loop.status(entry.session.id)
            if status is None:
                return _missing(body["sid"])
            return {"ok": True, "status": {**self.describe(entry.session), **status, **self._where(entry.session.id)}}
        if op == "end":  # DELETE: unlike the note, it says whether there was a session to end
            entry = self.by_sid.get(body["sid"])
            if entry is None or entry.session.end_reason is not None:
                return _missing(body["sid"])
            loop.end_session(entry.session.id, body["reason"])
            return {"ok": True}
        if op == "list":
            return {"ok": True, "sessions": [{**s, **self._where(s["id"])} for s in loop.statuses()],
                    "slots_total": loop.max_sessions, "free_slots": loop.sched.free_slots}
        raise KeyError(f"unknown request {op!r}")

    def note(self, link, op: str, body: dict) -> None:
        entry = self.entries.get(body.get("handle", -1))
        if op == "end":
            self.loop.end_session(body["sid"], body["reason"])
        elif op not in ("detach", "end_input", "clear_input"):
            raise KeyError(f"unknown note {op!r}")
        elif entry is not None and entry.input is link:
            if op == "detach":
                entry.input = None
                link.inputs.discard(entry)
            elif op == "end_input":
                entry.session.end_input()
            else:
                entry.session.clear_input()
