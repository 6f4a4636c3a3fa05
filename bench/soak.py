"""Soak benchmark: sessions churn through the engine loop for many ticks and nothing may drift.

Callers join at random with random sampling settings, starve, burst past the input buffer, stop
sending, and hang up mid-call. Through all of it:
- memory stays flat: Python objects, resident memory and (on CUDA) allocated device memory are
  compared between the end of a warm-up and the end of the run;
- the KV pool's books balance every few ticks (page tables, pages held, promises), and once every
  caller has gone every page is back in the pool (`--kv-policy elastic --kv-pages N` makes it tiny,
  so calls are refused and capped on the way);
- every session's output is well formed: frames numbered 0, 1, 2, ... and one end event, last;
- churn never reaches a session's tokens: every tenth caller is a witness with a fixed seed and a
  known input, replayed afterwards beside filler sessions in batches of the sizes it had, which
  must give the same tokens and PCM, to the bit (a product's rounding depends on its row count, so a replay in other
  batch sizes may part ways at a near-tie; see docs/sampling.md).
Exit status 1 when any check fails.

    lockstep bench soak [--model-dir DIR] [--device D] [--max-sessions 8] [--ticks 3000]
                        [--kv-policy elastic --kv-pages 40 --kv-page-size 4 --kv-min-seconds 3.2]

Witnesses last at most 40 frames (3.2 s): under `elastic`, a `--kv-min-seconds` of 3.2 or more
promises each one its whole call, so none is capped, in the churn or in its replay.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench.args import COUNT, NON_NEGATIVE, add_kv_flags, at_least, kv_fields, writable_prefix
from bench.serve import synthetic_speech
from engine.config import EngineConfig, SamplingConfig
from engine.runner import ModelRunner
from engine.serving import EngineLoop
from engine.session import FrameOutput

WITNESS_EVERY = 10


class Caller:
    """One session's output as the soak sees it, checked as it arrives."""

    def __init__(self, name: str, keep_tokens: bool):
        self.name, self.frames, self.ended, self.errors = name, 0, False, []
        self.keep_tokens = keep_tokens
        self.tokens: list[tuple[int, list[int], str]] = []  # (text, audio codes, digest of the PCM)
        self.end_reason: str | None = None

    def sink(self, event: FrameOutput | str) -> None:
        if self.ended:
            self.errors.append(f"{self.name}: {event!r} after its end event")
        elif isinstance(event, str):
            self.ended, self.end_reason = True, event
        else:
            if event.frame != self.frames:
                self.errors.append(f"{self.name}: frame {event.frame} where {self.frames} was due")
            self.frames += 1
            if self.keep_tokens:
                self.tokens.append((event.text_token, event.audio_tokens, digest(event.pcm)))


@dataclass
class Witness:
    """A caller with a known input whose every step is recorded, so that it can be replayed beside
    filler sessions in batches shaped like its own. Batched arithmetic rounds alike only in alike
    batches: a product's row depends on the row count (not on the other rows or its position), and
    on CPU attention over a ring runs over as many entries as the batch's longest history. So each
    step records (batch size, the witness's row, that longest history in each of the three rings),
    and any replayed token that differs is one another session's state reached."""
    frames: np.ndarray  # [F, frame_size]
    sampling: SamplingConfig
    caller: Caller
    layout: list[tuple[int, int, tuple[int, ...]]] = field(default_factory=list)


@contextlib.contextmanager
def recording_histories(runner: ModelRunner, log: list[tuple[int, ...]]):
    """While open, each `runner.step` first appends the batch's longest history in each of
    `runner.rings()` to `log` (the decoder's over the slots decoded into, as `step` picks them)."""
    step = runner.step

    def recording_step(slots: list[int], pcm: torch.Tensor):
        decoded = [s if runner.slots.frames[s] >= runner.max_delay else runner.scratch_slot for s in slots]
        log.append(tuple(int(t.offsets[torch.tensor(idx)].max())
                         for t, idx in zip(runner.rings(), (slots, slots, decoded))))
        return step(slots, pcm)
    runner.step = recording_step
    try:
        yield
    finally:
        del runner.step  # the class's own again


AUDIO_TOP_K, TEXT_TOP_K = (0, 1, 25, 250, 5000), (0, 3, 25, 100)


def random_sampling(rng: random.Random) -> SamplingConfig:
    if rng.random() < 0.2:
        return SamplingConfig(greedy=True, seed=rng.randrange(2**40))
    return SamplingConfig(temperature=rng.choice([0.0, 0.6, 0.8, 1.2]), top_k=rng.choice(AUDIO_TOP_K),
                          text_temperature=rng.choice([0.0, 0.7]), text_top_k=rng.choice(TEXT_TOP_K),
                          seed=rng.randrange(2**40))


def memory(device: torch.device) -> dict[str, float]:
    gc.collect()
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * 4096
    out = {"python_objects": len(gc.get_objects()), "rss_mb": rss / 2**20}
    if device.type == "cuda":
        out["cuda_allocated_mb"] = torch.cuda.memory_allocated(device) / 2**20
    return out


def digest(pcm: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(pcm, np.float32).tobytes(), digest_size=8).hexdigest()


def replay(runner: ModelRunner, w: Witness) -> list[tuple[int, list[int], str]]:
    """The witness's output frames, stepped in slot 0 at each recorded batch shape, beside filler
    sessions (always past the initial delay, so decoded in their own slots) in the other slots."""
    # Only as many fillers as its largest batch: a small elastic pool held no more at once.
    fillers = list(range(1, max(batch for batch, _, _ in w.layout)))
    runner.join(0, w.sampling)
    for slot in fillers:
        runner.join(slot, SamplingConfig(seed=slot))
        runner.slots.frames[slot] = runner.max_delay
    noise = np.random.default_rng(0)
    out = []
    for frame, (batch, row, histories) in zip(w.frames, w.layout):
        slots = fillers[:batch - 1]
        if slots:
            for ring, longest in zip(runner.rings(), histories):
                ring.offsets[slots] = 0
                ring.offsets[slots[0]] = longest
        slots.insert(row, 0)
        pcm = (0.05 * noise.standard_normal((batch, runner.frame_size))).astype(np.float32)
        pcm[row] = frame
        step = runner.step(slots, torch.from_numpy(pcm))
        if step.ready[row]:
            out.append((step.text_tokens[row], step.audio_tokens[row], digest(step.pcm[0].numpy())))
    return out


def misbehave(loop: EngineLoop, chaos: dict, rng: random.Random, tick: int) -> None:
    """One tick of the misbehaving callers (session id -> Session; ended ones are dropped): most
    send a frame, some starve, burst past the buffer, end their input or hang up."""
    fs = loop.runner.frame_size
    for sid, session in list(chaos.items()):
        if session.end_reason is not None:
            chaos.pop(sid)
            continue
        roll = rng.random()
        if roll < 0.01:
            loop.end_session(sid, "client_gone")
        elif roll < 0.02:
            session.end_input()
        elif roll < 0.05:
            session.push(np.zeros(60 * fs, np.float32))  # a burst past the buffer: dropped
        elif roll < 0.85:
            session.push((0.05 * np.random.default_rng(tick).standard_normal(fs)).astype(np.float32))


def soak(runner: ModelRunner, ticks: int, seed: int, join_rate: float, progress: bool = False,
         alone: bool = False) -> dict:
    """The churn run and its checks; with `alone`, the witnesses are also replayed one at a time
    (batches of one) to count how many part ways by rounding (a failure only where the runner is
    batch-invariant, as `verdict` judges)."""
    rng = random.Random(seed)
    loop = EngineLoop(runner, max_buffer_frames=50, max_waiting=0)
    fs = runner.frame_size
    open_callers: list[Caller] = []
    errors: list[str] = []
    witnesses: dict[str, Witness] = {}  # session id -> witness
    chaos: dict[str, object] = {}  # session id -> Session, for callers that misbehave
    created, warm_at, before = 0, max(1, ticks // 5), None
    histories: list[tuple[int, ...]] = []
    kv_peak = {"kv_pages_used": 0, "kv_sessions_capped": 0}
    with recording_histories(runner, histories):
        for tick in tqdm(range(ticks), desc="soak", unit="tick", disable=not progress):
            if tick == warm_at:
                before = memory(runner.device)
            if rng.random() < join_rate:
                witness = created % WITNESS_EVERY == 0
                caller = Caller(f"caller-{created}", keep_tokens=witness)
                sampling = random_sampling(rng)
                session = loop.create_session(sampling, caller.sink, end_on_input_end=witness or rng.random() < 0.5)
                if session is not None:
                    created += 1
                    open_callers.append(caller)
                    if witness:
                        n = rng.randrange(3, 40)
                        pcm = synthetic_speech((n + 1) * fs / 24000, rng.randrange(2**31))[: n * fs]
                        witnesses[session.id] = Witness(pcm.reshape(n, fs), sampling, caller)
                        session.push(pcm)
                        session.end_input()
                    else:
                        chaos[session.id] = session
            misbehave(loop, chaos, rng, tick)
            plan = loop.tick()
            if tick % 10 == 0:
                try:
                    runner.kv.check()
                except AssertionError as e:
                    errors.append(f"KV pool at tick {tick}: {e}")
            for key, value in runner.kv.gauges().items():
                if key in kv_peak:
                    kv_peak[key] = max(kv_peak[key], value)
            for row, (sid, _) in enumerate(plan.step):
                if sid in witnesses:
                    witnesses[sid].layout.append((len(plan.step), row, histories[-1]))
            histories.clear()
            still_open = []
            for c in open_callers:
                errors.extend(c.errors)
                c.errors.clear()
                if not c.ended:
                    still_open.append(c)
            open_callers = still_open
        for sid in list(loop.sessions):
            loop.end_session(sid, "soak_done")
        loop.tick()
    alloc = runner.kv.tables.alloc
    kv = {"kv_pages_total": alloc.num_pages, "kv_pages_peak": kv_peak["kv_pages_used"],
          "kv_capped_peak": kv_peak["kv_sessions_capped"], "kv_pages_left": alloc.used, "kv_promised_left": alloc.owed,
          "sessions_rejected": loop.metrics.counters["sessions_rejected_total"]}
    errors += [e for c in open_callers for e in c.errors] + [f"{c.name}: no end event" for c in open_callers
                                                             if not c.ended]
    # Witnesses cut short by the end of the run are not compared.
    done = [w for w in witnesses.values() if w.caller.end_reason == "input_end"]
    # In batches of the same shapes, tokens and PCM must match to the bit.
    mismatched = [w.caller.name for w in done if replay(runner, w) != w.caller.tokens]
    if alone:
        parted, moved = [], []  # tokens differ; PCM bits differ
        for w in done:
            got = replay(runner, dataclasses.replace(w, layout=[(1, 0, ())] * len(w.frames)))
            if [x[:2] for x in got] != [x[:2] for x in w.caller.tokens]:
                parted.append(w.caller.name)
            if got != w.caller.tokens:
                moved.append(w.caller.name)
    m = loop.metrics.counters
    result = {"ticks": ticks, "sessions": created, "witnesses": len(done), "witness_mismatches": mismatched, **kv,
              "errors": errors, "underruns": m["input_underruns_total"],
              "dropped_samples": m["input_dropped_samples_total"], "sessions_finished": m["sessions_finished_total"]}
    if alone:
        result["witnesses_parted_alone"], result["witnesses_pcm_moved_alone"] = parted, moved
    result["batch_invariant"] = runner.batch_invariant
    del witnesses, done, open_callers, chaos
    after = memory(runner.device)
    return {**result, "memory_before": before or after, "memory_after": after}


def verdict(result: dict, max_object_growth: int, max_rss_growth_mb: float) -> list[str]:
    """What failed, in words (empty when the run passed)."""
    b, a = result["memory_before"], result["memory_after"]
    failed = list(result["errors"][:10])
    if result["witness_mismatches"]:
        failed.append(f"witness sessions whose output changed under churn: {result['witness_mismatches']}")
    if a["python_objects"] - b["python_objects"] > max_object_growth:
        failed.append(f"Python objects grew by {a['python_objects'] - b['python_objects']}")
    if a["rss_mb"] - b["rss_mb"] > max_rss_growth_mb:
        failed.append(f"resident memory grew by {a['rss_mb'] - b['rss_mb']:.0f} MB")
    if a.get("cuda_allocated_mb", 0) > b.get("cuda_allocated_mb", 0) + 1:
        failed.append(f"CUDA memory grew by {a['cuda_allocated_mb'] - b['cuda_allocated_mb']:.0f} MB")
    if result.get("batch_invariant") and result.get("witnesses_pcm_moved_alone"):
        failed.append(f"with --batch-invariant, witnesses whose output differed alone: "
                      f"{result['witnesses_pcm_moved_alone']}")
    if result.get("kv_pages_left") or result.get("kv_promised_left"):
        failed.append(f"KV pages not back in the pool once every caller left: {result['kv_pages_left']} held, "
                      f"{result['kv_promised_left']} promised")
    if result["sessions_finished"] != result["sessions"]:
        failed.append(f"{result['sessions']} sessions created, {result['sessions_finished']} finished")
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lockstep bench soak", description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--max-sessions", type=COUNT, default=8)
    ap.add_argument("--ticks", type=COUNT, default=3000)
    ap.add_argument("--join-rate", type=at_least(0.0, float, 1.0), default=0.3, help="chance per tick that a caller arrives")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-object-growth", type=NON_NEGATIVE, default=500)
    ap.add_argument("--max-rss-growth-mb", type=at_least(0.0, float), default=64.0)
    ap.add_argument("--replay-alone", action="store_true",
                    help="also replay each witness in batches of one and report how many part ways by rounding")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="run the engine batch-invariant; the alone replays must then match too")
    add_kv_flags(ap)
    ap.add_argument("--output", type=writable_prefix, default="bench/out/soak.json")
    args = ap.parse_args(argv)
    from engine.cli import with_builtin_weights
    cfg = EngineConfig(model_dir=args.model_dir, device=args.device, max_sessions=args.max_sessions,
                       kernels=args.kernels, batch_invariant=args.batch_invariant, **kv_fields(args)).validate()
    runner = ModelRunner.load(with_builtin_weights(cfg))
    # Every graph the churn can meet (each bucket at each pair of top-k bounds) is made before the
    # memory baseline, as `serve` makes the default ones before it admits anyone.
    for bounds in {(a, t) for a in AUDIO_TOP_K for t in TEXT_TOP_K}:
        runner.warm_up(bounds)
    result = soak(runner, args.ticks, args.seed, args.join_rate, progress=True,
                  alone=args.replay_alone or args.batch_invariant)
    failed = verdict(result, args.max_object_growth, args.max_rss_growth_mb)
    b, a = result["memory_before"], result["memory_after"]
    print(f"{result['ticks']} ticks, {result['sessions']} sessions ({result['witnesses']} witnesses replayed in "
          "batches of their shapes), "
          f"{result['underruns']} underruns, {result['dropped_samples']} samples dropped")
    print(f"  KV pool ({args.kv_policy}): {result['kv_pages_total']} pages, at most {result['kv_pages_peak']} used and "
          f"{result['kv_capped_peak']} session(s) capped at once, {result['sessions_rejected']} caller(s) refused; "
          f"{result['kv_pages_left']} pages held and {result['kv_promised_left']} promised once all had left")
    if "witnesses_parted_alone" in result:
        print(f"  replayed alone instead: {len(result['witnesses_parted_alone'])} of {result['witnesses']} witnesses "
              f"parted ways, {len(result['witnesses_pcm_moved_alone'])} had PCM bits move "
              + ("(with --batch-invariant, a failure)" if result["batch_invariant"]
                 else "(batch-shape rounding, not a failure)"))
    for key in a:
        print(f"  {key}: {b[key]:.0f} after warm-up -> {a[key]:.0f} at the end")
    print("soak passed" if not failed else "soak FAILED:\n  " + "\n  ".join(failed))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "failed": failed}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    import sys

    from engine.cli import main as lockstep_main  # its error handling: a bad flag is one line, no traceback
    lockstep_main(["bench", "soak", *sys.argv[1:]])
