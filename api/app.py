"""The HTTP API of an API process: v1 sessions (create / audio in / NDJSON stream out / delete),
health and metrics, over the engine link (api/link.py).

`create_app` returns a plain ASGI callable: `/v1/chat` (full duplex over one request) is served
by a raw handler, everything else by FastAPI; every response that starts before its request's body
was read closes the connection (api/limits.py), so a refused request's body is never read.
"""
from __future__ import annotations

import asyncio
import hmac
import json

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from api.bridge import SessionRefused, SessionRegistry, throttle
from api.chat import chat_endpoint
from api.limits import RefuseUnread
from api.link import EngineLink, EngineUnavailable
from api.moshi_ws import add_moshi_websocket
from api.realtime import add_realtime_websocket
from api.web_page import add_web_page
from api.protocol import PcmReassembler, SessionRequest, end_event, frame_events
from engine.config import ServeConfig
from engine.session import FrameOutput

MAX_JSON_BYTES = 64 * 1024
JSON_BODY_SECONDS = 10.0  # a session request's body is small: this long to send it is an attack


def check_key(cfg: ServeConfig, authorization: str | None, query_key: str | None = None) -> bool:
    """Whether a request may in. Keys are compared as bytes: a header is Latin-1 (any byte a
    character), the query string UTF-8, and a key that is not ASCII must simply not match."""
    if not cfg.api_key:
        return True
    given = None if query_key is None else query_key.encode("utf-8", "surrogateescape")
    if authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip().encode("latin-1", "replace")
    return given is not None and any(hmac.compare_digest(given, k.encode()) for k in cfg.api_key)


def declared_length(headers) -> int:
    try:
        return int(headers.get("content-length") or 0)
    except ValueError:
        return 0


def create_app(engine: EngineLink, cfg: ServeConfig, metrics_here: bool = True):
    """`metrics_here`: /metrics on this app (behind the API key when there is one); False when
    `--metrics-port` serves it instead (`metrics_app`)."""
    app = FastAPI(title="lockstep", version="0.1.0")
    registry = SessionRegistry(engine, cfg)
    app.state.registry = registry

    def auth(request: Request) -> None:
        if not check_key(cfg, request.headers.get("authorization")):
            raise HTTPException(401, "missing or wrong API key (send 'Authorization: Bearer KEY')")

    async def ask(op: str, **fields) -> dict:
        try:
            return await registry.ask(op, **fields)
        except SessionRefused as e:
            raise HTTPException(e.status, e.detail) from None

    @app.exception_handler(EngineUnavailable)
    async def engine_unavailable(request: Request, e: EngineUnavailable):
        return JSONResponse({"detail": f"the engine is unavailable: {e}"}, status_code=503)

    add_health_routes(app, engine)
    if metrics_here:
        @app.get("/metrics", dependencies=[Depends(auth)])
        async def metrics():
            return await render_metrics(engine)

    @app.post("/v1/sessions", status_code=201, dependencies=[Depends(auth)])
    async def create_session(request: Request):
        if declared_length(request.headers) > MAX_JSON_BYTES:
            raise HTTPException(413, f"request body over {MAX_JSON_BYTES} bytes")
        async def read() -> bytes:
            body = b""
            async for chunk in request.stream():  # read no further than the limit
                body += chunk
                if len(body) > MAX_JSON_BYTES:
                    raise HTTPException(413, f"request body over {MAX_JSON_BYTES} bytes")
            return body

        try:
            body = await asyncio.wait_for(read(), JSON_BODY_SECONDS)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read it
        except asyncio.TimeoutError:
            raise HTTPException(408, f"the request body took over {JSON_BODY_SECONDS:.0f} s") from None
        try:
            req = SessionRequest.model_validate(json.loads(body) if body.strip() else {})
        except (ValueError, ValidationError, RecursionError) as e:
            detail = "JSON nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise HTTPException(422, f"invalid session request: {detail}") from None
        try:
            api_session = await registry.open(req.sampling(registry.defaults), req.end_on_input_end,
                                              realtime=bool(req.realtime), attach=False)
        except SessionRefused as e:
            raise HTTPException(e.status, e.detail) from None
        if api_session is None:
            return JSONResponse({"detail": registry.refusal()}, status_code=503,
                                headers={"Retry-After": str(max(1, int(cfg.admission_wait)))})
        if await request.is_disconnected():  # left during the admission wait: nobody will use it
            engine.end_session(api_session.session.id, "client_disconnected")
            return Response(status_code=400)
        return api_session.session.info

    @app.get("/v1/sessions", dependencies=[Depends(auth)])
    async def list_sessions():
        reply = await ask("list")
        return {k: reply[k] for k in ("sessions", "slots_total", "free_slots")}

    @app.get("/v1/sessions/{sid}", dependencies=[Depends(auth)])
    async def session_status(sid: str):
        return (await ask("status", sid=sid))["status"]

    @app.post("/v1/sessions/{sid}/audio", dependencies=[Depends(auth)])
    async def push_audio(sid: str, request: Request):
        limit = int(cfg.max_body_mb * 2**20)
        if declared_length(request.headers) > limit:
            raise HTTPException(413, f"audio body over --max-body-mb ({cfg.max_body_mb} MB)")
        try:
            session = (await registry.attach(sid, "input")).session
        except SessionRefused as e:
            raise HTTPException(e.status, e.detail) from None
        pcm_in, received = PcmReassembler(), 0
        try:
            async for chunk in request.stream():
                if session.end_reason is not None:  # deleted, timed out, shut down: stop reading
                    raise HTTPException(409, f"this session has ended ({session.end_reason})")
                received += len(chunk)
                if received > limit:  # ends the session, as /v1/chat does: its input is cut short
                    engine.end_session(sid, "body_too_large")
                    raise HTTPException(413, f"audio body over --max-body-mb ({cfg.max_body_mb} MB)")
                samples = pcm_in.feed(chunk)
                if len(samples):
                    session.push(samples)
                await throttle(session)
        except ClientDisconnect:  # the uploader went away: as if its body had ended here
            return Response(status_code=400)
        finally:
            if session.end_on_input_end:
                session.end_input()
            registry.detach_input(session)
        if pcm_in.pending:
            raise HTTPException(400, "audio must be whole s16le samples (odd byte count)")
        return {"bytes": received, "samples": received // 2}

    @app.get("/v1/sessions/{sid}/stream", dependencies=[Depends(auth)])
    async def stream(sid: str, tokens: bool = False):
        try:
            api_session = await registry.attach(sid, "output")
        except SessionRefused as e:
            raise HTTPException(e.status, e.detail) from None

        async def events():
            try:
                while True:
                    event = await api_session.queue.get()
                    if isinstance(event, FrameOutput):
                        yield frame_events(event, tokens)
                    else:
                        yield end_event(event)
                        return
            finally:
                # The reader went away (or the session ended): its slot must not stay busy.
                engine.end_session(sid, "client_disconnected")

        return StreamingResponse(events(), media_type="application/x-ndjson")

    @app.delete("/v1/sessions/{sid}", status_code=204, dependencies=[Depends(auth)])
    async def delete_session(sid: str):
        await ask("end", sid=sid, reason="deleted")
        return Response(status_code=204)

    add_moshi_websocket(app, registry, lambda ws: check_key(cfg, ws.headers.get("authorization"),
                                                            ws.query_params.get("api_key")))
    add_realtime_websocket(app, registry, lambda ws, key: check_key(cfg, ws.headers.get("authorization"), key))
    add_web_page(app, registry)  # last: every API route above takes precedence over a file of the same path

    async def asgi(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/chat":
            await chat_endpoint(scope, receive, send, registry,
                                lambda headers: check_key(cfg, headers.get("authorization")))
        else:
            await app(scope, receive, send)

    guarded = RefuseUnread(asgi)
    guarded.fastapi = app  # type: ignore[attr-defined]
    return guarded


def add_health_routes(app: FastAPI, engine: EngineLink) -> None:
    @app.get("/healthz")
    async def healthz():
        problem = engine.stalled()
        if problem:
            return JSONResponse({"status": "stalled", "reason": problem}, status_code=503)
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        problem = engine.stalled()
        if problem:  # sessions sent here now would get no audio
            return JSONResponse({"status": "stalled", "reason": problem}, status_code=503)
        return {"status": "ready", "free_slots": engine.state["free_slots"]}


async def render_metrics(engine: EngineLink) -> PlainTextResponse:
    reply = await engine.request("metrics")
    return PlainTextResponse(reply["text"], media_type="text/plain; version=0.0.4")


def metrics_app(engine: EngineLink):
    """What `--metrics-port` serves: /metrics (no key: keep the port private) and health."""
    app = FastAPI(title="lockstep metrics")
    add_health_routes(app, engine)

    @app.get("/metrics")
    async def metrics():
        return await render_metrics(engine)

    return app
