"""Capacity on paper, measured with the real scheduler and KV pool: no model, simulated callers.

Callers arrive as a Poisson process; a call lasts an exponentially distributed time (mean 2 min
by default: many short calls, a few long ones; at least one frame). They are admitted as `lockstep
serve` admits them: when a slot is free and the KV pool can promise the call its minimum (its
whole context under `reserve`), waiting up to the admission wait (2 s, serve's default) and then
refused (503). Admitted calls join through `engine.scheduler.Scheduler` and take and return pages
through `engine.kv.pages.PageTables` over `engine.kv.alloc.PageAllocator`, exactly as the engine
does, at every page start of every call; only the model is missing. Slots and pages are what
`--max-sessions 0` sizes (`engine.kv.sizing.plan_state`) for Moshi 7B's shapes (bf16 weights) on a
device of the given memory, less 0.5 GiB for the CUDA context.

Reported per (device, policy, KV dtype, offered load): slots and pages, calls offered, the share
refused (503), mean and peak concurrent calls, the share of calls that lost context to a capped
window (some frame attended to less than its history, up to the full context), the share of their
frames that did, and the narrowest window they had (p10 / p50, seconds).
The first fifth of the simulated time (the system filling up) is not counted.

    lockstep bench capacity [--hours 3] [--devices 80 141] [--loads 32 64 96 128 160]
"""
from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
from pathlib import Path

import torch

from bench.args import COUNT, POSITIVE, at_least, writable_prefix
from engine.capacity import weight_bytes
from engine.config import FRAME_RATE, KVConfig, LMConfig, MimiConfig
from engine.kv.alloc import PageAllocator
from engine.kv.pages import PageTables
from engine.kv.sizing import plan_state
from engine.scheduler import Scheduler

# Device memory as nvidia-smi reports it (MiB), by the name the issue gives it.
DEVICES = {"80": ("H100 80 GB", 81559), "141": ("H200 141 GB", 143771)}
CUDA_CONTEXT = 1 << 29


def moshi_7b():
    from engine.lm import MoshiLM
    from engine.mimi import Mimi
    with torch.device("meta"):
        return MoshiLM(LMConfig()).to(torch.bfloat16), Mimi(MimiConfig())


def sized(lm, mimi, device_mib: int, kv: KVConfig) -> tuple[int, int]:
    """(slots, pages) `--max-sessions 0` gives on such a device."""
    free = device_mib * 2**20 - CUDA_CONTEXT - weight_bytes(lm, torch.bfloat16) - weight_bytes(mimi, torch.float32)
    plan = plan_state(lm, mimi, kv, kv.torch_dtype(torch.bfloat16), 0, "cuda", free=free)
    return plan.slots, plan.pages


def simulate(slots: int, pages: int, kv: KVConfig, context: int, load: float, mean_s: float, hours: float,
             seed: int, wait_s: float = 2.0) -> dict:
    """One run: `load` = offered concurrent calls (arrival rate x mean length)."""
    rng = random.Random(seed)
    tables = PageTables(slots + 1, context, kv.page_size, PageAllocator(pages), kv.policy, kv.min_positions)
    sched = Scheduler(slots)
    ticks = int(hours * 3600 * FRAME_RATE)
    counted_from = ticks // 5
    rate = load / (mean_s * FRAME_RATE)  # arrivals per tick
    next_arrival = rng.expovariate(rate)
    waiting: list[tuple[int, int]] = []  # (caller, deadline tick)
    length: dict[int, int] = {}  # caller -> frames
    admitted: set[int] = set()
    joined: dict[int, int] = {}  # caller -> tick of its first frame
    events: list[tuple[int, int, int]] = []  # (tick, caller, slot): a page start of a running call
    capped_frames: dict[int, int] = {}
    narrowest: dict[int, int] = {}
    offered = refused = 0
    concurrent_sum, peak, changed = 0, 0, False  # changed: a submit or finish the scheduler has not seen
    ends: dict[int, list[int]] = {}
    caller = 0
    for tick in range(ticks):
        counted = tick >= counted_from
        while next_arrival <= tick:
            caller += 1
            length[caller] = max(1, round(rng.expovariate(1 / (mean_s * FRAME_RATE))))
            waiting.append((caller, tick + int(wait_s * FRAME_RATE)))
            offered += counted
            next_arrival += rng.expovariate(rate)
        still = []
        for c, deadline in waiting:  # first come, first admitted, as the API's waiters
            if len(admitted) < slots and tables.admit(c):
                admitted.add(c)
                sched.submit(c)
                changed = True
            elif tick >= deadline:
                refused += counted
                length.pop(c)
            else:
                still.append((c, deadline))
        waiting = still
        # The scheduler's plan changes only when someone was submitted or finished: between those
        # ticks it would give the same slots again, so it is asked only then (a long run's cost).
        plan = sched.tick() if changed else None
        changed = False
        for c, _ in plan.leaves if plan else ():
            tables.release(c)
            admitted.discard(c)
        for c, slot in plan.joins if plan else ():
            tables.join(slot, c)
            joined[c] = tick
            narrowest[c] = context
            heapq.heappush(events, (tick + kv.page_size, c, slot))
            ends.setdefault(tick + length[c], []).append(c)
        while events and events[0][0] <= tick:
            _, c, slot = heapq.heappop(events)
            if c not in admitted or sched.slot_of.get(c) != slot or tick >= joined[c] + length[c]:
                continue
            p = tick - joined[c]
            tables.advance(slot, p)
            w = int(tables.window[slot])
            # Until the next page start, the frames whose window leaves out some of their history.
            cut = min(length[c], p + kv.page_size) - max(p, w)
            if w < context and cut > 0:
                capped_frames[c] = capped_frames.get(c, 0) + cut
                narrowest[c] = min(narrowest[c], w)
            heapq.heappush(events, (tick + kv.page_size, c, slot))
        for c in ends.pop(tick, ()):
            sched.finish(c)
            changed = True
        if counted:
            running = len(sched.slot_of)
            concurrent_sum += running
            peak = max(peak, running)
    tables.check()
    done = [c for c in joined if joined[c] >= counted_from and joined[c] + length[c] < ticks]
    capped = [c for c in done if narrowest[c] < context]
    narrow = sorted(narrowest[c] / FRAME_RATE for c in capped)
    return {"offered": offered, "refused": refused, "refused_share": refused / max(1, offered),
            "mean_concurrent": concurrent_sum / max(1, ticks - counted_from), "peak_concurrent": peak,
            "calls": len(done), "capped_share": len(capped) / max(1, len(done)),
            "capped_frames_share": sum(capped_frames.get(c, 0) for c in capped) / max(1, sum(length[c] for c in capped)),
            "narrowest_p10_s": narrow[len(narrow) // 10] if narrow else None,
            "narrowest_p50_s": narrow[len(narrow) // 2] if narrow else None}


def row_line(r: dict) -> str:
    def s(x):
        return "-" if x is None else f"{x:.0f}"
    return (f"| {r['device']} | {r['policy']} | {r['kv_dtype']} | {r['slots']} | {r['pages']} | {r['load']:g} | "
            f"{r['refused_share']:.1%} | {r['mean_concurrent']:.1f} / {r['peak_concurrent']} | {r['capped_share']:.1%} | "
            f"{r['capped_frames_share']:.1%} | {s(r['narrowest_p10_s'])} / {s(r['narrowest_p50_s'])} |")


HEADER = ("| device | policy | KV | slots | pages | offered load | 503 | concurrent mean / peak | calls capped | "
          "their frames capped | narrowest window p10 / p50 (s) |\n|---|---|---|---|---|---|---|---|---|---|---|")


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot (pip install matplotlib)")
        return
    devices = sorted({r["device"] for r in rows})
    fig, axes = plt.subplots(2, len(devices), figsize=(5.5 * len(devices), 7), squeeze=False)
    for col, device in enumerate(devices):
        for key in sorted({(r["policy"], r["kv_dtype"]) for r in rows}):
            pts = [r for r in rows if r["device"] == device and (r["policy"], r["kv_dtype"]) == key]
            loads = [r["load"] for r in pts]
            label = f"{key[0]} {key[1]}"
            axes[0][col].plot(loads, [r["mean_concurrent"] for r in pts], "o-", label=label)
            axes[1][col].plot(loads, [100 * r["refused_share"] for r in pts], "o-", label=f"{label}: 503")
            axes[1][col].plot(loads, [100 * r["capped_share"] for r in pts], "x:", label=f"{label}: capped")
        axes[0][col].set_title(device)
        axes[0][col].set_ylabel("concurrent calls (mean)")
        axes[1][col].set_ylabel("% of calls")
        axes[1][col].set_xlabel("offered load (calls at once if all were admitted)")
        axes[0][col].legend(fontsize=7)
        axes[1][col].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lockstep bench capacity", description=__doc__.split("\n")[0])
    ap.add_argument("--devices", nargs="+", choices=sorted(DEVICES), default=["80", "141"])
    ap.add_argument("--policies", nargs="+", choices=["reserve", "elastic"], default=["reserve", "elastic"])
    ap.add_argument("--kv-dtypes", nargs="+", choices=["bf16", "fp8"], default=["bf16", "fp8"])
    ap.add_argument("--loads", type=at_least(0.1, float), nargs="+", default=[32, 64, 96, 128, 160])
    ap.add_argument("--mean-call-seconds", type=POSITIVE, default=120.0)
    ap.add_argument("--min-seconds", type=POSITIVE, default=60.0, help="elastic: --kv-min-seconds")
    ap.add_argument("--hours", type=at_least(0.01, float, 100.0), default=3.0, help="simulated time per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-slots", type=COUNT, default=None, help="fewer slots than memory holds (tests)")
    ap.add_argument("--output", type=writable_prefix, default="bench/out/capacity")
    args = ap.parse_args(argv)
    lm, mimi = moshi_7b()
    rows = []
    print(HEADER)
    for device in args.devices:
        name, mib = DEVICES[device]
        for policy in args.policies:
            for dtype in args.kv_dtypes:
                kv = KVConfig(policy=policy, min_seconds=args.min_seconds, dtype=dtype).validate()
                slots, pages = sized(lm, mimi, mib, kv)
                if args.max_slots:
                    pages = pages * min(slots, args.max_slots) // slots
                    slots = min(slots, args.max_slots)
                for load in args.loads:
                    r = simulate(slots, pages, kv, lm.cfg.context, load, args.mean_call_seconds, args.hours,
                                 args.seed)
                    r.update(device=name, policy=policy, kv_dtype=dtype, slots=slots, pages=pages, load=load)
                    rows.append(r)
                    print(row_line(r), flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"call_length": f"exponential, mean {args.mean_call_seconds:g} s", "arrivals": "Poisson",
            "hours": args.hours, "min_seconds": args.min_seconds, "admission_wait_s": 2.0, "seed": args.seed}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    from engine.cli import main as lockstep_main
    lockstep_main(["bench", "capacity", *sys.argv[1:]])
