"""`/api/chat`: the websocket protocol of Kyutai's Moshi server, so its web UI and CLI connect
unchanged. Messages are binary, first byte the kind: 0x00 handshake (server, once the session has
a slot), 0x01 Ogg/Opus pages at 24 kHz mono (both ways), 0x02 UTF-8 text piece (server)."""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Callable

import numpy as np
import sphn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from api.bridge import WS_MESSAGE_RATE, MessageRate, SessionRegistry
from api.link import EngineUnavailable
from api.opus import load_libopus, opus_writer
from engine.config import SAMPLE_RATE, SamplingConfig
from engine.session import FrameOutput

KIND_HANDSHAKE, KIND_AUDIO, KIND_TEXT = 0, 1, 2


def sampling_from_query(params, defaults: SamplingConfig) -> SamplingConfig:
    """The query parameters Kyutai's web UI sends, which its own server ignores; unset ones take
    `defaults` (the checkpoint's)."""
    def num(name: str, cast, default):
        value = params.get(name)
        return default if value in (None, "") else cast(value)

    text_seed, audio_seed = num("text_seed", int, None), num("audio_seed", int, None)
    seed = audio_seed if audio_seed is not None else text_seed
    if text_seed is not None and audio_seed is not None:
        seed = (audio_seed * 1_000_003 + text_seed) % 2**63
    return dataclasses.replace(
        defaults,
        temperature=num("audio_temperature", float, defaults.temperature),
        top_k=num("audio_topk", int, defaults.top_k),
        text_temperature=num("text_temperature", float, defaults.text_temperature),
        text_top_k=num("text_topk", int, defaults.text_top_k),
        seed=seed).validate()


def add_moshi_websocket(app: FastAPI, registry: SessionRegistry, authorized: Callable[[WebSocket], bool]) -> None:
    engine = registry.engine
    load_libopus()  # now, so that a missing libopus is said at start-up rather than at the first call

    @app.websocket("/api/chat")
    async def moshi_chat(ws: WebSocket):
        # Accepted before any refusal, so that the close frame (and its reason) reaches the client
        # rather than a bare HTTP 403.
        await ws.accept()
        if not authorized(ws):
            await ws.close(code=1008, reason="missing or wrong API key")
            return
        try:
            sampling = sampling_from_query(ws.query_params, registry.defaults)
        except (ValueError, TypeError) as e:
            await ws.close(code=1008, reason=f"bad sampling parameters: {e}"[:120])
            return
        try:
            api_session = await registry.open(sampling, end_on_input_end=False)
        except EngineUnavailable as e:
            await ws.close(code=1011, reason=f"the engine is unavailable: {e}"[:120])
            return
        if api_session is None:
            reason = registry.refusal()
            await ws.close(code=1013, reason=reason if engine.draining else f"{reason}; try again later")
            return
        session = api_session.session
        opus_in = sphn.OpusStreamReader(SAMPLE_RATE)
        opus_out = opus_writer(SAMPLE_RATE, registry.cfg.opus_complexity, registry.cfg.opus_bitrate)

        async def receive_audio() -> None:
            rate = MessageRate(*WS_MESSAGE_RATE)
            while True:
                event = await ws.receive()
                if event["type"] == "websocket.disconnect":
                    return
                message = event.get("bytes")
                await rate.pace(session)
                if not message or message[0] != KIND_AUDIO:
                    continue  # text frames and unknown kinds are ignored, as the reference server does
                try:
                    pcm = opus_in.append_bytes(message[1:])
                except Exception:
                    # Corrupt Opus: the decoder rejects all that follows, so say so and end the call
                    # rather than feed it silence until the idle timeout.
                    await ws.close(code=1007, reason="invalid Ogg/Opus audio")
                    return
                if pcm is not None and len(pcm):
                    session.push(np.asarray(pcm, dtype=np.float32))

        reader = None
        try:
            await ws.send_bytes(bytes([KIND_HANDSHAKE]))
            reader = asyncio.create_task(receive_audio())
            while True:
                getter = asyncio.ensure_future(api_session.queue.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break  # the client stopped sending: disconnected
                event = getter.result()
                if not isinstance(event, FrameOutput):
                    break
                page = opus_out.append_pcm(event.pcm)
                if page:
                    await ws.send_bytes(bytes([KIND_AUDIO]) + page)
                if event.text:
                    await ws.send_bytes(bytes([KIND_TEXT]) + event.text.encode())
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        finally:
            engine.end_session(session.id, "client_disconnected")
            if reader is not None:
                reader.cancel()
            try:
                await ws.close()
            except (RuntimeError, WebSocketDisconnect):
                pass  # already closed by the client
