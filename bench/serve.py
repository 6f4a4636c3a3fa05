"""Serving benchmark: N callers stream audio in real time over POST /v1/chat to a running server,
arriving as a Poisson process; reports first-audio latency, delivery jitter, underruns and late ticks.

    lockstep serve --max-sessions 16 &           # in one shell
    python -m bench.serve --url http://127.0.0.1:8998 --callers 1 4 8 16 --seconds 10
    python -m bench.serve --spawn --callers 1 2 4    # starts `lockstep serve` itself (built-in checkpoint)

With --baseline URL2 each count runs on both servers in turn, --rounds times, the samples pooled per
server, and what the first adds to the second is printed (say, Ray Serve's front over the same
replica served directly: docs/cluster.md).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from api.client import chat
from bench.args import COUNT, POSITIVE, at_least, writable_prefix
from bench.report import percentile
from engine.audio import read_audio


def synthetic_speech(seconds: float, seed: int) -> np.ndarray:
    """A voiced, pitch-gliding signal with pauses: stands in for speech when no --input is given."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(24000 * seconds)) / 24000
    f0 = 110 + 60 * np.sin(2 * np.pi * 0.4 * t + rng.uniform(0, 6))
    voiced = (np.sin(2 * np.pi * 1.5 * t + rng.uniform(0, 6)) > -0.3).astype(np.float32)
    sig = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 24000) / k for k in range(1, 6))
    return (0.2 * voiced * sig + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


SCRAPED = ("late_ticks_total", "input_underruns_total", "sessions_rejected_total", "realtime_capacity_sessions")


async def scrape(url: str, names: tuple[str, ...] = SCRAPED) -> dict[str, float]:
    import aiohttp
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/metrics") as r:
            text = await r.text()
    out = {}
    for name in names:
        # Summed over replicas: a Ray front labels each replica's series (api/cluster_board.py).
        values = re.findall(rf"^lockstep:{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        out[name] = sum(float(v) for v in values) if values else float("nan")
    return out


async def run_callers(url: str, n: int, rate: float, audio: list[np.ndarray], seed: int) -> dict:
    """One run: `n` callers arriving at `rate`; the raw samples and the server's counters."""
    rng = random.Random(seed)
    before = await scrape(url)
    results, failures = [], 0

    async def caller(i: int, delay: float):
        nonlocal failures
        await asyncio.sleep(delay)
        try:
            results.append(await chat(url, audio[i % len(audio)], realtime=True, params={"seed": i}))
        except Exception as e:  # a refused or failed caller is a result, not a crash
            failures += 1
            print(f"caller {i}: {e}", file=sys.stderr)

    arrivals, t = [], 0.0
    for _ in range(n):
        arrivals.append(t)
        t += rng.expovariate(rate)
    await asyncio.gather(*[caller(i, a) for i, a in enumerate(arrivals)])
    after = await scrape(url)
    return {"callers": n, "failed": failures, "late_ticks": after["late_ticks_total"] - before["late_ticks_total"],
            "underruns": after["input_underruns_total"] - before["input_underruns_total"],
            "probe_realtime_sessions": after["realtime_capacity_sessions"],
            "first_audio_ms": [r.first_audio_s * 1e3 for r in results if r.first_audio_s is not None],
            "jitter_ms": [abs((b - a) * 1e3 - 80.0) for r in results for a, b in zip(r.frame_times, r.frame_times[1:])]}


def pooled(runs: list[dict]) -> dict:
    """One row from runs at the same count: counters summed, samples pooled into percentiles."""
    row = {"callers": runs[0]["callers"], "runs": len(runs), "probe_realtime_sessions": runs[-1]["probe_realtime_sessions"]}
    for key in ("failed", "late_ticks", "underruns"):
        row[key] = sum(r[key] for r in runs)
    for key in ("first_audio_ms", "jitter_ms"):
        values = [v for r in runs for v in r[key]]
        row[key] = {f"p{q}": percentile(values, q) for q in (50, 90, 99)}
    return row


def describe(row: dict) -> str:
    return (f"first audio p50/p99 {row['first_audio_ms']['p50']:.0f}/{row['first_audio_ms']['p99']:.0f} ms  "
            f"jitter p50/p90/p99 {row['jitter_ms']['p50']:.1f}/{row['jitter_ms']['p90']:.1f}/"
            f"{row['jitter_ms']['p99']:.1f} ms  late ticks {row['late_ticks']:.0f}  underruns {row['underruns']:.0f}"
            f"  failed {row['failed']}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc: subprocess.Popen, port: int) -> None:
    for _ in range(600):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if proc.poll() is not None:
                err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
                raise RuntimeError(f"server exited with status {proc.returncode}: {err}")
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def spawn_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--port", str(port), *extra],
                            env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_listening(proc, port)
    return proc, f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="lockstep bench serve", description=__doc__.split("\n")[0])
    ap.add_argument("--url")
    ap.add_argument("--spawn", action="store_true", help="start `lockstep serve` (pass its flags after --)")
    ap.add_argument("--callers", type=COUNT, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rate", type=POSITIVE, default=2.0, help="Poisson arrival rate (callers per second)")
    ap.add_argument("--seconds", type=at_least(0, float, 3600, exclusive=True), default=6.0,
                    help="audio per caller (at most an hour)")
    ap.add_argument("--input", nargs="*", default=[], help="wav files to stream (default: synthetic)")
    ap.add_argument("--baseline", help="a second server, run in turn with the first at each count")
    ap.add_argument("--rounds", type=COUNT, default=1, help="runs per count (per server), samples pooled")
    ap.add_argument("--output", type=writable_prefix, default="bench/out/serve.json")
    ap.add_argument("server_args", nargs="*")
    args = ap.parse_args(argv)
    audio = [read_audio(p) for p in args.input] or [synthetic_speech(args.seconds, s) for s in range(4)]
    proc = None
    if args.spawn:
        proc, url = spawn_server(args.server_args + ["--max-sessions", str(max(args.callers))])
    elif args.url:
        url = args.url.rstrip("/")
    else:
        ap.error("give --url of a running server, or --spawn")
    urls = [url] + ([args.baseline.rstrip("/")] if args.baseline else [])
    rows, baseline_rows = [], []
    try:
        for n in args.callers:
            runs: dict[str, list[dict]] = {u: [] for u in urls}
            for k in range(args.rounds):  # in turn, so that both servers see the same machine
                for u in urls:
                    runs[u].append(asyncio.run(run_callers(u, n, args.rate, audio, seed=n + 1000 * k)))
            row = pooled(runs[url])
            rows.append(row)
            print(f"N={n:>3} {describe(row)}")
            if args.baseline:
                base = pooled(runs[urls[1]])
                baseline_rows.append(base)
                print(f"      baseline {describe(base)}")
                print(f"      adds p99 first audio {row['first_audio_ms']['p99'] - base['first_audio_ms']['p99']:+.1f} ms,"
                      f" p99 jitter {row['jitter_ms']['p99'] - base['jitter_ms']['p99']:+.1f} ms"
                      f" (p50 first audio {row['first_audio_ms']['p50'] - base['first_audio_ms']['p50']:+.1f} ms)")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    ok = [r["callers"] for r in rows if r["late_ticks"] == 0 and r["failed"] == 0]
    print(f"largest N with no late ticks: {max(ok) if ok else 0}")
    probe = rows[-1]["probe_realtime_sessions"] if rows else math.nan
    if not math.isnan(probe):  # a server started without --no-warmup ran the capacity probe
        print(f"the server's start-up probe: real time with up to {probe:.0f} session(s) at full context")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    doc = {"url": url, "rows": rows, **({"baseline": urls[1], "baseline_rows": baseline_rows} if args.baseline else {})}
    Path(args.output).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
