"""Abuse benchmark: witness calls at real-time pace while hostile clients attack the server in turn.

For each attack (bench/attacks.py: 1-byte chunk floods with and without a key, slow floods,
pipelined requests, websocket message floods, admission storms on a full server, slowloris,
resets mid-call, huge declared bodies, non-ASCII keys) it reports what the witnesses suffered
over the attack and the recovery window after it: the worst gap between two output frames, input
frames the server dropped, underruns, the input lag (audio received and not yet stepped) at the
end and how long it took to come back under the target, and the server's resident memory.

    lockstep bench abuse --spawn [-- SERVE FLAGS]        # starts `lockstep serve --api-key ...`
    lockstep bench abuse --url http://127.0.0.1:8998 --key KEY
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.args import COUNT, POSITIVE, writable_prefix
from bench.attacks import ATTACKS
from bench.serve import spawn_server, synthetic_speech
from engine.audio import pcm_to_s16le
from engine.config import FRAME_SIZE, SAMPLE_RATE

LEAD_SECONDS = 0.16  # as `lockstep client`: a jitter buffer ahead of the clock


@dataclass
class Witness:
    """One real-time call over /v1/chat, with when each output frame came and the server's view of
    its input over time."""
    sid: str | None = None
    frame_times: list[float] = field(default_factory=list)
    status: list[tuple[float, dict]] = field(default_factory=list)
    end_reason: str | None = None

    def worst_gap(self, start: float, end: float) -> float:
        times = [t for t in self.frame_times if start <= t <= end]
        if not times:
            return end - start
        edges = [start, *times, min(end, time.monotonic())]
        return max(b - a for a, b in zip(edges, edges[1:]))

    def at(self, t: float) -> dict:
        """The latest status polled at or before `t`."""
        before = [s for when, s in self.status if when <= t]
        return before[-1] if before else {}


async def witness_call(url: str, key: str | None, pcm: np.ndarray, w: Witness, stop: asyncio.Event) -> None:
    import aiohttp
    headers = {"authorization": f"Bearer {key}"} if key else {}
    start = time.monotonic()

    async def body():
        for i, offset in enumerate(range(0, len(pcm), FRAME_SIZE)):
            if stop.is_set():
                return
            await asyncio.sleep(max(0.0, start + i * FRAME_SIZE / SAMPLE_RATE - LEAD_SECONDS - time.monotonic()))
            yield pcm_to_s16le(pcm[offset:offset + FRAME_SIZE])

    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.post(url + "/v1/chat", data=body(), headers=headers, params={"greedy": "1"}) as r:
            if r.status != 200:
                raise RuntimeError(f"witness refused: {r.status} {await r.text()}")
            w.sid = r.headers["x-session-id"]
            async for line in r.content:
                event = json.loads(line)
                if event["type"] == "audio":
                    w.frame_times.append(time.monotonic())
                elif event["type"] == "end":
                    w.end_reason = event["reason"]
                    return


async def poll_status(url: str, key: str | None, witnesses: list[Witness], stop: asyncio.Event) -> None:
    import aiohttp
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while not stop.is_set():
            for w in witnesses:
                if w.sid is None:
                    continue
                try:
                    async with http.get(f"{url}/v1/sessions/{w.sid}", headers=headers) as r:
                        if r.status == 200:
                            w.status.append((time.monotonic(), await r.json()))
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
            await asyncio.sleep(0.2)


def sustained_lag_times(status: list[tuple[float, dict]], target: float, window: float = 1.0) -> list[float]:
    """When a call's input lag was over `target` for a whole `window`: its lowest level over the
    window, as the server's own --max-input-lag rule reads it. One frame of jitter above the target
    is not lag (a witness keeps 0.16 s ahead, so 0.3 s is 2 frames from it)."""
    lags = [(t, s["buffered_seconds"]) for t, s in status if "buffered_seconds" in s]
    return [t for t, _ in lags
            if t - lags[0][0] >= window and min(lag for u, lag in lags if t - window <= u <= t) > target]


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass
    return total / 1024


async def run_attack(name: str, url: str, seconds: float, key: str | None, nice: int = 0) -> dict:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.attacks", name, url, str(seconds), *([key] if key else []),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=lambda: os.nice(nice))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds + 30)
    except asyncio.TimeoutError:
        proc.kill()
        return {"error": "the attack process did not finish"}
    if proc.returncode != 0:
        return {"error": f"the attack process failed: {err.decode(errors='replace')[-300:]}"}
    return json.loads(out)


async def fill_slots(url: str, key: str | None, stop: asyncio.Event, seconds: float) -> list[asyncio.Task]:
    """Real-time silent calls holding every free slot, so the next attack meets a full server."""
    import aiohttp
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/v1/sessions", headers=headers) as r:
            if r.status != 200:
                raise RuntimeError(f"GET /v1/sessions answered {r.status}: {await r.text()}")
            free = (await r.json())["free_slots"]
    silence = np.zeros(int(SAMPLE_RATE * seconds), np.float32)
    tasks = [asyncio.create_task(witness_call(url, key, silence, Witness(), stop)) for _ in range(free)]
    await asyncio.sleep(1.0)  # admitted and joined
    return tasks


async def run(url: str, key: str | None, attacks: list[str], witnesses: int, attack_s: float, recover_s: float,
              lag_target: float, server_pid: int | None, attacker_nice: int = 0) -> dict:
    total = 4 + len(attacks) * (attack_s + recover_s + 2)
    stop = asyncio.Event()
    ws = [Witness() for _ in range(witnesses)]
    calls = [asyncio.create_task(witness_call(url, key, synthetic_speech(total + 30, i), w, stop))
             for i, w in enumerate(ws)]
    poller = asyncio.create_task(poll_status(url, key, ws, stop))
    while not all(w.frame_times for w in ws):
        if any(c.done() for c in calls):
            [c.result() for c in calls if c.done()]
        await asyncio.sleep(0.05)
    await asyncio.sleep(2.0)  # the witnesses' calls settle
    rows = []
    for name in attacks:
        fill_stop = asyncio.Event()
        fillers = await fill_slots(url, key, fill_stop, attack_s + 5) if name == "admission-storm" else []
        before = [w.at(time.monotonic()) for w in ws]
        start = time.monotonic()
        attacker = await run_attack(name, url, attack_s, key, attacker_nice)
        fill_stop.set()
        for t in fillers:
            t.cancel()
        attack_end = time.monotonic()
        rss = tree_rss_mb(server_pid) if server_pid else None
        await asyncio.sleep(recover_s)
        end = time.monotonic()
        row = {"attack": name, "attacker": attacker, "server_rss_mb": rss, "witnesses": []}
        for w, b in zip(ws, before):
            after = w.at(end)
            recent = [(t, st) for t, st in w.status if attack_end - 1.0 <= t <= end]  # from a window before the end
            over = [t for t in sustained_lag_times(recent, lag_target) if attack_end <= t]
            row["witnesses"].append({
                "worst_gap_ms": round(w.worst_gap(start, end) * 1e3),
                "frames_dropped": round((after.get("dropped_samples", 0) - b.get("dropped_samples", 0)) / FRAME_SIZE),
                "underruns": after.get("underruns", 0) - b.get("underruns", 0),
                "lag_after_s": round(after.get("buffered_seconds", float("nan")), 3),
                "lag_over_target_until_s": round(max(over) - attack_end, 2) if over else 0.0,
                "ended": w.end_reason})
        rows.append(row)
        print(_line(row), flush=True)
    stop.set()
    poller.cancel()
    for c in calls:
        c.cancel()
    return {"url": url, "attacker_nice": attacker_nice, "attack_seconds": attack_s, "recover_seconds": recover_s, "lag_target_s": lag_target,
            "rows": rows}


def _line(row: dict) -> str:
    w = row["witnesses"]
    rss = f"{row['server_rss_mb']:.0f} MB" if row["server_rss_mb"] else "?"
    return (f"{row['attack']:<24} worst gap {max(x['worst_gap_ms'] for x in w):>6} ms  dropped "
            f"{sum(x['frames_dropped'] for x in w):>4} frames  underruns {sum(x['underruns'] for x in w):>4}  "
            f"lag after {max(x['lag_after_s'] for x in w):6.2f} s (over target until "
            f"{max(x['lag_over_target_until_s'] for x in w):.1f} s)  RSS {rss}  attacker: {row['attacker']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lockstep bench abuse", description=__doc__.split("\n")[0])
    ap.add_argument("--url")
    ap.add_argument("--spawn", action="store_true", help="start `lockstep serve` (its flags after --)")
    ap.add_argument("--key", default="abuse-bench-key", help="the API key witnesses use (and --spawn sets)")
    ap.add_argument("--attacks", nargs="+", choices=sorted(ATTACKS), default=list(ATTACKS))
    ap.add_argument("--witnesses", type=COUNT, default=2)
    ap.add_argument("--attack-seconds", type=POSITIVE, default=6.0)
    ap.add_argument("--recover-seconds", type=POSITIVE, default=3.0)
    ap.add_argument("--attacker-nice", type=int, default=10,
                    help="attackers run this much below the bench's CPU priority: a real attacker's CPU is on "
                         "its own machine, and at equal priority the two cores' scheduler, not the server, "
                         "decides what the witnesses get (0: equal)")
    ap.add_argument("--lag-target", type=POSITIVE, default=0.3, help="input lag a call must come back under (s)")
    ap.add_argument("--output", type=writable_prefix, default="bench/out/abuse.json")
    ap.add_argument("server_args", nargs="*")
    args = ap.parse_args(argv)
    proc = None
    if args.spawn:
        proc, url = spawn_server(["--max-sessions", "4", "--api-key", args.key, *args.server_args])
    elif args.url:
        url = args.url.rstrip("/")
    else:
        ap.error("give --url of a running server, or --spawn")
    try:
        result = asyncio.run(run(url, args.key, args.attacks, args.witnesses, args.attack_seconds,
                                 args.recover_seconds, args.lag_target, proc.pid if proc else None,
                                 args.attacker_nice))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
