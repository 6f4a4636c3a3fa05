"""Bridges the engine's sessions (in the engine process, over api/link.py) to asyncio handlers."""
from __future__ import annotations

import asyncio
import time

from api.link import EngineLink, RemoteSession
from engine.config import FRAME_RATE, SamplingConfig, ServeConfig
from engine.session import FrameOutput

MAX_UNREAD_FRAMES = 250  # 20 s of output
# (per second, burst) a websocket is read at: far above what any client needs (Kyutai's sends a
# message per 80 ms frame), far below a flood. HTTP bodies are capped where their bytes arrive
# (api/limits.py).
WS_MESSAGE_RATE = (100.0, 200.0)


class SessionRefused(Exception):
    """The engine refused a request about a session; `status` is the HTTP status that says why."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class MessageRate:
    """Caps the messages one connection is read at (a token bucket): a client flooding messages
    that carry no audio (empty, text, unknown kinds) never fills its buffer, so `throttle` would
    not slow it, yet each message costs its API process."""

    def __init__(self, per_second: float, burst: float):
        self.per_second, self.burst = per_second, burst
        self.tokens, self.at = burst, time.monotonic()

    async def take(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_second)
        self.at = now
        self.tokens -= 1
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.per_second)

    async def pace(self, session: RemoteSession) -> None:
        """What every reader does after each message: `throttle`, then this cap."""
        await throttle(session)
        await self.take()


async def throttle(session: RemoteSession) -> None:
    """Slows a reader whose session already holds `--max-buffer-seconds` of input: what comes on
    still drops the oldest (counted), but a client sending far faster than real time no longer costs
    the server a decode per message."""
    if session.buffered_samples() >= session.max_buffer:
        await asyncio.sleep(1 / FRAME_RATE)


class ApiSession:
    """A session's output as one handler reads it: FrameOutput objects, then the end reason."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[FrameOutput | str] = asyncio.Queue()
        self.session: RemoteSession  # set when the engine's reply arrives

    def deliver(self, event: FrameOutput | str) -> None:
        if isinstance(event, FrameOutput) and self.queue.qsize() > MAX_UNREAD_FRAMES:
            # Nobody reads this session's output: stop it before its backlog grows without bound.
            self.session.link.end_session(self.session.id, "output_not_read")
        self.queue.put_nowait(event)


class SessionRegistry:
    def __init__(self, engine: EngineLink, cfg: ServeConfig):
        self.engine = engine
        self.cfg = cfg

    @property
    def defaults(self) -> SamplingConfig:
        """What a session gets for the sampling settings it leaves unset: the checkpoint's."""
        return self.engine.defaults

    def _receiver(self, api_session: ApiSession, output: bool, input: bool):
        def on_reply(reply: dict) -> None:
            if not reply["ok"]:
                return
            api_session.session = session = RemoteSession(self.engine, reply)
            if output:
                self.engine.outputs[session.handle] = api_session.deliver
            if input:
                self.engine.inputs[session.handle] = session
        return on_reply

    async def open(self, sampling: SamplingConfig, end_on_input_end: bool, realtime: bool = True,
                   attach: bool = True) -> ApiSession | None:
        """A new session (its input and output attached to the caller unless `attach` is False), or
        None when no slot frees within `--admission-wait` (or the server drains). Waiting costs no
        thread and no engine work: the engine says when an admission frees."""
        api_session = ApiSession()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.admission_wait
        while True:
            reply = await self.engine.request(
                "open", self._receiver(api_session, attach, attach), sampling=sampling.__dict__,
                end_on_input_end=end_on_input_end, realtime=realtime, input=attach, output=attach)
            if reply["ok"]:
                return api_session
            if reply["status"] != 503:
                raise SessionRefused(reply["status"], reply["detail"])
            left = deadline - loop.time()
            if self.engine.draining or left <= 0:
                self.engine.note("rejected")
                return None
            await self.engine.admission(left)

    async def attach(self, sid: str, role: str) -> ApiSession:
        """Takes over a session's output (`role` "output": its stream) or input ("input": an upload)."""
        api_session = ApiSession()
        reply = await self.engine.request("attach", self._receiver(api_session, role == "output", role == "input"),
                                          sid=sid, role=role)
        if not reply["ok"]:
            raise SessionRefused(reply["status"], reply["detail"])
        return api_session

    def detach_input(self, session: RemoteSession) -> None:
        """An upload has ended (the session goes on)."""
        self.engine.inputs.pop(session.handle, None)
        self.engine.note("detach", handle=session.handle)

    async def ask(self, op: str, **fields) -> dict:
        """A request whose refusal is raised as SessionRefused."""
        reply = await self.engine.request(op, **fields)
        if not reply["ok"]:
            raise SessionRefused(reply["status"], reply["detail"])
        return reply

    def refusal(self) -> str:
        """Why `open` just returned None, as every route tells the caller."""
        return "server is shutting down" if self.engine.draining else "all session slots are busy"
