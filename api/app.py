"""The HTTP API: v1 sessions (create / audio in / NDJSON stream out / delete), health and metrics.

`create_app` returns a plain ASGI callable: `/v1/chat` (full duplex over one request) is served
by a raw handler, everything else by FastAPI.
"""
from __future__ import annotations

import hmac
import json

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from api.bridge import HTTP_CHUNK_RATE, ApiSession, MessageRate, SessionRegistry
from api.chat import chat_endpoint
from api.moshi_ws import add_moshi_websocket
from api.protocol import PcmReassembler, SessionRequest, end_event, frame_events
from engine.config import ServeConfig
from engine.serving import EngineLoop
from engine.session import FrameOutput

MAX_JSON_BYTES = 64 * 1024


def check_key(cfg: ServeConfig, authorization: str | None, query_key: str | None = None) -> bool:
    if not cfg.api_key:
        return True
    given = query_key
    if authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    return given is not None and any(hmac.compare_digest(given, k) for k in cfg.api_key)


def create_app(engine: EngineLoop, cfg: ServeConfig):
    app = FastAPI(title="lockstep", version="0.1.0")
    registry = SessionRegistry(engine, cfg)
    app.state.registry = registry

    def auth(request: Request) -> None:
        if not check_key(cfg, request.headers.get("authorization")):
            raise HTTPException(401, "missing or wrong API key (send 'Authorization: Bearer KEY')")

    def lookup(sid: str) -> ApiSession:
        api_session = registry.get(sid)
        if api_session is None:
            raise HTTPException(404, f"no session {sid!r} (unknown or already ended)")
        return api_session

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
        return {"status": "ready", "free_slots": engine.sched.free_slots}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/sessions", status_code=201, dependencies=[Depends(auth)])
    async def create_session(request: Request):
        body = b""
        try:
            async for chunk in request.stream():  # read no further than the limit
                body += chunk
                if len(body) > MAX_JSON_BYTES:
                    raise HTTPException(413, f"request body over {MAX_JSON_BYTES} bytes")
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read it
        try:
            req = SessionRequest.model_validate(json.loads(body) if body.strip() else {})
        except (ValueError, ValidationError, RecursionError) as e:
            detail = "JSON nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise HTTPException(422, f"invalid session request: {detail}") from None
        api_session = await registry.open(req.sampling(registry.defaults), req.end_on_input_end)
        if api_session is None:
            retry = max(1, int(cfg.admission_wait))
            return JSONResponse({"detail": registry.refusal()}, status_code=503,
                                headers={"Retry-After": str(retry)})
        if await request.is_disconnected():  # left during the admission wait: nobody will use it
            engine.end_session(api_session.session.id, "client_disconnected")
            return Response(status_code=400)
        return registry.describe(api_session)

    @app.get("/v1/sessions", dependencies=[Depends(auth)])
    async def list_sessions():
        return {"sessions": engine.statuses(), "slots_total": engine.max_sessions,
                "free_slots": engine.sched.free_slots}

    @app.get("/v1/sessions/{sid}", dependencies=[Depends(auth)])
    async def session_status(sid: str):
        api_session = lookup(sid)
        status = engine.status(sid)
        if status is None:
            raise HTTPException(404, f"no session {sid!r} (unknown or already ended)")
        return {**registry.describe(api_session), **status}

    @app.post("/v1/sessions/{sid}/audio", dependencies=[Depends(auth)])
    async def push_audio(sid: str, request: Request):
        api_session = lookup(sid)
        session = api_session.session
        if session.input_ended:
            raise HTTPException(409, "this session's input has ended")
        if api_session.uploading:  # two bodies at once would interleave their samples
            raise HTTPException(409, "this session's audio is already being uploaded")
        limit = int(cfg.max_body_mb * 2**20)
        pcm_in, received = PcmReassembler(), 0
        chunks = MessageRate(*HTTP_CHUNK_RATE)
        api_session.uploading = True
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
                await chunks.pace(session)
        except ClientDisconnect:  # the uploader went away: as if its body had ended here
            if session.end_on_input_end:
                session.end_input()
            return Response(status_code=400)
        finally:
            api_session.uploading = False
        if session.end_on_input_end:
            session.end_input()
        if pcm_in.pending:
            raise HTTPException(400, "audio must be whole s16le samples (odd byte count)")
        return {"bytes": received, "samples": received // 2}

    @app.get("/v1/sessions/{sid}/stream", dependencies=[Depends(auth)])
    async def stream(sid: str, tokens: bool = False):
        api_session = lookup(sid)
        if not api_session.claim_stream():
            raise HTTPException(409, "this session's stream is already being read")

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
        lookup(sid)
        engine.end_session(sid, "deleted")
        return Response(status_code=204)

    add_moshi_websocket(app, registry, lambda ws: check_key(cfg, ws.headers.get("authorization"),
                                                            ws.query_params.get("api_key")))
    if cfg.static is not None:
        # Last, so every API route above takes precedence over a file of the same path.
        from fastapi.staticfiles import StaticFiles
        app.mount("/", StaticFiles(directory=cfg.static, html=True), name="static")

    async def asgi(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/chat":
            await chat_endpoint(scope, receive, send, registry,
                                lambda headers: check_key(cfg, headers.get("authorization")))
        else:
            await app(scope, receive, send)

    asgi.fastapi = app  # type: ignore[attr-defined]
    return asgi



