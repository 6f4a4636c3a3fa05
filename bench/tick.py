"""Offline tick benchmark: tick time vs concurrent sessions, lockstep beside the reference package.

    python -m bench.tick --model-dir DIR --batch 1 4 8       # or: lockstep bench tick ...
    python -m bench.tick --dummy 7b --device cuda --dtype bfloat16 --batch 1 8 32 64 --full-context
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.args import COUNT, NON_NEGATIVE, POSITIVE, add_kv_flags, kv_fields, writable_prefix
from bench.report import roofline, row_line, save_json, summarize, write_outputs
from engine import host
from engine.capacity import check_device, check_weights_fit
from engine.config import EngineConfig, KVConfig, LMConfig, MimiConfig, SamplingConfig
from engine.lm import MoshiLM
from engine.mimi import Mimi
from engine.runner import ModelRunner
from engine.serving import EngineLoop
from engine.tokenizer import TextTokenizer, train_tokenizer


def random_models(lm_cfg: LMConfig, mimi_cfg: MimiConfig, device, dtype: torch.dtype) -> tuple[MoshiLM, Mimi]:
    """Random-weight models made on the device. The LM is allocated straight in `dtype`: built
    there in fp32 and then cast, a 7B one would take 31 GB beside its 15 GB bf16 copy."""
    with torch.device("meta"):
        lm = MoshiLM(lm_cfg).to(dtype)
        check_weights_fit(lm, Mimi(mimi_cfg), dtype, device, lm_file_bytes=0)  # 7B in fp32 on CPU: 31 GB
    lm.to_empty(device=device)
    for p in lm.parameters():
        p.data.normal_(0, 0.02)
    with torch.device(device):
        mimi = Mimi(mimi_cfg)
    for name, buf in mimi.named_buffers():
        if name.endswith("cluster_usage"):
            buf.fill_(1.0)
        elif name.endswith("embedding_sum"):
            buf.normal_()
    return lm, mimi


def dummy_runner(name: str, device: str, dtype: torch.dtype, max_sessions: int, kernels: str,
                 batch_invariant: bool = False, kv: KVConfig = KVConfig()) -> ModelRunner:
    """Moshi 7B / Mimi shapes with random weights made on the device: no files needed."""
    if name != "7b":
        raise ValueError("--dummy supports only '7b'")
    check_device(device)
    lm, mimi = random_models(LMConfig(), MimiConfig(), device, dtype)
    tok_path = Path(tempfile.mkdtemp()) / "tok.model"
    train_tokenizer(tok_path, 1000)
    return ModelRunner(lm, mimi, TextTokenizer(tok_path), max_sessions, kernels, batch_invariant=batch_invariant,
                       kv=kv)


class EngineTicks:
    """The engine loop itself (offline mode, the code `lockstep serve` runs unpaced) with `batch`
    sessions that each hold `frames` frames of input."""

    def __init__(self, runner: ModelRunner, batch: int, frames: int, full_context: bool):
        self.runner, self.batch = runner, batch
        self.loop = EngineLoop(runner, max_buffer_frames=frames, max_waiting=None)
        rng = np.random.default_rng(batch)
        for _ in range(batch):
            session = self.loop.create_session(runner.default_sampling, lambda event: None)
            session.push((0.1 * rng.standard_normal(frames * runner.frame_size)).astype(np.float32))
        self.loop.tick()  # everyone joins
        if full_context:
            runner.fill_context(sorted(self.loop.sched.slot_of.values()))

    def tick(self) -> float:
        start = time.perf_counter()
        plan = self.loop.tick()
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize()
        assert len(plan.step) == self.batch
        return time.perf_counter() - start

    def stages(self, ticks: int) -> dict[str, float]:
        """Median ms per stage. Stage timing adds device syncs (and on CUDA bypasses the graphs), so
        these ticks are not the timed ones."""
        timer = self.runner.timer
        timer.reset()
        timer.enabled = True
        for _ in range(ticks):
            self.tick()
        timer.enabled = False
        return {k: statistics.median(v) * 1e3 for k, v in timer.totals.items()}

    def close(self) -> None:
        for sid in list(self.loop.sessions):
            self.loop.end_session(sid, "bench_done")
        self.loop.tick()


def reference_models(runner: ModelRunner, dtype: torch.dtype):
    """Kyutai's models holding exactly lockstep's weights."""
    from moshi.models.loaders import get_mimi, get_moshi_lm
    lm = get_moshi_lm(None, lm_kwargs=runner.lm.cfg.to_dict(), device="meta", dtype=dtype)
    lm.load_state_dict(runner.lm.state_dict(), assign=True)
    mimi = get_mimi(None, runner.mimi.cfg.to_dict(), device=str(runner.device))
    mimi.load_state_dict(runner.mimi.state_dict())
    mimi.set_num_codebooks(runner.lm.cfg.mimi_codebooks)
    return lm.to(runner.device).eval(), mimi.eval()


@contextlib.contextmanager
def reference_ticks(lm, mimi, batch: int, device: torch.device, sampling: SamplingConfig):
    """Yields a function running one timed step of kyutai's batched `LMGen` + Mimi, sampling as
    `sampling` says (the checkpoint's defaults, as the engine's sessions sample)."""
    from moshi.models.lm import LMGen
    gen = LMGen(lm, use_sampling=not sampling.greedy, temp=sampling.temperature, temp_text=sampling.text_temperature,
                top_k=sampling.top_k, top_k_text=sampling.text_top_k)
    pcm = torch.randn(batch, 1, mimi.frame_size, device=device) * 0.1

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def tick(stages: dict[str, list[float]] | None = None) -> float:
        """One tick's seconds; with `stages`, each stage's seconds are appended there too (a sync
        after each, so such ticks are not the timed ones)."""
        start = last = time.perf_counter()

        def mark(stage: str) -> None:
            nonlocal last
            if stages is not None:
                sync()
                now = time.perf_counter()
                stages.setdefault(stage, []).append(now - last)
                last = now

        codes = mimi.encode(pcm)
        mark("mimi_encode")
        tokens = gen.step(codes)
        mark("lm")
        if tokens is not None:
            mimi.decode(tokens[:, 1:])
            mark("mimi_decode")
        sync()
        return time.perf_counter() - start

    with torch.no_grad(), mimi.streaming(batch), gen.streaming(batch):
        yield tick


def measure(runner: ModelRunner, ref, batch: int, warmup: int, ticks: int, full_context: bool) -> dict:
    """One row of the sweep. The timed engine and reference ticks alternate, so a machine whose speed
    drifts (shared CPUs, clocks) shifts both alike and the ratio stays honest."""
    cuda = runner.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    engine = EngineTicks(runner, batch, warmup + 2 * ticks + 1, full_context)
    for _ in range(warmup):
        engine.tick()
    row = {"batch": batch, "engine": {"stages_ms": engine.stages(ticks)}}
    # The engine's own peak, taken before the reference allocates its caches beside it.
    if cuda:
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    mine, theirs = [], []
    with contextlib.ExitStack() as stack:
        ref_tick = stack.enter_context(reference_ticks(*ref, batch, runner.device, runner.default_sampling)) if ref else None
        for _ in range(warmup if ref_tick else 0):
            ref_tick()
        for _ in range(ticks):
            mine.append(engine.tick())
            if ref_tick:
                theirs.append(ref_tick())
        ref_stages: dict[str, list[float]] = {}
        for _ in range(ticks if ref_tick else 0):
            ref_tick(ref_stages)
    engine.close()
    row["engine"].update(summarize(mine))
    if not cuda:  # the process' peak resident set, reference included (Linux reports KiB)
        row["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    if ref_tick:
        row["reference"] = summarize(theirs)
        row["reference"]["stages_ms"] = {k: statistics.median(v) * 1e3 for k, v in ref_stages.items()}
        row["speedup"] = row["reference"]["p50_ms"] / row["engine"]["p50_ms"]
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="lockstep bench tick", description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--dummy", choices=["7b"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16 or float32")
    ap.add_argument("--batch", type=COUNT, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--warmup", type=NON_NEGATIVE, default=3)
    ap.add_argument("--ticks", type=COUNT, default=20)
    ap.add_argument("--full-context", action="store_true", help="hold every slot's LM and Mimi contexts full")
    ap.add_argument("--no-reference", action="store_true", help="skip kyutai's package")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="run the engine batch-invariant (every tick the largest --batch's rows): its price")
    add_kv_flags(ap)
    ap.add_argument("--bandwidth-gbs", type=POSITIVE, default=None, help="HBM bandwidth for the roofline (default: measured)")
    ap.add_argument("--output", type=writable_prefix, default="bench/out/tick",
                    help="prefix for the .json and .png outputs")
    args = ap.parse_args(argv)
    cfg = EngineConfig(model_dir=args.model_dir, device=args.device, dtype=args.dtype, max_sessions=max(args.batch),
                       kernels=args.kernels, batch_invariant=args.batch_invariant, **kv_fields(args)).validate()
    dtype = cfg.torch_dtype
    if args.dummy:
        runner = dummy_runner(args.dummy, cfg.device, dtype, cfg.max_sessions, cfg.kernels, cfg.batch_invariant, cfg.kv)
    else:
        from engine.cli import with_builtin_weights
        runner = ModelRunner.load(with_builtin_weights(cfg))
    ref = None if args.no_reference else reference_models(runner, dtype)
    cpu = host.cpuinfo("model name") or "unknown CPU"
    meta = {"device": torch.cuda.get_device_name() if runner.device.type == "cuda" else f"cpu ({cpu})",
            "dtype": str(dtype), "lm": runner.lm.cfg.to_dict(), "full_context": args.full_context,
            "batch_invariant": args.batch_invariant, "threads": torch.get_num_threads(), "kv": runner.kv.describe()}
    if ref is not None:  # kyutai's package compiles its hot functions unless told not to
        meta["reference_torch_compile"] = not os.environ.get("NO_TORCH_COMPILE")
    # As `lockstep serve` does, for both engines alike: no full GC pass over the long-lived objects
    # and no heap trimming lands in a timed tick.
    host.settle()
    try:
        rows = sweep(runner, ref, args, meta)
    finally:
        host.unsettle()
    write_outputs(Path(args.output), meta, rows)


def sweep(runner: ModelRunner, ref, args: argparse.Namespace, meta: dict) -> list[dict]:
    from tqdm import tqdm
    rows = []
    for batch in (bar := tqdm(args.batch, desc="sweep", unit="batch")):
        row = measure(runner, ref, batch, args.warmup, args.ticks, args.full_context)
        row.update(roofline(runner, batch, args.full_context, args.bandwidth_gbs))
        rows.append(row)
        # Each row as soon as it is measured, on the terminal and in the JSON: a sweep cut short
        # (a time limit on a lent GPU) keeps what it measured.
        bar.write(row_line(row))
        save_json(Path(args.output), meta, rows)
    return rows


if __name__ == "__main__":
    from engine.cli import main as lockstep_main  # its error handling: a bad flag is one line, no traceback
    lockstep_main(["bench", "tick", *sys.argv[1:]])
