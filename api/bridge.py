"""Bridges engine sessions (engine thread) to asyncio handlers (event loop)."""
from __future__ import annotations

import asyncio
import time

from engine.config import FRAME_RATE, SAMPLE_RATE, SamplingConfig, ServeConfig
from engine.serving import EngineLoop
from engine.session import FrameOutput, Session


MAX_UNREAD_FRAMES = 250  # 20 s of output
# (per second, burst) a connection is read at: far above what any client needs (Kyutai's sends a
# message per 80 ms frame; HTTP bodies come in chunks of kilobytes), far below a flood.
WS_MESSAGE_RATE = (100.0, 200.0)
HTTP_CHUNK_RATE = (2000.0, 2000.0)


class MessageRate:
    """Caps the messages one connection is read at (a token bucket): a client flooding messages
    that carry no audio (empty, text, unknown kinds) never fills its buffer, so `throttle` would
    not slow it, yet each message costs the event loop, and through the GIL the engine's ticks."""

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

    async def pace(self, session: Session) -> None:
        """What every reader does after each message: `throttle`, then this cap."""
        await throttle(session)
        await self.take()


async def throttle(session: Session) -> None:
    """Slows a reader whose session already holds `--max-buffer-seconds` of input: what comes on
    still drops the oldest (counted), but a client sending far faster than real time no longer costs
    the server a decode per message, nor its neighbours their ticks."""
    if session.buffered_samples() >= session.max_buffer:
        await asyncio.sleep(1 / FRAME_RATE)


class ApiSession:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[FrameOutput | str] = asyncio.Queue()
        self.session: Session  # set right after admission
        self._stream_claimed = False
        self.uploading = False  # an audio upload is being read

    def sink(self, event: FrameOutput | str) -> None:
        # Called on the engine thread; the queue belongs to the event loop.
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def claim_stream(self) -> bool:
        if self._stream_claimed:
            return False
        self._stream_claimed = True
        return True


class SessionRegistry:
    def __init__(self, engine: EngineLoop, cfg: ServeConfig):
        self.engine = engine
        self.cfg = cfg
        self._by_id: dict[str, ApiSession] = {}
        # Set when an admission frees (or draining starts); made on the loop the API runs on, once known.
        self._freed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        engine.on_admission_change.append(self._wake_waiters)

    def _wake_waiters(self) -> None:
        """On the engine thread (or any other): wakes the callers waiting for admission."""
        loop, freed = self._loop, self._freed
        if loop is not None and freed is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(freed.set)
            except RuntimeError:  # closed meanwhile
                pass

    @property
    def defaults(self) -> SamplingConfig:
        """What a session gets for the sampling settings it leaves unset: the checkpoint's."""
        return self.engine.runner.default_sampling

    async def open(self, sampling: SamplingConfig, end_on_input_end: bool) -> ApiSession | None:
        api_session = ApiSession(asyncio.get_running_loop())

        def sink(event: FrameOutput | str) -> None:
            if isinstance(event, str):
                self._by_id.pop(api_session.session.id, None)
            elif api_session.queue.qsize() > MAX_UNREAD_FRAMES:
                # Nobody reads this session's output: stop it before its backlog grows without bound.
                self.engine.end_session(api_session.session.id, "output_not_read")
            api_session.sink(event)

        # Admission may wait for a slot: on the event loop, woken when one frees, since a thread per
        # waiting caller would exhaust the default pool and make each refusal and admission wait on
        # the others, and polling would cost the engine's lock a take per waiter per poll.
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # an asyncio.Event belongs to the loop it first waits on
            self._loop, self._freed = loop, asyncio.Event()
        deadline = loop.time() + self.cfg.admission_wait
        while True:
            self._freed.clear()  # before trying: a slot that frees after the try wakes the wait
            session = self.engine.create_session(sampling, sink, end_on_input_end, count_rejection=False)
            left = deadline - loop.time()
            if session is not None or self.engine.draining or left <= 0:
                break
            try:
                await asyncio.wait_for(self._freed.wait(), left)
            except asyncio.TimeoutError:
                pass
        if session is None:
            self.engine.metrics.inc("sessions_rejected_total")
            return None
        api_session.session = session
        self._by_id[session.id] = api_session
        return api_session

    def refusal(self) -> str:
        """Why `open` just returned None, as every route tells the caller."""
        return "server is shutting down" if self.engine.draining else "all session slots are busy"

    def get(self, sid: str) -> ApiSession | None:
        return self._by_id.get(sid)

    def describe(self, api_session: ApiSession) -> dict:
        s = api_session.session
        return {"id": s.id, "sample_rate": SAMPLE_RATE, "frame_size": s.frame_size, "frame_rate": FRAME_RATE,
                "format": "s16le", "channels": 1, "end_on_input_end": s.end_on_input_end,
                "output_delay_frames": self.engine.runner.max_delay,
                "sampling": s.sampling.__dict__}
