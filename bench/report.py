"""Shared benchmark plumbing: percentiles, the bandwidth roofline, and table / JSON / PNG output."""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from engine.quantizer import Codebook

FRAME_MS = 80.0


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def summarize(seconds: list[float]) -> dict:
    ms = [t * 1e3 for t in seconds]
    return {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "mean_ms": statistics.fmean(ms),
            "n": len(ms)}


def measured_bandwidth_gbs(device: torch.device, size_mb: int = 512, reps: int = 10) -> float:
    """Device memory bandwidth from a large copy (read + write bytes per copy)."""
    n = size_mb * 2**20 // 4
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync()
    return 2 * n * 4 * reps / (time.perf_counter() - start) / 1e9


_BANDWIDTH: dict[str, float] = {}


def tick_bytes(runner, batch: int, full_context: bool) -> int:
    """Bytes a tick must read at least: every weight once (LM and Mimi), but of an embedding table
    only the rows its slots look up (the LM's 0.6 GB of tables give each slot one row a tick), the
    RVQ's codebooks once (the encoder scores every code), plus each slot's valid KV in the LM's and
    Mimi's transformers."""
    modules = [m for root in (runner.lm, runner.mimi) for m in root.modules()]
    tables = {id(m.weight) for m in modules if isinstance(m, nn.Embedding)}
    weight_bytes = sum(p.numel() * p.element_size() for m in (runner.lm, runner.mimi) for p in m.parameters()
                       if id(p) not in tables)
    weight_bytes += sum(min(batch, m.num_embeddings) * m.embedding_dim * m.weight.element_size()
                        for m in modules if isinstance(m, nn.Embedding))
    codebook = next(m for m in runner.mimi.modules() if isinstance(m, Codebook))  # all of one size
    weight_bytes += runner.mimi.quantizer.num_codebooks * codebook.bins * (codebook.dim + 2) * 4
    mimi = (runner.mimi.encoder_transformer.transformer, runner.mimi.decoder_transformer.transformer)
    kv_bytes = sum(t.kv_bytes(t.capacity if full_context else 1) for t in (runner.lm.transformer, *mimi))
    return weight_bytes + kv_bytes * batch


def roofline(runner, batch: int, full_context: bool, bandwidth_gbs: float | None) -> dict:
    """The memory-bandwidth floor of a tick (ms) at the measured (or given) bandwidth."""
    if bandwidth_gbs is None:
        bandwidth_gbs = _BANDWIDTH.setdefault(str(runner.device), measured_bandwidth_gbs(runner.device))
    nbytes = tick_bytes(runner, batch, full_context)
    return {"bytes": nbytes, "bandwidth_gbs": bandwidth_gbs, "floor_ms": nbytes / (bandwidth_gbs * 1e9) * 1e3}


def row_line(r: dict) -> str:
    """One measured row in a line (progress output)."""
    ref = r.get("reference", {}).get("p50_ms", float("nan"))
    return (f"B={r['batch']}: p50 {r['engine']['p50_ms']:.2f} ms, p99 {r['engine']['p99_ms']:.2f} ms, "
            f"floor {r['floor_ms']:.2f} ms, reference p50 {ref:.2f} ms")


def save_json(prefix: Path, meta: dict, rows: list[dict]) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


def write_outputs(prefix: Path, meta: dict, rows: list[dict]) -> None:
    header = (f"{'B':>4} {'p50 ms':>9} {'p99 ms':>9} {'margin':>8} {'floor ms':>9} {'GB/s':>8} {'of peak':>8} "
              f"{'ref p50':>9} {'speedup':>8}")
    print(f"device: {meta['device']}  dtype: {meta['dtype']}  full context: {meta.get('full_context')}"
          + ("  batch-invariant" if meta.get("batch_invariant") else ""))
    print(header)
    for r in rows:
        e = r["engine"]
        ref = r.get("reference", {}).get("p50_ms", float("nan"))
        achieved = r["bytes"] / (e["p50_ms"] * 1e-3) / 1e9  # the bandwidth the tick effectively ran at
        print(f"{r['batch']:>4} {e['p50_ms']:>9.2f} {e['p99_ms']:>9.2f} {FRAME_MS / e['p99_ms']:>7.1f}x "
              f"{r['floor_ms']:>9.2f} {achieved:>8.1f} {achieved / r['bandwidth_gbs']:>7.1%} "
              f"{ref:>9.2f} {r.get('speedup', float('nan')):>7.2f}x")
    under = [r["batch"] for r in rows if r["engine"]["p99_ms"] < FRAME_MS]
    meta["max_realtime_batch"] = max(under) if under else 0
    print(f"largest B with p99 tick < {FRAME_MS:.0f} ms: {meta['max_realtime_batch']}")
    if rows and "peak_memory_gb" in rows[-1]:
        print(f"peak memory at B={rows[-1]['batch']}: {rows[-1]['peak_memory_gb']:.2f} GB")
    for who in ("engine", "reference"):
        stages = rows[-1].get(who, {}).get("stages_ms") if rows else None
        if stages:
            print("%sstages at B=%d (ms): %s" % ("" if who == "engine" else "reference ", rows[-1]["batch"],
                                                 ", ".join(f"{k} {v:.2f}" for k, v in stages.items())))
    save_json(prefix, meta, rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    bs = [r["batch"] for r in rows]
    ax.plot(bs, [r["engine"]["p99_ms"] for r in rows], "o-", label="lockstep p99")
    ax.plot(bs, [r["engine"]["p50_ms"] for r in rows], "o--", label="lockstep p50")
    if all("reference" in r for r in rows):
        ax.plot(bs, [r["reference"]["p50_ms"] for r in rows], "s-", label="reference p50")
    ax.plot(bs, [r["floor_ms"] for r in rows], ":", label="bandwidth floor")
    ax.axhline(FRAME_MS, color="red", lw=0.8, label="80 ms frame")
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("tick time (ms)")
    ax.set_title(f"{meta['device']} {meta['dtype']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(prefix.with_suffix(".png"), dpi=120)
    print(f"wrote {prefix.with_suffix('.json')} and {prefix.with_suffix('.png')}")
