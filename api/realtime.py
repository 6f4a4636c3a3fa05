"""`/v1/realtime`: OpenAI's Realtime API (the GA protocol) over a websocket, so the clients written
for it (the `openai` SDKs, agent frameworks, telephony bridges) reach Moshi by changing a base URL.

A connection is admitted like every other caller (one engine session, the sampling settings from
the query string) and Moshi's output is one response for the whole call: Moshi listens and speaks at
once, so there are no turns to detect or commit. `response.cancel` ends the call but keeps the
connection, where `response.create` starts a new one. The engine is touched only through the
registry and the session's own methods (api/bridge.py).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from typing import Callable

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from api.bridge import WS_MESSAGE_RATE, ApiSession, MessageRate, SessionRefused, SessionRegistry
from api.link import EngineUnavailable
from api.protocol import SessionRequest
from api.realtime_audio import InputDecoder, OutputEncoder
from api.realtime_events import (UNSUPPORTED, Ids, ResponseEvents, client_event_id, error_event,
                                 parse_client_event, user_audio_item)
from api.realtime_settings import RealtimeError, Settings
from engine.session import FrameOutput

log = logging.getLogger("lockstep")
KEY_PROTOCOL = "openai-insecure-api-key."  # how browsers, which cannot set headers, send a key
# How the websocket closes after a call ends that does not leave it open (as /api/chat's codes).
_CLOSE_CODES = {"server_shutdown": 1001, "output_not_read": 1008, "engine_error": 1011, "join_failed": 1011,
                "sink_error": 1011, "engine_lost": 1011, "api_process_lost": 1011}


def settings_from_query(params, registry: SessionRegistry) -> tuple:
    """(sampling, realtime) from the same query parameters and checks as /v1/chat (`model` aside:
    any value, echoed). `realtime=false` lets a client send recorded audio faster than real time
    (held only by --max-buffer-seconds, not --max-input-lag)."""
    fields = {k: v for k, v in params.items() if k != "model"}
    if "end_on_input_end" in fields:
        raise ValueError("end_on_input_end does not apply: a realtime call's input has no end (it ends when the "
                         "client closes or sends response.cancel)")
    req = SessionRequest.model_validate(fields)
    return req.sampling(registry.defaults), req.realtime is not False


def add_realtime_websocket(app: FastAPI, registry: SessionRegistry,
                           authorized: Callable[[WebSocket, str | None], bool]) -> None:
    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket):
        offered = list(ws.scope.get("subprotocols") or [])
        key = next((p[len(KEY_PROTOCOL):] for p in offered if p.startswith(KEY_PROTOCOL)), None)
        # A browser that offered subprotocols fails the handshake unless one is chosen.
        chosen = "realtime" if "realtime" in offered else offered[0] if offered else None
        await ws.accept(subprotocol=chosen)  # before any refusal, so that the error event reaches the client
        ids = Ids()

        async def refuse(code: int, err: RealtimeError, reason: str) -> None:
            try:
                await ws.send_text(json.dumps(error_event(ids, err, None)))
                await ws.close(code=code, reason=reason.encode()[:120].decode(errors="ignore"))  # 123 bytes at most
            except (WebSocketDisconnect, RuntimeError, OSError):
                pass  # gone already

        try:
            allowed = authorized(ws, key)
        except (TypeError, ValueError):  # a key compare_digest cannot take (not ASCII): a wrong key
            allowed = False
        if not allowed:
            msg = "missing or wrong API key (send 'Authorization: Bearer KEY' or the 'openai-insecure-api-key.KEY' subprotocol)"
            return await refuse(1008, RealtimeError(msg, "invalid_api_key"), "missing or wrong API key")
        try:
            sampling, live = settings_from_query(ws.query_params, registry)
        except (ValidationError, ValueError) as e:
            msg = f"bad sampling parameters: {e}"
            return await refuse(1008, RealtimeError(msg, "invalid_query_parameter"), msg)
        connection = RealtimeConnection(ws, registry, ids, Settings(model=ws.query_params.get("model", "moshi")),
                                        sampling, live)
        try:
            api_session = await connection.open()
        except RealtimeError as err:
            return await refuse(1011 if err.code == "engine_unavailable" else 1013, err, err.message)
        await connection.run(api_session)


class RealtimeConnection:
    def __init__(self, ws: WebSocket, registry: SessionRegistry, ids: Ids, settings: Settings, sampling,
                 live: bool):
        self.ws, self.registry, self.ids, self.settings, self.sampling = ws, registry, ids, settings, sampling
        self.live = live
        self.engine = registry.engine
        self.decoder = InputDecoder(settings.input_format)
        self.encoder = OutputEncoder(settings.output_format)
        self.call: ApiSession | None = None  # the call in progress, None after a cancel
        self.paced = None  # the session whose buffer paces the reader (the latest call's)
        self.calls: asyncio.Queue[ApiSession] = asyncio.Queue()  # calls `response.create` started
        self.conversation_id = ids.make("conv")
        self.last_item: str | None = None
        self.appended = 0  # bytes appended since the last commit or clear
        self.told_no_call = False
        self._send_lock = asyncio.Lock()

    async def emit(self, event: dict) -> None:
        async with self._send_lock:  # the reader's replies and the writer's output share the socket
            await self.ws.send_text(json.dumps(event))

    async def run(self, first: ApiSession) -> None:
        self.call = self.paced = first
        reader = asyncio.create_task(self.read())
        call: ApiSession | None = first
        try:
            await self.emit(self.ids.event("session.created", session=self.settings.session()))
            while call is not None:
                reason = await self.respond(call, reader)
                if reason is None:  # the client has gone
                    return
                if reason != "client_cancelled":
                    return await self.ws.close(code=_CLOSE_CODES.get(reason, 1000), reason=reason)
                call = await self.next_call(reader)
            await self.ws.close(code=1000, reason="idle_timeout")
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the client went away while we were sending
        finally:
            if self.call is not None:
                self.engine.end_session(self.call.session.id, "client_disconnected")
            reader.cancel()
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                log.error("/v1/realtime: reading a client failed", exc_info=reader.exception())

    async def next_call(self, reader: asyncio.Task) -> ApiSession | None:
        """After a cancel: the call a `response.create` starts, or None when the client leaves or
        sends none within the idle timeout."""
        getter = asyncio.ensure_future(self.calls.get())
        done, _ = await asyncio.wait({getter, reader}, timeout=self.registry.cfg.idle_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        return None

    async def respond(self, call: ApiSession, reader: asyncio.Task) -> str | None:
        """Streams one call's output as one response; returns its end reason, or None if the
        client went away first."""
        response = ResponseEvents(self.ids, self.settings.output_format, self.conversation_id, self.last_item)
        self.last_item = response.item_id
        for event in response.opening():
            await self.emit(event)
        while True:
            getter = asyncio.ensure_future(call.queue.get())
            done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return None
            out = getter.result()
            if not isinstance(out, FrameOutput):
                break
            if call is not self.call:
                continue  # cancelled: what the engine stepped meanwhile is not sent
            data = self.encoder.encode(out.pcm)
            if data:
                await self.emit(response.audio(data))
            if out.text:
                await self.emit(response.text(out.text))
            response.count(len(out.audio_tokens))
        if out == "client_disconnected":
            return None
        if self.call is call:
            self.call = None
        tail = self.encoder.flush()
        self.encoder = OutputEncoder(self.settings.output_format)  # a next call starts afresh
        if tail:
            await self.emit(response.audio(tail))
        for event in response.closing(out):
            await self.emit(event)
        return out

    async def read(self) -> None:
        rate = MessageRate(*WS_MESSAGE_RATE)
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                event_id = client_event_id(text)  # read first: the event may not parse
                try:
                    event = parse_client_event(text)
                    event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
                    await self.handle(event)
                except RealtimeError as err:
                    await self.emit(error_event(self.ids, err, event_id))
                await rate.pace(self.paced.session)
        except (WebSocketDisconnect, RuntimeError, OSError):
            return  # gone while we were replying

    async def handle(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "input_audio_buffer.append":
            self.append(event.get("audio"))
        elif kind == "input_audio_buffer.commit":
            if self.appended == 0:
                raise RealtimeError("the input audio buffer is empty: nothing was appended since the last "
                                    "commit or clear", "input_audio_buffer_commit_empty")
            self.appended = 0
            item_id, previous = self.ids.make("item"), self.last_item
            self.last_item = item_id
            await self.emit(self.ids.event("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous))
            for done in ("conversation.item.added", "conversation.item.done"):
                await self.emit(self.ids.event(done, previous_item_id=previous, item=user_audio_item(item_id)))
        elif kind == "input_audio_buffer.clear":
            if self.call is not None:
                self.call.session.clear_input()
            self.decoder.reset()
            self.appended = 0
            await self.emit(self.ids.event("input_audio_buffer.cleared"))
        elif kind == "session.update":
            self.settings = self.settings.updated(event.get("session"))
            if self.settings.input_format != self.decoder.fmt:
                self.decoder = InputDecoder(self.settings.input_format)
            if self.settings.output_format != self.encoder.fmt:
                self.encoder = OutputEncoder(self.settings.output_format)
            await self.emit(self.ids.event("session.updated", session=self.settings.session()))
        elif kind == "response.create":
            await self.start_call()
        elif kind == "response.cancel":
            if self.call is None:
                raise RealtimeError("no response is in progress", "response_cancel_not_active")
            sid, self.call = self.call.session.id, None
            self.engine.end_session(sid, "client_cancelled")
        elif kind in UNSUPPORTED:
            raise RealtimeError(f"{kind} is not supported: {UNSUPPORTED[kind]}", "unsupported_event", "type")
        else:
            raise RealtimeError(f"unknown event type {kind!r}", "invalid_event_type", "type")

    def append(self, audio) -> None:
        if not isinstance(audio, str):
            raise RealtimeError("'audio' must be a base64 string", "invalid_type", "audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise RealtimeError("'audio' is not valid base64", "invalid_base64", "audio") from None
        if self.call is None:
            if not self.told_no_call:  # said once, not for each of the appends that follow
                self.told_no_call = True
                raise RealtimeError("no call in progress since response.cancel: audio is dropped until a "
                                    "response.create starts a new one", "no_active_response")
            return
        pcm = self.decoder.decode(data)
        if len(pcm):
            self.call.session.push(pcm)
        self.appended += len(data)

    async def open(self) -> ApiSession:
        """A new engine session for a call, or a RealtimeError saying why there is none."""
        try:
            api_session = await self.registry.open(self.sampling, end_on_input_end=False, realtime=self.live)
        except EngineUnavailable as e:
            raise RealtimeError(f"the engine is unavailable: {e}", "engine_unavailable", kind="server_error") from None
        except SessionRefused as e:
            raise RealtimeError(e.detail, "session_refused", kind="server_error") from None
        if api_session is None:
            reason = self.registry.refusal()
            reason = reason if self.engine.draining else f"{reason}; try again later"
            raise RealtimeError(reason, "no_free_slot", kind="server_error")
        return api_session

    async def start_call(self) -> None:
        if self.call is not None:
            raise RealtimeError("Moshi's response runs for the whole call (it listens and speaks at once) and "
                                "is in progress; response.cancel ends it", "conversation_already_has_active_response")
        api_session = await self.open()
        self.call = self.paced = api_session
        self.told_no_call = False
        self.decoder.reset()
        self.calls.put_nowait(api_session)
