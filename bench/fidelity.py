"""Teacher-forced fidelity: lockstep in a dtype beside kyutai's reference in the same dtype, both
against the reference in float32 (the oracle).

    lockstep bench fidelity --model-dir DIR --dtype bfloat16 IN.wav ...    # or: python -m bench.fidelity
    lockstep bench fidelity --dummy tiny-lm --dtype bfloat16 --kernels triton IN.wav   # TRITON_INTERPRET=1 on CPU

Free-running outputs part at the first near-tie and never meet again, so they say little about
precision. Here the oracle runs greedily over each input; then the reference and lockstep, in the
chosen dtype, step through the same frames with every token (text and each audio codebook, in the
delayed layout the LM generates) forced to the oracle's, so all three always see the same history,
and each step's logits are compared with the oracle's. The reference's own deviation is the noise
floor lockstep is judged by: the summary line gives lockstep's mean KL over the reference's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

from bench.args import COUNT, POSITIVE, writable_prefix
from bench.fidelity_metrics import RunDeviation, deviation_ratio
from bench.fidelity_reference import ReferenceStepper, load_reference
from engine import host
from engine.audio import frames, read_audio
from engine.config import EngineConfig
from engine.make_checkpoint import PRESETS

DTYPES = ("bfloat16", "float16", "float32")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="lockstep bench fidelity", description=__doc__.split("\n")[0])
    weights = ap.add_mutually_exclusive_group()
    weights.add_argument("--model-dir", help="checkpoint folder (default: the built-in random-weight one)")
    weights.add_argument("--dummy", choices=sorted(PRESETS),
                         help="a random-weight checkpoint of this make-checkpoint preset, made in a scratch folder")
    ap.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="the dtype compared with the float32 oracle")
    ap.add_argument("--kernels", choices=["torch", "triton"], default="torch",
                    help="lockstep's kernels (triton on CPU needs TRITON_INTERPRET=1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--frames", type=COUNT, default=None, help="at most this many frames of each input")
    ap.add_argument("--max-ratio", type=POSITIVE, default=1.1,
                    help="the goal: lockstep's mean KL at most this times the reference's")
    ap.add_argument("--max-top1-drop", type=float, default=0.5,
                    help="the goal: lockstep's top-1 agreement at most this many points below the reference's")
    ap.add_argument("--json", type=writable_prefix, default="bench/out/fidelity.json", help="where the JSON goes")
    ap.add_argument("inputs", nargs="+", help="input audio files, one session each")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cfg = EngineConfig(model_dir=args.model_dir, device=args.device, dtype=args.dtype, max_sessions=1,
                       kernels=args.kernels).validate()
    with tempfile.TemporaryDirectory(prefix="lockstep-fidelity-") as scratch:
        if args.dummy:
            from engine.make_checkpoint import make_checkpoint
            model_dir = make_checkpoint(Path(scratch) / args.dummy, args.dummy)
        else:
            from engine.cli import with_builtin_weights
            model_dir = Path(with_builtin_weights(cfg).model_dir)
        # Inputs read before the models load: an unreadable one is named before minutes are spent.
        inputs = {Path(p): frames(read_audio(p))[: args.frames] for p in args.inputs}
        doc = compare(Path(model_dir), dataclasses.replace(cfg, model_dir=str(model_dir)), inputs)
    doc["meta"]["checkpoint"] = args.dummy and f"make-checkpoint --preset {args.dummy}" or str(model_dir)
    lock, ref = doc["lockstep"]["all"], doc["reference"]["all"]
    ratio = deviation_ratio(lock, ref)
    drop = 100 * (ref["top1_agreement"] - lock["top1_agreement"])
    doc["ratio"] = ratio
    doc["goal"] = {"max_ratio": args.max_ratio, "max_top1_drop_points": args.max_top1_drop,
                   "met": ratio <= args.max_ratio and drop <= args.max_top1_drop}
    Path(args.json).write_text(json.dumps(doc, indent=2))
    print(table(doc))
    print(f"wrote {args.json}; goal (ratio <= {args.max_ratio:g}, top-1 within {args.max_top1_drop:g} points): "
          f"{'met' if doc['goal']['met'] else 'MISSED'}")
    print(f"{args.dtype}: lockstep/reference deviation ratio {ratio:.3g} "
          f"(top-1 agreement {100 * lock['top1_agreement']:.1f}% vs {100 * ref['top1_agreement']:.1f}%)")
    return 0 if doc["goal"]["met"] else 1


def compare(model_dir: Path, cfg: EngineConfig, inputs: dict[Path, "object"]) -> dict:
    from bench.fidelity_lockstep import LockstepStepper
    from engine.runner import ModelRunner
    dtype, device = cfg.torch_dtype, torch.device(cfg.device)
    mimi, oracle_lm = load_reference(model_dir, torch.float32, device)
    _, ref_lm = load_reference(model_dir, dtype, device)
    runner = ModelRunner.load(cfg)
    mine = LockstepStepper(runner)
    lm_cfg, sampling = runner.lm.cfg, runner.default_sampling
    n_user = lm_cfg.n_q - lm_cfg.dep_q
    mimi.set_num_codebooks(lm_cfg.mimi_codebooks)
    temperatures = [sampling.text_temperature] + [sampling.temperature] * lm_cfg.dep_q
    runs = {"reference": RunDeviation(lm_cfg.dep_q), "lockstep": RunDeviation(lm_cfg.dep_q)}
    codes_agree = torch.zeros(lm_cfg.mimi_codebooks, dtype=torch.long)
    n_frames = 0
    for path, pcm in inputs.items():
        F = len(pcm)
        # The tokens a session receives: stream k of output frame j is generated at step j + delay[k],
        # and the first max_delay steps' outputs are dropped, so only these steps are compared.
        emitted = [[lm_cfg.delays[k] <= t <= F - 1 - lm_cfg.max_delay + lm_cfg.delays[k]
                    for k in range(1 + lm_cfg.dep_q)] for t in range(F)]
        mine.start()
        with torch.no_grad(), mimi.streaming(1), ReferenceStepper(oracle_lm, 1) as oracle, \
                ReferenceStepper(ref_lm, 1) as ref:
            for t, frame in enumerate(torch.from_numpy(pcm)):
                codes = mimi.encode(frame.to(device).view(1, 1, -1))[0, :, 0]
                codes_agree += (mine.encode(frame).cpu() == codes.cpu()).long()
                user = codes[None, :n_user]
                want = oracle.step(user)
                got = {"reference": ref.step(user, want.top1), "lockstep": mine.step(user, want.top1)}
                for name, step in got.items():
                    for k, (temperature, deviation) in enumerate(zip(temperatures, runs[name].streams)):
                        if not emitted[t][k]:
                            continue
                        oracle_logits, logits = (want.text, step.text) if k == 0 else (want.audio[:, k - 1],
                                                                                       step.audio[:, k - 1])
                        deviation.add(oracle_logits, logits, want.top1[:, k], step.top1[:, k], temperature)
        n_frames += F
    cpu = host.cpuinfo("model name") or "unknown CPU"
    meta = {"dtype": str(dtype).replace("torch.", ""), "kernels": runner.kernel_backend,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu})",
            "cuda_graphs": mine.replay is not None, "inputs": [str(p) for p in inputs], "frames": n_frames,
            "temperatures": {"text": temperatures[0], "audio": temperatures[-1]}, "lm": lm_cfg.to_dict()}
    return {"meta": meta, "reference": runs["reference"].summary(), "lockstep": runs["lockstep"].summary(),
            "mimi_codes": {"agreement": (codes_agree.double() / max(n_frames, 1)).tolist(),
                           "all": float(codes_agree.sum()) / max(n_frames * len(codes_agree), 1)}}


def table(doc: dict) -> str:
    m = doc["meta"]
    lines = [f"fidelity: {m['dtype']} against the float32 oracle, teacher-forced; lockstep on {m['kernels']} kernels"
             f"{' in a CUDA graph' if m['cuda_graphs'] else ''}, {m['device']}; {len(m['inputs'])} input(s), "
             f"{m['frames']} frames; KL at temperature {m['temperatures']['text']:g} (text), "
             f"{m['temperatures']['audio']:g} (audio)",
             "| stream | tokens | top-1 ref / lockstep | mean KL ref / lockstep | p99 KL ref / lockstep "
             "| max abs dlogit ref / lockstep |",
             "|---|---|---|---|---|---|"]
    for name in doc["reference"]:
        r, s = doc["reference"][name], doc["lockstep"][name]
        lines.append(f"| {name} | {r['tokens']} | {100 * r['top1_agreement']:.1f}% / {100 * s['top1_agreement']:.1f}% "
                     f"| {r['kl_mean']:.2e} / {s['kl_mean']:.2e} | {r['kl_p99']:.2e} / {s['kl_p99']:.2e} "
                     f"| {r['max_abs_logit_diff']:.3g} / {s['max_abs_logit_diff']:.3g} |")
    codes = doc["mimi_codes"]
    lines.append(f"Mimi codes (encoder, float32 in both): lockstep's agree with the reference's on "
                 f"{100 * codes['all']:.2f}% (per codebook: {', '.join(f'{100 * a:.1f}' for a in codes['agreement'])})")
    return "\n".join(lines)


if __name__ == "__main__":
    from engine.cli import main as lockstep_main  # its error handling: a bad flag is one line, no traceback
    lockstep_main(["bench", "fidelity", *sys.argv[1:]])
