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
import signal
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from bench.args import COUNT, POSITIVE, at_least, writable_prefix
from bench.fidelity_metrics import PairedTop1, RunDeviation, deviation_ratio
from bench.fidelity_reference import ReferenceStepper, load_reference
from engine import host
from engine.capacity import check_device
from engine.audio import AudioError, frames, read_audio
from engine.config import ConfigError, EngineConfig
from engine.make_checkpoint import PRESETS
from kernels.dispatch import resolve_backend

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
    ap.add_argument("--max-top1-drop", type=at_least(0, float), default=0.5,
                    help="the goal: lockstep's top-1 agreement at most this many points below the reference's")
    ap.add_argument("--json", type=writable_prefix, default="bench/out/fidelity.json", help="where the JSON goes")
    ap.add_argument("inputs", nargs="+", help="input audio files, one session each")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # A time limit stops a run with SIGINT (bench/gpu_checks.sh), which the run answers with the
    # frames stepped so far; but a shell starts its background jobs with SIGINT ignored, and Python
    # then never raises KeyboardInterrupt: the limit's SIGKILL would follow and lose every figure.
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGINT, signal.default_int_handler) if main_thread else None
    try:
        return run(parse(argv))
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, before)


def run(args: argparse.Namespace) -> int:
    cfg = EngineConfig(model_dir=args.model_dir, device=args.device, dtype=args.dtype, max_sessions=1,
                       kernels=args.kernels).validate()
    check_device(cfg.device)  # before minutes of loading: no GPU, or Triton on a CPU without the interpreter
    resolve_backend(cfg.kernels, cfg.device)
    inputs = read_inputs(args.inputs, args.frames)  # before the models: a bad input is named at once
    with tempfile.TemporaryDirectory(prefix="lockstep-fidelity-") as scratch:
        if args.dummy:
            from engine.make_checkpoint import make_checkpoint
            model_dir = make_checkpoint(Path(scratch) / args.dummy, args.dummy)
        else:
            from engine.cli import with_builtin_weights
            model_dir = Path(with_builtin_weights(cfg).model_dir)
        doc = compare(Path(model_dir), dataclasses.replace(cfg, model_dir=str(model_dir)), inputs)
    doc["meta"]["checkpoint"] = args.dummy and f"make-checkpoint --preset {args.dummy}" or str(model_dir)
    lock, ref = doc["lockstep"]["all"], doc["reference"]["all"]
    if lock["tokens"] == 0:
        if doc["meta"]["cut_short"]:
            return 130
        raise ConfigError(f"no token to compare: every input is {doc['meta']['max_delay'] + 1} frame(s) or shorter, "
                          "all inside the LM's initial delay")
    ratio = deviation_ratio(lock, ref)
    drop = 100 * (ref["top1_agreement"] - lock["top1_agreement"])
    doc["ratio"] = ratio
    doc["goal"] = {"max_ratio": args.max_ratio, "max_top1_drop_points": args.max_top1_drop,
                   "met": ratio <= args.max_ratio and drop <= args.max_top1_drop}
    Path(args.json).write_text(json.dumps(doc, indent=2))
    print(table(doc))
    print(f"wrote {args.json}; goal (ratio <= {args.max_ratio:g}, top-1 within {args.max_top1_drop:g} points): "
          f"{'met' if doc['goal']['met'] else 'MISSED'}" + (" (cut short: the frames stepped so far)"
                                                            if doc["meta"]["cut_short"] else ""))
    print(f"{args.dtype}: lockstep/reference deviation ratio {ratio:.3g} "
          f"(top-1 agreement {100 * lock['top1_agreement']:.1f}% vs {100 * ref['top1_agreement']:.1f}%)")
    if doc["meta"]["cut_short"]:
        return 130
    return 0 if doc["goal"]["met"] else 1


def read_inputs(paths: list[str], limit: int | None) -> dict[Path, np.ndarray]:
    inputs = {}
    for p in paths:
        try:
            inputs[Path(p)] = frames(read_audio(p))[:limit]
        except (OSError, AudioError) as e:
            raise ConfigError(f"cannot read input {p}: {e}") from None
        if len(inputs[Path(p)]) == 0:
            raise ConfigError(f"input {p} holds no audio")
    return inputs


def compare(model_dir: Path, cfg: EngineConfig, inputs: dict[Path, np.ndarray]) -> dict:
    from bench.fidelity_lockstep import LockstepStepper
    from engine.runner import ModelRunner
    dtype, device = cfg.torch_dtype, torch.device(cfg.device)
    if device.type == "cuda":  # the oracle in true float32 (cuDNN's convolutions default to TF32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    mimi, oracle_lm = load_reference(model_dir, torch.float32, device)
    _, ref_lm = load_reference(model_dir, dtype, device)
    runner = ModelRunner.load(cfg)
    mine = LockstepStepper(runner)
    lm_cfg, sampling = runner.lm.cfg, runner.default_sampling
    mimi.set_num_codebooks(lm_cfg.mimi_codebooks)
    temperatures = [sampling.text_temperature] + [sampling.temperature] * lm_cfg.dep_q
    tally = Tally(RunDeviation(lm_cfg.dep_q), RunDeviation(lm_cfg.dep_q), PairedTop1(),
                  torch.zeros(lm_cfg.mimi_codebooks, dtype=torch.long))
    cut_short = False
    try:
        for pcm in inputs.values():
            mine.start()
            with torch.no_grad(), mimi.streaming(1), ReferenceStepper(oracle_lm, 1) as oracle, \
                    ReferenceStepper(ref_lm, 1) as ref:
                run_input(torch.from_numpy(pcm), lm_cfg, mimi, oracle, ref, mine, temperatures, tally)
    except KeyboardInterrupt:  # a time limit (the GPU checks') or Ctrl-C: report the frames stepped so far
        cut_short = True
    cpu = host.cpuinfo("model name") or "unknown CPU"
    n_frames = tally.frames
    meta = {"dtype": str(dtype).replace("torch.", ""), "kernels": runner.kernel_backend,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu})",
            "cuda_graphs": mine.replay is not None, "inputs": [str(p) for p in inputs], "frames": n_frames,
            "cut_short": cut_short, "max_delay": lm_cfg.max_delay,
            "temperatures": {"text": temperatures[0], "audio": temperatures[-1]}, "lm": lm_cfg.to_dict()}
    return {"meta": meta, "reference": tally.reference.summary(), "lockstep": tally.lockstep.summary(),
            "paired_top1": tally.paired.summary(),
            "mimi_codes": {"agreement": (tally.codes.double() / max(n_frames, 1)).tolist(),
                           "all": float(tally.codes.sum()) / max(n_frames * len(tally.codes), 1)}}


@dataclasses.dataclass
class Tally:
    reference: RunDeviation
    lockstep: RunDeviation
    paired: PairedTop1
    codes: torch.Tensor  # frames whose Mimi code agreed, per codebook
    frames: int = 0  # frames stepped in full


def run_input(pcm: torch.Tensor, lm_cfg, mimi, oracle: ReferenceStepper, ref: ReferenceStepper, mine,
              temperatures: list[float], tally: Tally) -> None:
    """One input's frames through the three LMs (and both Mimi encoders), into `tally`."""
    F, n_user = len(pcm), lm_cfg.n_q - lm_cfg.dep_q
    for t, frame in enumerate(pcm):
        codes = mimi.encode(frame.to(oracle.initial.device).view(1, 1, -1))[0, :, 0]
        agree = (mine.encode(frame).cpu() == codes.cpu()).long()
        user = codes[None, :n_user]
        want = oracle.step(user)
        theirs, ours = ref.step(user, want.top1), mine.step(user, want.top1)
        for k, temperature in enumerate(temperatures):
            # Only the tokens a session receives: stream k of output frame j is generated at step
            # j + delay[k], and the outputs of the first max_delay steps are dropped.
            if not lm_cfg.delays[k] <= t <= F - 1 - lm_cfg.max_delay + lm_cfg.delays[k]:
                continue
            for step, run in ((theirs, tally.reference), (ours, tally.lockstep)):
                run.streams[k].add(want.stream(k), step.stream(k), want.top1[:, k], step.top1[:, k], temperature)
            tally.paired.add(want.top1[:, k], theirs.top1[:, k], ours.top1[:, k])
        tally.codes += agree
        tally.frames += 1


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
    p = doc["paired_top1"]
    lines.append(f"top-1 misses (all streams): the reference's alone {p['lockstep_only_right']}, lockstep's alone "
                 f"{p['reference_only_right']}, both {p['both_wrong']}")
    codes = doc["mimi_codes"]
    lines.append(f"Mimi codes (encoder, float32 in both): lockstep's agree with the reference's on "
                 f"{100 * codes['all']:.2f}% (per codebook: {', '.join(f'{100 * a:.1f}' for a in codes['agreement'])})")
    return "\n".join(lines)


if __name__ == "__main__":
    from engine.cli import main as lockstep_main  # its error handling: a bad flag is one line, no traceback
    lockstep_main(["bench", "fidelity", *sys.argv[1:]])
