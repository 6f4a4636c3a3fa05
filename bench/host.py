"""Host-side benchmark: how many sessions' I/O `lockstep serve`'s processes keep up with when the
device step costs nothing (bench/stub_engine.py, a benchmark-only stub: everything but the model is
the product's).

For each transport (`chat`: POST /v1/chat, PCM up and NDJSON/base64 down; `ws`: Kyutai's /api/chat,
Ogg/Opus both ways; `v1`: a REST session with its upload and its stream on two connections) and each
session count, that many callers stream audio at real-time pace from processes beside the server.
Over a window in the middle of the run it reports the API processes' and the engine process's CPU
time per session-frame, the API processes' load in cores, late ticks, input underruns and the
callers' worst gap between two output messages; then, per transport, the largest count served with
no late tick and no underrun, and the sessions one fully busy API core would carry at the cost measured.

    lockstep bench host --transports chat ws v1 --sessions 32 64 128 --api-workers 1
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.args import COUNT, POSITIVE, writable_prefix
from bench.serve import scrape, synthetic_speech
from engine.config import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE

TRANSPORTS = ("chat", "ws", "v1")
LEAD = 0.16  # as `lockstep client`: ahead of the clock by a jitter buffer
CALLERS_PER_PROCESS = 64


def _frames(transport: str, seconds: float) -> list[bytes]:
    """What one caller sends per 80 ms: s16le PCM, or Kyutai's 0x01 + Ogg/Opus pages."""
    from engine.audio import pcm_to_s16le
    pcm = synthetic_speech(seconds, 0)
    chunks = [pcm[i:i + FRAME_SIZE] for i in range(0, len(pcm) - FRAME_SIZE + 1, FRAME_SIZE)]
    if transport != "ws":
        return [pcm_to_s16le(c) for c in chunks]
    import sphn
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    return [b"\x01" + writer.append_pcm(c) for c in chunks]


async def _paced(frames: list[bytes], start: float):
    for i, frame in enumerate(frames):
        await asyncio.sleep(max(0.0, start + i / FRAME_RATE - LEAD - time.monotonic()))
        yield frame


async def _caller(url: str, transport: str, frames: list[bytes], start: float, times: list[float]) -> None:
    import aiohttp
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        if transport == "chat":
            async with http.post(url + "/v1/chat", data=_paced(frames, start)) as r:
                r.raise_for_status()
                async for line in r.content:
                    if line.startswith(b'{"type": "audio"'):
                        times.append(time.monotonic())
        elif transport == "ws":
            async with http.ws_connect(url.replace("http", "ws", 1) + "/api/chat") as ws:
                async def send():
                    async for frame in _paced(frames, start):
                        await ws.send_bytes(frame)
                    await ws.close()
                sender = asyncio.create_task(send())
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x01":
                        times.append(time.monotonic())
                sender.cancel()
        else:
            async with http.post(url + "/v1/sessions", json={"realtime": True, "end_on_input_end": True}) as r:
                r.raise_for_status()
                sid = (await r.json())["id"]
            upload = asyncio.create_task(http.post(f"{url}/v1/sessions/{sid}/audio", data=_paced(frames, start)))
            async with http.get(f"{url}/v1/sessions/{sid}/stream") as r:
                async for line in r.content:
                    if line.startswith(b'{"type": "audio"'):
                        times.append(time.monotonic())
            (await upload).release()


def _callers(url: str, transport: str, n: int, seconds: float, start: float, out) -> None:
    frames = _frames(transport, seconds)

    async def main():
        times = [[] for _ in range(n)]
        results = await asyncio.gather(*(_caller(url, transport, frames, start + 2.0 * i / n, t)
                                         for i, t in enumerate(times)), return_exceptions=True)
        return times, [repr(r) for r in results if isinstance(r, BaseException)]
    out.put(asyncio.run(main()))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _roles(pid: int) -> dict[str, list[int]]:
    roles: dict[str, list[int]] = {"engine": [], "api": []}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        cmd = Path(f"/proc/{child}/cmdline").read_bytes()
        roles["api" if b"api.worker" in cmd else "engine"].append(int(child))
    return roles


async def measure(url: str, server_pid: int, transport: str, n: int, seconds: float) -> dict:
    ctx = multiprocessing.get_context("spawn")
    start = time.monotonic() + 3.0  # the caller processes import and connect first
    queues, procs = [], []
    for i in range(0, n, CALLERS_PER_PROCESS):
        q = ctx.Queue()
        p = ctx.Process(target=_callers, args=(url, transport, min(CALLERS_PER_PROCESS, n - i), seconds, start, q),
                        daemon=True)
        p.start()
        queues.append(q)
        procs.append(p)
    roles = _roles(server_pid)
    window = (start + 4.0, start + seconds - 1.0)  # every caller in and settled; none ending yet
    await asyncio.sleep(max(0.0, window[0] - time.monotonic()))
    asked = time.monotonic()
    before = await scrape(url, ("late_ticks_total", "input_underruns_total", "step_batch_size_sum"))
    t0, cpu0 = time.monotonic(), {r: sum(_cpu_seconds(p) for p in pids) for r, pids in roles.items()}
    slow = t0 - asked
    await asyncio.sleep(max(0.0, window[1] - time.monotonic()))
    asked = time.monotonic()
    after = await scrape(url, ("late_ticks_total", "input_underruns_total", "step_batch_size_sum"))
    t1, cpu1 = time.monotonic(), {r: sum(_cpu_seconds(p) for p in pids) for r, pids in roles.items()}
    slow = max(slow, t1 - asked)
    results = [q.get(timeout=seconds + 60) for q in queues]
    for p in procs:
        p.join(10)
    times = [t for r in results for t in r[0]]
    errors = [e for r in results for e in r[1]]
    if slow > 1.0 or any(math.isnan(v) for v in (*before.values(), *after.values())):
        # /metrics goes through the API processes: one too busy to answer it at once is overloaded.
        return {"transport": transport, "sessions": n, "api_workers": len(roles["api"]), "overloaded": True,
                "failed_callers": len(errors), "errors": errors[:3]}
    session_frames = after["step_batch_size_sum"] - before["step_batch_size_sum"]
    gaps = [max((b - a for a, b in zip(t, t[1:]) if window[0] <= a and b <= window[1]), default=0.0) for t in times]
    wall = t1 - t0
    return {"transport": transport, "sessions": n, "api_workers": len(roles["api"]),
            "session_frames": int(session_frames),
            "api_us_per_session_frame": round((cpu1["api"] - cpu0["api"]) / max(1, session_frames) * 1e6),
            "engine_us_per_session_frame": round((cpu1["engine"] - cpu0["engine"]) / max(1, session_frames) * 1e6),
            "api_cores": round((cpu1["api"] - cpu0["api"]) / wall, 2),
            "late_ticks": int(after["late_ticks_total"] - before["late_ticks_total"]),
            "underruns": int(after["input_underruns_total"] - before["input_underruns_total"]),
            "worst_gap_ms": round(max(gaps, default=0.0) * 1e3), "errors": errors[:3], "failed_callers": len(errors),
            "overloaded": False}


def _wait_ready(server: subprocess.Popen, url: str, api_workers: int) -> None:
    """Until the engine answers through an API process and every API process has started."""
    import urllib.request
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the stub server ended with status {server.returncode}")
        try:
            urllib.request.urlopen(url + "/readyz", timeout=2)
            if len(_roles(server.pid)["api"]) == api_workers:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the stub server did not start")


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for transport in dict.fromkeys(r["transport"] for r in rows):
        mine = [r for r in rows if r["transport"] == transport and not r["overloaded"]]
        clean = [r["sessions"] for r in mine if not r["late_ticks"] and not r["underruns"] and not r["failed_callers"]]
        cost = min((r["api_us_per_session_frame"] for r in mine), default=float("inf"))
        out.append({"transport": transport, "largest_clean": max(clean, default=0),
                    "sessions_per_api_core": int(1e6 / (FRAME_RATE * max(1, cost))) if mine else 0})
    return out


def _line(r: dict) -> str:
    if r["overloaded"]:
        return (f"{r['transport']:<5} {r['sessions']:>4} sessions  OVERLOADED: the API processes could not answer "
                f"/metrics in time  failed callers {r['failed_callers']}")
    return (f"{r['transport']:<5} {r['sessions']:>4} sessions  API {r['api_us_per_session_frame']:>5} us/session-frame "
            f"({r['api_cores']:.2f} cores over {r['api_workers']} process(es))  engine "
            f"{r['engine_us_per_session_frame']:>4} us  late ticks {r['late_ticks']:>3}  underruns "
            f"{r['underruns']:>4}  worst gap {r['worst_gap_ms']:>5} ms  failed callers {r['failed_callers']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lockstep bench host", description=__doc__.split("\n")[0])
    ap.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    ap.add_argument("--sessions", type=COUNT, nargs="+", default=[32, 64, 128])
    ap.add_argument("--api-workers", type=COUNT, default=1)
    ap.add_argument("--seconds", type=POSITIVE, default=12.0, help="audio per caller (at least 8)")
    ap.add_argument("--output", type=writable_prefix, default="bench/out/host.json")
    args = ap.parse_args(argv)
    if args.seconds < 8:
        ap.error("--seconds must be at least 8 (a 3 s measuring window after 4 s of arrivals and settling)")
    from bench.serve import free_port
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.stub_engine", "serve", str(port), str(args.api_workers),
                               str(max(args.sessions))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        _wait_ready(server, url, args.api_workers)
        for transport in args.transports:
            for n in args.sessions:
                rows.append(asyncio.run(measure(url, server.pid, transport, n, args.seconds)))
                print(_line(rows[-1]), flush=True)
                time.sleep(2.0)  # the previous callers' sessions end
    finally:
        server.terminate()
        server.wait(60)
    summary = summarize(rows)
    for s in summary:
        print(f"{s['transport']}: largest count with no late tick and no underrun {s['largest_clean']}; one busy API "
              f"core carries ~{s['sessions_per_api_core']} sessions at the cost measured", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
