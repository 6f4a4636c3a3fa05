"""Wire formats of the v1 API: the session request body and the NDJSON events."""
from __future__ import annotations

import base64
import dataclasses
import json

from pydantic import BaseModel, ConfigDict, Field

from engine.audio import pcm_to_s16le
from engine.config import MAX_TEMPERATURE, MAX_TOP_K, SamplingConfig
from engine.session import FrameOutput


class SessionRequest(BaseModel):
    """POST /v1/sessions body; every field optional (an unset sampling field takes the checkpoint's
    default: its lm_gen_config, else the reference's)."""
    model_config = ConfigDict(extra="forbid")
    greedy: bool | None = None
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K)
    text_temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    text_top_k: int | None = Field(None, ge=0, le=MAX_TOP_K)
    seed: int | None = Field(None, ge=0, lt=2**63)
    end_on_input_end: bool = False
    # A live call (its input lag is held under --max-input-lag) rather than an upload of recorded
    # audio, sent as fast as it goes (held only by --max-buffer-seconds).
    realtime: bool | None = None

    def sampling(self, defaults: SamplingConfig) -> SamplingConfig:
        return defaults.overridden({f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingConfig)})


def frame_events(out: FrameOutput, tokens: bool) -> bytes:
    """NDJSON lines for one output frame: audio, then text (if the token has a piece), then tokens."""
    lines = [{"type": "audio", "frame": out.frame, "pcm": base64.b64encode(pcm_to_s16le(out.pcm)).decode()}]
    if out.text:
        lines.append({"type": "text", "frame": out.frame, "text": out.text})
    if tokens:
        lines.append({"type": "tokens", "frame": out.frame, "text_token": out.text_token,
                      "audio_tokens": out.audio_tokens})
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def end_event(reason: str) -> bytes:
    return json.dumps({"type": "end", "reason": reason}).encode() + b"\n"


class PcmReassembler:
    """Turns arbitrary-sized s16le byte chunks into float samples, keeping an odd trailing byte."""

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, chunk: bytes):
        from engine.audio import s16le_to_pcm
        data = self._carry + chunk
        cut = len(data) & ~1
        self._carry = data[cut:]
        return s16le_to_pcm(data[:cut])

    @property
    def pending(self) -> int:
        return len(self._carry)
