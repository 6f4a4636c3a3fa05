"""Events of `/v1/realtime` (the GA protocol's names and fields): client events parsed, server
events built as plain dicts.

Moshi's output is one continuous response per call: `ResponseEvents` holds that response's ids and
what it has said so far, and builds its opening events, one delta per frame or text piece, and its
closing events with the status the call's end reason maps to.
"""
from __future__ import annotations

import base64
import itertools
import json
import re
import secrets

from api.realtime_settings import VOICE, RealtimeError, format_object

# A client event larger than this gets an error instead of being parsed: 1 MiB of base64 is ~22 s
# of 24 kHz PCM, far more than a real-time client sends at once (uvicorn closes at 16 MiB).
MAX_EVENT_BYTES = 1 << 20
_EVENT_ID = re.compile(r'"event_id"\s*:\s*"([^"\\]{1,128})"')
UNSUPPORTED = {
    "conversation.item.create": "Moshi takes audio only: there are no text messages or tool outputs to add",
    "conversation.item.delete": "the conversation is Moshi's audio context, which cannot be edited",
    "conversation.item.retrieve": "items keep no audio on the server",
    "conversation.item.truncate": "the conversation is Moshi's audio context, which cannot be edited",
    "output_audio_buffer.clear": "the output audio buffer belongs to WebRTC and SIP connections",
}
# How each way a call can end closes its response: (status, status_details).
_CANCELLED = ("cancelled", {"type": "cancelled", "reason": "client_cancelled"})
_FAILED_BY_CLIENT = {"output_not_read": "the client did not read the audio it was sent"}


class Ids:
    """Ids unique to the connection: `event_1a2b..._7`, `resp_...`, `item_...`."""

    def __init__(self):
        self._prefix = secrets.token_hex(6)
        self._next = itertools.count(1)

    def make(self, kind: str) -> str:
        return f"{kind}_{self._prefix}{next(self._next)}"

    def event(self, type_: str, **fields) -> dict:
        return {"type": type_, "event_id": self.make("event"), **fields}


def client_event_id(text: str | None) -> str | None:
    """The `event_id` near the start of a message, found without parsing it (it may not parse)."""
    found = _EVENT_ID.search(text, 0, 512) if text else None
    return found.group(1) if found else None


def parse_client_event(text: str | None) -> dict:
    """A websocket message as a client event (a JSON object), or a RealtimeError saying why not."""
    if text is None:
        raise RealtimeError("binary messages are not part of the protocol: send JSON text", "invalid_message")
    if len(text) > MAX_EVENT_BYTES:
        raise RealtimeError(f"event of {len(text)} bytes is over the {MAX_EVENT_BYTES}-byte limit: send audio "
                            "in smaller appends", "message_too_large")
    try:
        event = json.loads(text)
    except (ValueError, RecursionError):
        raise RealtimeError("the message is not valid JSON", "invalid_json") from None
    if not isinstance(event, dict):
        raise RealtimeError("an event must be a JSON object", "invalid_event")
    return event


def error_event(ids: Ids, err: RealtimeError, client_event_id: str | None) -> dict:
    return ids.event("error", error={"type": err.kind, "code": err.code, "message": err.message,
                                     "param": err.param, "event_id": client_event_id})


def outcome(reason: str) -> tuple[str, dict | None]:
    """The response status and status_details for a call that ended for `reason`."""
    if reason == "client_cancelled":
        return _CANCELLED
    if reason in ("idle_timeout", "input_end"):
        return "completed", None
    if reason == "deleted":  # DELETE /v1/sessions/{id}
        return "cancelled", {"type": "cancelled"}
    if reason == "server_shutdown":
        return "incomplete", {"type": "incomplete", "error": {
            "type": "server_error", "code": reason, "message": "the server is shutting down"}}
    kind = "invalid_request_error" if reason in _FAILED_BY_CLIENT else "server_error"
    return "failed", {"type": "failed", "error": {
        "type": kind, "code": reason, "message": _FAILED_BY_CLIENT.get(reason, f"the call ended: {reason}")}}


def user_audio_item(item_id: str) -> dict:
    """The user message a `commit` creates: its audio went to Moshi as it arrived, and no
    transcription runs on it."""
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}]}


class ResponseEvents:
    """One response: Moshi speaking for the whole call."""

    def __init__(self, ids: Ids, output_format: str, conversation_id: str, previous_item_id: str | None):
        self.ids = ids
        self.id, self.item_id = ids.make("resp"), ids.make("item")
        self.output_format = output_format
        self.conversation_id, self.previous_item_id = conversation_id, previous_item_id
        self.transcript: list[str] = []
        self.frames = 0
        self.audio_tokens = 0

    def _where(self) -> dict:
        return {"response_id": self.id, "item_id": self.item_id, "output_index": 0, "content_index": 0}

    def _item(self, status: str, content: bool) -> dict:
        parts = [{"type": "output_audio", "transcript": "".join(self.transcript)}] if content else []
        return {"id": self.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": status, "content": parts}

    def _response(self, status: str, details: dict | None, output: list[dict]) -> dict:
        response = {"object": "realtime.response", "id": self.id, "status": status, "status_details": details,
                    "conversation_id": self.conversation_id, "output": output, "output_modalities": ["audio"],
                    "audio": {"output": {"format": format_object(self.output_format), "voice": VOICE}},
                    "max_output_tokens": "inf", "metadata": None}
        if status != "in_progress":
            # What Moshi produced: one text token and a frame of audio codebooks per 80 ms.
            response["usage"] = {"output_tokens": self.frames + self.audio_tokens, "output_token_details": {
                "text_tokens": self.frames, "audio_tokens": self.audio_tokens}}
        return response

    def opening(self) -> list[dict]:
        ev = self.ids.event
        item = self._item("in_progress", content=False)
        return [
            ev("response.created", response=self._response("in_progress", None, [])),
            ev("response.output_item.added", response_id=self.id, output_index=0, item=item),
            ev("conversation.item.added", previous_item_id=self.previous_item_id, item=item),
            ev("response.content_part.added", **self._where(), part={"type": "audio", "transcript": ""}),
        ]

    def audio(self, data: bytes) -> dict:
        return self.ids.event("response.output_audio.delta", **self._where(), delta=base64.b64encode(data).decode())

    def text(self, piece: str) -> dict:
        self.transcript.append(piece)
        return self.ids.event("response.output_audio_transcript.delta", **self._where(), delta=piece)

    def count(self, audio_tokens: int) -> None:
        self.frames += 1
        self.audio_tokens += audio_tokens

    def closing(self, reason: str) -> list[dict]:
        status, details = outcome(reason)
        ev = self.ids.event
        transcript = "".join(self.transcript)
        item = self._item("completed" if status == "completed" else "incomplete", content=True)
        return [
            ev("response.output_audio.done", **self._where()),
            ev("response.output_audio_transcript.done", **self._where(), transcript=transcript),
            ev("response.content_part.done", **self._where(), part={"type": "audio", "transcript": transcript}),
            ev("response.output_item.done", response_id=self.id, output_index=0, item=item),
            ev("conversation.item.done", previous_item_id=self.previous_item_id, item=item),
            ev("response.done", response=self._response(status, details, [item])),
        ]
