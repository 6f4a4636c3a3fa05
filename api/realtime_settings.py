"""The session settings of a `/v1/realtime` connection: what is in force, and `session.update`
checked against it.

Moshi listens and speaks at once, with one voice and no prompt, so of the protocol's settings only
the audio formats can change. The others are accepted, so that clients which always send them (a
voice, instructions, server VAD) still connect, and every `session.updated` states what is in force
instead: no instructions, no tools, no turn detection, Moshi's voice, audio out.
"""
from __future__ import annotations

import dataclasses

from api.realtime_audio import FORMATS, PCM, rate_of

VOICE = "moshi"  # the checkpoint's one voice; the protocol's voice names do not apply
_SESSION_KEYS = {"type", "model", "output_modalities", "instructions", "audio", "include", "tools", "tool_choice",
                 "max_output_tokens", "tracing", "truncation", "prompt", "reasoning", "parallel_tool_calls"}
_AUDIO_KEYS = {"input", "output"}
_INPUT_KEYS = {"format", "noise_reduction", "transcription", "turn_detection"}
_OUTPUT_KEYS = {"format", "voice", "speed"}
_BETA_FORMATS = {"pcm16": PCM, "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}


class RealtimeError(Exception):
    """A client event the connection refuses: sent back as an `error` event; the call goes on."""

    def __init__(self, message: str, code: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.code, self.param, self.kind = message, code, param, kind


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str
    input_format: str = PCM
    output_format: str = PCM

    def session(self) -> dict:
        """The `session` object of `session.created` / `session.updated`: what is in force."""
        return {
            "type": "realtime", "model": self.model, "output_modalities": ["audio"], "instructions": None,
            "audio": {"input": {"format": format_object(self.input_format), "noise_reduction": None,
                                "transcription": None, "turn_detection": None},
                      "output": {"format": format_object(self.output_format), "voice": VOICE, "speed": 1.0}},
            "tools": [], "tool_choice": "none", "max_output_tokens": "inf",
        }

    def updated(self, session) -> "Settings":
        """These settings with a `session.update`'s `session` applied; a RealtimeError (and nothing
        applied) if any part of it is malformed or asks for an audio format not served."""
        _check_keys(session, _SESSION_KEYS, "session")
        if session.get("type", "realtime") != "realtime":
            raise RealtimeError(f"session.type {session['type']!r} is not served: only 'realtime' sessions "
                                "(transcription and translation sessions need other models)",
                                "invalid_value", "session.type")
        audio = session.get("audio")
        if audio is None:
            return self
        _check_keys(audio, _AUDIO_KEYS, "session.audio")
        changes = {}
        for side, keys, field in (("input", _INPUT_KEYS, "input_format"), ("output", _OUTPUT_KEYS, "output_format")):
            part = audio.get(side)
            if part is None:
                continue
            _check_keys(part, keys, f"session.audio.{side}")
            if part.get("format") is not None:
                changes[field] = parse_format(part["format"], f"session.audio.{side}.format")
        return dataclasses.replace(self, **changes)


def format_object(fmt: str) -> dict:
    return {"type": fmt, "rate": rate_of(fmt)} if fmt == PCM else {"type": fmt}


def parse_format(value, param: str) -> str:
    if isinstance(value, str):
        hint = f" ({{'type': '{_BETA_FORMATS[value]}'}})" if value in _BETA_FORMATS else ""
        raise RealtimeError(f"{param} must be an object such as {{'type': 'audio/pcm', 'rate': 24000}}: "
                            f"{value!r} is a beta-protocol name{hint}", "invalid_type", param)
    if not isinstance(value, dict):
        raise RealtimeError(f"{param} must be an object, got {type(value).__name__}", "invalid_type", param)
    _check_keys(value, {"type", "rate"}, param)
    fmt = value.get("type")
    if fmt not in FORMATS:
        raise RealtimeError(f"{param}.type {fmt!r} is not served; use one of {list(FORMATS)}",
                            "invalid_value", f"{param}.type")
    rate = value.get("rate", rate_of(fmt))
    if rate != rate_of(fmt) or isinstance(rate, bool):
        raise RealtimeError(f"{param}.rate must be {rate_of(fmt)} for {fmt}, got {rate!r}",
                            "invalid_value", f"{param}.rate")
    return fmt


def _check_keys(value, known: set[str], param: str) -> None:
    if not isinstance(value, dict):
        raise RealtimeError(f"{param} must be an object, got {type(value).__name__}", "invalid_type", param)
    unknown = sorted(set(value) - known)
    if unknown:
        raise RealtimeError(f"Unknown parameter: '{param}.{unknown[0]}'", "unknown_parameter", f"{param}.{unknown[0]}")
