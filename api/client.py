"""`lockstep client URL IN.wav --output OUT.wav`: one full-duplex conversation over POST /v1/chat,
sending the file in real time while Moshi's audio and text stream back."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.audio import AudioError, pcm_to_s16le, read_audio, s16le_to_pcm, write_wav
from engine.config import FRAME_SIZE, SAMPLE_RATE


# A real-time caller sends this far ahead of the clock, as a jitter buffer: a frame sent exactly on
# time reaches the server's tick just after it now and then, and the call hears an underrun.
REALTIME_LEAD_SECONDS = 0.16


class ClientError(Exception):
    """A call that could not be made or did not finish; the message says why, and `result` holds
    what had come back by then (None when the call never started)."""

    def __init__(self, message: str, result: "ChatResult | None" = None):
        super().__init__(message)
        self.result = result


@dataclass
class ChatResult:
    pcm: list[np.ndarray] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    text_tokens: list[int] = field(default_factory=list)
    audio_tokens: list[list[int]] = field(default_factory=list)
    end_reason: str | None = None
    first_audio_s: float | None = None
    frame_times: list[float] = field(default_factory=list)


async def chat(url: str, pcm: np.ndarray, realtime: bool = True, api_key: str | None = None,
               params: dict | None = None, chunk_frames: int = 1) -> ChatResult:
    import aiohttp
    frames_per_chunk = max(1, chunk_frames)
    step = FRAME_SIZE * frames_per_chunk
    start = time.monotonic()

    async def body():
        for i, offset in enumerate(range(0, len(pcm), step)):
            if realtime:
                due = start + i * 0.08 * frames_per_chunk - REALTIME_LEAD_SECONDS
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            yield pcm_to_s16le(pcm[offset: offset + step])

    headers = {"content-type": "application/octet-stream"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    query = {"tokens": "1", "realtime": "1" if realtime else "0", **{k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in (params or {}).items()}}
    if not url.startswith(("http://", "https://")):
        raise ClientError(f"{url!r}: give the server's address as http://HOST:PORT")
    result, failed = ChatResult(), None
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.post(url.rstrip("/") + "/v1/chat", params=query, data=body(), headers=headers) as resp:
                if resp.status != 200:
                    raise ClientError(f"server answered {resp.status}: {(await resp.text())[:500]}")
                failed = result  # from here on, a break keeps what came
                async for line in resp.content:
                    if line.strip():
                        _take(json.loads(line), result, start)
                    if result.end_reason is not None:
                        break
    except aiohttp.InvalidURL:
        raise ClientError(f"{url!r} is not a server address; give http://HOST:PORT") from None
    except aiohttp.ClientError as e:
        raise ClientError(f"cannot talk to {url}: {type(e).__name__}: {e}", failed) from None
    except asyncio.TimeoutError:
        raise ClientError(f"{url} sent nothing for {timeout.sock_read:.0f} s", failed) from None
    except (ValueError, KeyError, TypeError) as e:  # not lockstep's NDJSON
        raise ClientError(f"{url} answered something that is not lockstep's event stream ({e!r})", failed) from None
    return result


def _take(event: dict, result: ChatResult, start: float) -> None:
    """One NDJSON event of /v1/chat into `result`."""
    if event["type"] == "audio":
        now = time.monotonic() - start
        result.first_audio_s = result.first_audio_s if result.first_audio_s is not None else now
        result.frame_times.append(now)
        result.pcm.append(s16le_to_pcm(base64.b64decode(event["pcm"])))
    elif event["type"] == "text":
        result.text.append(event["text"])
    elif event["type"] == "tokens":
        result.text_tokens.append(event["text_token"])
        result.audio_tokens.append(event["audio_tokens"])
    elif event["type"] == "end":
        result.end_reason = event["reason"]


def transcript_path(output: Path) -> Path:
    return output.with_suffix(".txt")


def run_client(url: str, path: Path, output: Path, api_key: str | None, realtime: bool, params: dict) -> ChatResult:
    """One call; Moshi's audio to `output` and its text beside it (.txt). Whatever came back is saved
    even when the call broke off, and then the break is raised."""
    if not output.name or output.is_dir() or transcript_path(output).is_dir():
        raise ClientError(f"--output {output}: name a file to write (its transcript goes beside it as .txt)")
    if transcript_path(output) == output:
        raise ClientError(f"--output {output}: the transcript goes beside the audio as .txt; name the audio "
                          "file otherwise (e.g. .wav)")
    if not output.parent.is_dir() or not os.access(output.parent, os.W_OK):
        raise ClientError(f"--output {output}: {output.parent} is not a writable folder")
    try:
        pcm = read_audio(path, SAMPLE_RATE)
    except AudioError as e:
        raise ClientError(f"cannot read {path}: {e}") from None
    try:
        result = asyncio.run(chat(url, pcm, realtime=realtime, api_key=api_key, params=params))
    except ClientError as e:
        if e.result is None:
            raise
        _save(e.result, output)
        raise ClientError(f"{e} (the {len(e.result.pcm)} frames that came are saved to {output})") from None
    _save(result, output)
    if result.end_reason is None:
        raise ClientError(f"the server's stream broke off after {len(result.pcm)} frames, before its end event "
                          f"(what came is saved to {output})")
    return result


def _save(result: ChatResult, output: Path) -> None:
    write_wav(output, np.concatenate(result.pcm) if result.pcm else np.zeros(0, np.float32), SAMPLE_RATE)
    transcript_path(output).write_text("".join(result.text).strip() + "\n")
