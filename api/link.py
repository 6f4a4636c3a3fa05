"""An API process's connection to the engine process (the other end of engine/process/hub.py).

Everything here runs on the API process's event loop. Audio pushed by any handler in one pass of
the loop leaves as one message; each tick's frames arrive as one message and are handed to the
sessions' queues. Requests (open, attach, status...) are answered by the engine between ticks.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
from typing import Callable

import numpy as np

from engine.process import wire
from engine.config import SamplingConfig
from engine.cadence import stall_reason
from engine.session import FrameOutput

log = logging.getLogger("lockstep")
REQUEST_TIMEOUT = 10.0  # an engine that answers nothing for this long is hung (liveness says so sooner)


class EngineUnavailable(RuntimeError):
    """The engine process is gone or does not answer."""


class RemoteSession:
    """An engine session as one API handler sees it: it pushes the session's audio and reads its
    counters; `end_reason` is set when the engine says the session ended."""

    def __init__(self, link: "EngineLink", reply: dict):
        self.link, self.id, self.handle = link, reply["sid"], reply["handle"]
        self.info = reply["info"]
        self.frame_size = self.info["frame_size"]
        self.end_on_input_end = self.info["end_on_input_end"]
        self.max_buffer = link.max_buffer_samples
        self.input_ended = reply["input_ended"]
        self.end_reason: str | None = None
        self._sent = reply.get("received", 0)  # samples the engine has had for it, counted from here on
        self._fill = (0, self._sent)  # (buffered, received) at the engine's latest tick

    def push(self, pcm: np.ndarray) -> None:
        if self.input_ended or self.end_reason is not None or not len(pcm):
            return
        self.link.push(self.handle, pcm)
        self._sent += len(pcm)

    def end_input(self) -> None:
        if not self.input_ended:
            self.input_ended = True
            self.link.note("end_input", handle=self.handle)

    def clear_input(self) -> None:
        self.link.note("clear_input", handle=self.handle)

    def buffered_samples(self) -> int:
        """Input received and not yet stepped: the engine's count at its latest tick, plus what was
        pushed since."""
        buffered, received = self._fill
        return max(0, buffered + self._sent - received)


class EngineLink(asyncio.Protocol):
    def __init__(self, name: str, heartbeat_path: str | None = None):
        self.name = name
        self.heartbeat = wire.Heartbeat(heartbeat_path) if heartbeat_path else None
        self.reader = wire.Reader()
        self.transport: asyncio.Transport | None = None
        self.lost: str | None = None
        self.state: dict = {"free": 0, "draining": False, "failed_ticks": 0, "last_error": None}
        self.max_sessions = self.frame_size = self.max_buffer_samples = 0
        self.defaults = SamplingConfig()
        self.outputs: dict[int, Callable[[FrameOutput | str], None]] = {}  # handle -> where its output goes
        self.inputs: dict[int, RemoteSession] = {}  # handle -> an upload this process feeds
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future] = {}
        self._audio: list[tuple[int, np.ndarray]] = []
        self._admission: list[asyncio.Future] = []
        # Called in the caller's context once an "open" is answered (admitted, queued or refused):
        # a cluster replica notes there which proxy request it has placed (api/cluster.py).
        self.on_open: Callable[[], None] | None = None

    @classmethod
    async def connect(cls, path: str, name: str, heartbeat_path: str | None = None) -> "EngineLink":
        link = cls(name, heartbeat_path)
        await asyncio.get_running_loop().create_unix_connection(lambda: link, path)
        hello = await link.request("hello", name=name)
        link.max_sessions, link.frame_size = hello["max_sessions"], hello["frame_size"]
        link.max_buffer_samples = hello["max_buffer_samples"]
        link.defaults = SamplingConfig(**hello["defaults"])  # (its "state" was taken as every reply's is)
        return link

    # ---- what handlers call -----------------------------------------------------------------------
    @property
    def draining(self) -> bool:
        return bool(self.state["draining"])

    def stalled(self) -> str | None:
        """Why the engine is not serving, or None while it is."""
        if self.lost:
            return self.lost
        age = self.heartbeat.age() if self.heartbeat else None
        return stall_reason(age, self.state["failed_ticks"], self.state["last_error"])

    def end_session(self, sid: str, reason: str) -> None:
        self.note("end", sid=sid, reason=reason)

    async def request(self, op: str, on_reply: Callable[[dict], None] | None = None, **fields) -> dict:
        """The engine's answer to `op`. `on_reply` sees it the moment it arrives, before any message
        after it: where to send a session's frames must be known before its first frame comes."""
        if self.lost:
            raise EngineUnavailable(self.lost)
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        future.on_reply = on_reply  # type: ignore[attr-defined]
        self._replies[rid] = future
        self._send_audio()  # what was pushed before this request reaches the engine before it
        self.transport.write(wire.control(wire.REQUEST, {"id": rid, "op": op, **fields}))
        try:
            reply = await asyncio.wait_for(future, REQUEST_TIMEOUT)
            if op == "open" and self.on_open is not None:
                self.on_open()
            return reply
        except asyncio.TimeoutError:
            raise EngineUnavailable(f"the engine did not answer {op!r} within {REQUEST_TIMEOUT:.0f} s") from None
        finally:
            self._replies.pop(rid, None)

    def note(self, op: str, **fields) -> None:
        if not self.lost:
            self._send_audio()  # an upload's end must not overtake its last audio
            self.transport.write(wire.control(wire.NOTE, {"op": op, **fields}))

    def push(self, handle: int, pcm: np.ndarray) -> None:
        """Queues audio for the engine; everything queued in this pass of the event loop leaves as
        one message."""
        if not self._audio:
            asyncio.get_running_loop().call_soon(self._send_audio)
        self._audio.append((handle, pcm))

    def _send_audio(self) -> None:
        chunks, self._audio = self._audio, []
        if chunks and not self.lost:
            self.transport.write(wire.pack_audio(chunks))

    async def admission(self, timeout: float) -> None:
        """Waits (at most `timeout` s) until the engine says an admission may be free, or draining
        began; waiters are woken first come, first served, as many as there are free admissions."""
        future = asyncio.get_running_loop().create_future()
        self._admission.append(future)
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            if future in self._admission:
                self._admission.remove(future)

    # ---- what the engine sends --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = "the engine process has ended"
        log.error("API process %s: lost the engine (%s)", self.name, exc or "connection closed")
        for future in self._replies.values():
            if not future.done():
                future.set_exception(EngineUnavailable(self.lost))
        for deliver in list(self.outputs.values()):
            deliver("engine_lost")
        for session in self.inputs.values():
            session.end_reason = session.end_reason or "engine_lost"
        self.outputs.clear()
        self.inputs.clear()
        self._wake(len(self._admission))

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (msg := self.reader.next()) is not None:
                kind, payload = msg
                if kind == wire.TICK:
                    self._tick(*wire.unpack_tick(payload))
                elif kind == wire.REPLY:
                    body = json.loads(bytes(payload))
                    if "state" in body:
                        self._set_state(body.pop("state"))
                    future = self._replies.get(body.pop("id"))
                    if future is not None and not future.done():
                        if future.on_reply is not None:
                            future.on_reply(body)
                        future.set_result(body)
                elif kind == wire.STATE:
                    self._set_state(json.loads(bytes(payload)))
        except (wire.WireError, ValueError, KeyError) as e:
            log.error("API process %s: the engine broke the protocol (%s)", self.name, e)
            self.transport.close()

    def _tick(self, frames: wire.Frames | None, info: dict) -> None:
        if frames is not None:
            audio_tokens = frames.audio_tokens.tolist()
            for i, handle in enumerate(frames.handles.tolist()):
                deliver = self.outputs.get(handle)
                if deliver is not None:
                    deliver(FrameOutput(int(frames.frames[i]), int(frames.text_tokens[i]), frames.text[i],
                                        audio_tokens[i], frames.pcm[i]))
        for handle, buffered, received in info["fill"]:
            session = self.inputs.get(handle)
            if session is not None:
                session._fill = (buffered, received)
        for handle, reason in info["ended"]:
            session = self.inputs.pop(handle, None)
            if session is not None:
                session.end_reason = reason
            deliver = self.outputs.pop(handle, None)
            if deliver is not None:
                deliver(reason)
        if "state" in info:
            self._set_state(info["state"])

    def _set_state(self, state: dict) -> None:
        self.state = state
        self._wake(len(self._admission) if state["draining"] else state["free"])

    def _wake(self, n: int) -> None:
        for future in self._admission[:n]:
            if not future.done():
                future.set_result(None)
