"""POST /v1/chat: one request whose PCM body streams in while NDJSON events stream out.

A plain ASGI handler, because Starlette's StreamingResponse listens for disconnects by calling
`receive`, which would swallow the request-body chunks this route is still reading.
"""
from __future__ import annotations

import asyncio
import json
from typing import Callable
from urllib.parse import parse_qs

from pydantic import ValidationError

from api.bridge import SessionRefused, SessionRegistry, throttle
from api.link import EngineUnavailable
from api.protocol import PcmReassembler, SessionRequest, end_event, frame_events
from engine.session import FrameOutput

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


async def _reply(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *headers]})
    await send({"type": "http.response.body", "body": body})


def _parse_query(scope) -> tuple[SessionRequest, bool]:
    """Sampling settings come from the query string (the body is audio)."""
    raw = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
    def flag(key: str, value: str) -> bool:
        if value.lower() not in _TRUE | _FALSE:
            raise ValueError(f"{key} must be one of {sorted(_TRUE | _FALSE)}, got {value!r}")
        return value.lower() in _TRUE

    tokens = flag("tokens", raw.pop("tokens", "0"))
    fields: dict = {"end_on_input_end": True, "realtime": True}
    for key, value in raw.items():
        fields[key] = flag(key, value) if key in ("greedy", "end_on_input_end", "realtime") else value
    return SessionRequest.model_validate(fields), tokens


async def chat_endpoint(scope, receive, send, registry: SessionRegistry,
                        authorized: Callable[[dict], bool]) -> None:
    # Latin-1, as HTTP defines header bytes (and Starlette decodes them): any byte is a character.
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    if scope["method"] != "POST":
        return await _reply(send, 405, "use POST", [(b"allow", b"POST")])
    if not authorized(headers):
        return await _reply(send, 401, "missing or wrong API key (send 'Authorization: Bearer KEY')")
    try:
        req, tokens = _parse_query(scope)
    except (ValidationError, ValueError) as e:
        return await _reply(send, 422, f"invalid query parameters: {e}")
    limit = int(registry.cfg.max_body_mb * 2**20)
    try:
        declared = int(headers.get("content-length") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        return await _reply(send, 413, f"audio body over --max-body-mb ({registry.cfg.max_body_mb} MB)")
    try:
        api_session = await registry.open(req.sampling(registry.defaults), req.end_on_input_end,
                                          realtime=bool(req.realtime))
    except SessionRefused as e:
        return await _reply(send, e.status, e.detail)
    except EngineUnavailable as e:
        return await _reply(send, 503, f"the engine is unavailable: {e}")
    if api_session is None:
        return await _reply(send, 503, registry.refusal(),
                            [(b"retry-after", str(max(1, int(registry.cfg.admission_wait))).encode())])
    session = api_session.session
    engine = registry.engine

    async def read_body() -> None:
        pcm_in, received = PcmReassembler(), 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                engine.end_session(session.id, "client_disconnected")
                return
            if session.end_reason is not None:  # ended meanwhile (say, its output went unread)
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                engine.end_session(session.id, "body_too_large")
                return
            samples = pcm_in.feed(chunk)
            if len(samples):
                session.push(samples)
            if not message.get("more_body", False):
                break
            await throttle(session)
        if session.end_on_input_end:
            session.end_input()
        # The body is in; what `receive` says next is the client going away (it may only listen).
        while (await receive())["type"] != "http.disconnect":
            pass
        engine.end_session(session.id, "client_disconnected")

    reader = asyncio.create_task(read_body())
    try:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson"), (b"x-session-id", session.id.encode())]})
        while True:
            event = await api_session.queue.get()
            if isinstance(event, FrameOutput):
                await send({"type": "http.response.body", "body": frame_events(event, tokens), "more_body": True})
            else:
                await send({"type": "http.response.body", "body": end_event(event), "more_body": False})
                break
    except OSError:
        pass  # the client went away while we were sending
    finally:
        engine.end_session(session.id, "client_disconnected")
        if not reader.done():
            reader.cancel()
