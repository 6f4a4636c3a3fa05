"""What a narrower KV cache costs in tokens: greedy sessions with bf16 or fp8 KV against the same
sessions with fp32 KV, everything else equal.

The LM runs its torch (or Triton) path in every run, the fused C step too being fp32-only; a row
`fp32-fused` gives the C step's fp32 against it, the size of a difference that is rounding alone.
Greedy decoding is autoregressive, so once one token differs a session's later tokens follow
another path; a frame-by-frame match rate after that says little. Reported per KV dtype: the frame
of each session's first differing token (text or any audio codebook; a session that never differs
counts its length), and the share of frames identical before the first difference over all frames.
`--kernels triton` under TRITON_INTERPRET=1 runs the Triton kernels (the paged attention's fp8 path
included) interpreted on CPU: slow, meant for the all-tiny checkpoint.

    lockstep bench kv_agreement [--model-dir DIR] [--sessions 6] [--seconds 16] [--kv-dtypes bf16 fp8]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench.args import COUNT, POSITIVE, writable_prefix
from bench.serve import synthetic_speech
from engine.config import EngineConfig, SamplingConfig
from engine.generate import run_sessions
from engine.runner import ModelRunner


def first_difference(a, b) -> int:
    """The first output frame whose tokens differ (their common length when none does)."""
    frames = list(zip(zip(a.text_tokens, a.audio_tokens), zip(b.text_tokens, b.audio_tokens)))
    return next((i for i, (x, y) in enumerate(frames) if x != y), len(frames))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lockstep bench kv_agreement", description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--kernels", default="torch", choices=["torch", "triton"])
    ap.add_argument("--kv-dtypes", nargs="+", choices=["fp32-fused", "bf16", "fp16", "fp8"],
                    default=["fp32-fused", "bf16", "fp8"])
    ap.add_argument("--sessions", type=COUNT, default=6)
    ap.add_argument("--seconds", type=POSITIVE, default=16.0, help="each session's input")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=writable_prefix, default="bench/out/kv_agreement")
    args = ap.parse_args(argv)
    from engine.cli import with_builtin_weights
    n = int(args.seconds * 12.5)
    inputs = {f"s{i}": synthetic_speech(args.seconds + 0.2, args.seed + i)[: n * 1920].reshape(n, 1920)
              for i in range(args.sessions)}
    greedy = {k: SamplingConfig(greedy=True) for k in inputs}

    def run(kv_dtype: str) -> dict:
        cfg = with_builtin_weights(EngineConfig(model_dir=args.model_dir, device="cpu", dtype="float32",
                                                max_sessions=args.sessions, kernels=args.kernels,
                                                kv_dtype=kv_dtype.removesuffix("-fused")).validate())
        runner = ModelRunner.load(cfg)
        if not kv_dtype.endswith("-fused"):
            runner.lm.transformer.cpu_stack = None
        return run_sessions(runner, inputs, greedy)

    base = run("fp32")
    rows = []
    for dtype in args.kv_dtypes:
        got = run(dtype)
        firsts = [first_difference(base[k], got[k]) for k in inputs]
        total = sum(len(base[k].text_tokens) for k in inputs)
        row = {"kv_dtype": dtype, "frames": total, "first_difference": firsts,
               "first_difference_median": statistics.median(firsts),
               "never_differed": sum(f == len(base[k].text_tokens) for f, k in zip(firsts, inputs)),
               "agreeing_share": sum(firsts) / total}
        rows.append(row)
        print(f"{args.kernels} kernels, {dtype} KV against fp32 KV: {row['never_differed']} of {len(inputs)} sessions "
              f"never differ over {total // len(inputs)} frames; first difference at frames {firsts} (median "
              f"{row['first_difference_median']:g}); {row['agreeing_share']:.1%} of frames before it", flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"model_dir": args.model_dir, "kernels": args.kernels,
                                                    "seconds": args.seconds, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    from engine.cli import main as lockstep_main
    lockstep_main(["bench", "kv_agreement", *sys.argv[1:]])
