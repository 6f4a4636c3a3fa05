"""`lockstep bench fidelity` on a tiny checkpoint: the tool itself (float32 agrees with the oracle, the
reference driver is kyutai's LMGen), bf16 reported within the reference's noise, and a broken bf16
path caught by the ratio."""
import dataclasses
import json
import os
import re

import pytest
import torch

pytest.importorskip("moshi")
from reference import reference_generate  # noqa: E402

from engine.audio import frames, read_audio  # noqa: E402

SUMMARY = re.compile(r"^(\w+): lockstep/reference deviation ratio ([\d.e+-]+) \(top-1 agreement ([\d.]+)% vs ([\d.]+)%\)$")


def run_bench(args, tmp_path, capsys) -> tuple[int, dict, re.Match]:
    from bench.fidelity import main
    out = tmp_path / "fidelity.json"
    status = main([*args, "--json", str(out)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = SUMMARY.match(last)
    assert match, last
    return status, json.loads(out.read_text()), match


def test_the_greedy_reference_driver_is_kyutai_lmgen(tiny_wrap_ckpt, wav_inputs):
    """Choosing greedily at every stream, the driver the oracle runs on gives LMGen's tokens."""
    from bench.fidelity_reference import ReferenceStepper, load_reference
    pcm = frames(read_audio(wav_inputs[0]))[:14]
    want = reference_generate(tiny_wrap_ckpt, pcm)
    mimi, lm = load_reference(tiny_wrap_ckpt, torch.float32, "cpu")
    with torch.no_grad(), mimi.streaming(1), ReferenceStepper(lm, 1) as stepper:
        chosen = [stepper.step(mimi.encode(torch.from_numpy(f).view(1, 1, -1))[:, :, 0]).top1[0] for f in pcm]
    delays, D = lm.delays, max(lm.delays)
    # Output frame j holds stream k's token generated at step j + delay[k].
    got = [[int(chosen[j + delays[k]][k]) for k in range(lm.dep_q + 1)] for j in range(len(pcm) - D)]
    assert [g[0] for g in got] == want["text_tokens"]
    assert [g[1:] for g in got] == want["audio_tokens"]


def test_float32_agrees_with_the_oracle(tiny_wrap_ckpt, wav_inputs, tmp_path, capsys):
    status, doc, summary = run_bench(["--model-dir", str(tiny_wrap_ckpt), "--dtype", "float32", "--frames", "12",
                                      str(wav_inputs[0]), str(wav_inputs[3])], tmp_path, capsys)
    assert status == 0 and doc["goal"]["met"]
    ref, mine = doc["reference"]["all"], doc["lockstep"]["all"]
    assert ref["top1_agreement"] == 1.0 and ref["kl_mean"] == 0.0 and ref["max_abs_logit_diff"] == 0.0
    assert mine["top1_agreement"] == 1.0 and mine["kl_mean"] < 1e-9 and mine["max_abs_logit_diff"] < 1e-3
    # 2 inputs x 12 frames, less the initial delay: 22 tokens per stream, text and 8 codebooks.
    assert ref["tokens"] == mine["tokens"] == 22 * 9 and doc["reference"]["audio 8"]["tokens"] == 22
    assert doc["mimi_codes"]["all"] == 1.0 and doc["meta"]["frames"] == 24
    assert summary.groups() == ("float32", "1", "100.0", "100.0") and doc["ratio"] == 1.0


def test_bfloat16_reports_and_stays_within_the_reference_noise(tiny_wrap_ckpt, wav_inputs, tmp_path, capsys):
    status, doc, summary = run_bench(["--model-dir", str(tiny_wrap_ckpt), "--frames", "12",
                                      str(wav_inputs[0]), str(wav_inputs[2])], tmp_path, capsys)
    assert summary.group(1) == "bfloat16" and doc["meta"]["dtype"] == "bfloat16"
    names = ["text"] + [f"audio {k}" for k in range(1, 9)] + ["all"]
    for run in ("reference", "lockstep"):
        assert list(doc[run]) == names
        assert all(s["kl_mean"] > 0 and s["kl_p99"] >= s["kl_mean"] and s["max_abs_logit_diff"] > 0
                   for s in doc[run].values())
    assert float(summary.group(2)) == pytest.approx(doc["ratio"], rel=1e-2)
    assert sum(doc["paired_top1"].values()) == doc["lockstep"]["all"]["tokens"]
    # lockstep's torch path computes in bf16 what the reference computes in bf16.
    assert status == 0 and doc["ratio"] <= 1.1


def test_a_norm_forced_to_bfloat16_is_caught(tiny_wrap_ckpt, wav_inputs, tmp_path, capsys, monkeypatch):
    """The LM's norms are rms_norm_f32 (kyutai computes them in float32 whatever the dtype): computed
    in bf16 instead, lockstep drifts past the reference's own bf16 deviation."""
    import kernels.norm as norm
    plain = norm._norm_torch
    monkeypatch.setattr(norm, "_norm_torch", lambda x, p: plain(x, dataclasses.replace(p, f32=False)))
    status, doc, summary = run_bench(["--model-dir", str(tiny_wrap_ckpt), "--frames", "12",
                                      str(wav_inputs[0]), str(wav_inputs[2])], tmp_path, capsys)
    assert status == 1 and not doc["goal"]["met"] and doc["ratio"] > 1.1


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")
def test_triton_kernels_in_float32_agree_with_the_oracle(tiny_wrap_ckpt, wav_inputs, tmp_path, capsys):
    status, doc, summary = run_bench(["--model-dir", str(tiny_wrap_ckpt), "--dtype", "float32", "--kernels", "triton",
                                      "--frames", "4", str(wav_inputs[3])], tmp_path, capsys)
    assert doc["meta"]["kernels"] == "triton" and doc["lockstep"]["all"]["tokens"] == 3 * 9
    assert status == 0 and doc["lockstep"]["all"]["top1_agreement"] == 1.0 and doc["mimi_codes"]["all"] == 1.0


def test_the_graphed_step_reads_and_writes_its_static_buffers(tiny_wrap_ckpt, wav_inputs, monkeypatch):
    """The CUDA-graph plumbing, replayed eagerly: captured on the scratch slot, then stepping slot 0
    from the static inputs into the probe's buffers, exactly as the eager step does."""
    import bench.fidelity_lockstep as fl
    from engine.config import EngineConfig
    from engine.runner import ModelRunner

    def eager_capture(fn, pool=None):
        for _ in range(3):  # the two warm-up runs and the captured one
            out = fn()
        return fn, out

    monkeypatch.setattr(fl, "capture", eager_capture)
    runner = ModelRunner.load(EngineConfig(model_dir=str(tiny_wrap_ckpt), device="cpu", max_sessions=1))
    pcm = torch.from_numpy(frames(read_audio(wav_inputs[3]))[:5])
    results = []
    for graphed in (False, True):
        stepper = fl.LockstepStepper(runner, graphed=graphed)
        assert (stepper.replay is not None) == graphed and int(stepper.slot) == 0
        stepper.start()
        forced = torch.tensor([[7, 1, 2, 3, 4, 5, 6, 7, 8]])
        results.append([stepper.step(stepper.encode(f)[None, :8], forced + t) for t, f in enumerate(pcm)])
    for eager, graphed in zip(*results):
        assert torch.equal(eager.text, graphed.text) and torch.equal(eager.audio, graphed.audio)
        assert torch.equal(eager.top1, graphed.top1)


def test_an_unreadable_input_is_named_before_loading(tmp_path, capsys):
    from engine.cli import main
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "fidelity", "--model-dir", str(tmp_path / "nowhere"), str(bad)])
    assert exc.value.code == 2 and "broken.wav" in capsys.readouterr().err


def test_a_run_cut_short_reports_the_frames_stepped(tiny_wrap_ckpt, wav_inputs, tmp_path, capsys, monkeypatch):
    """A time limit (SIGINT) in the second input: the first input's figures are written and printed."""
    import bench.fidelity as fidelity
    whole = fidelity.run_input
    calls = []

    def limited(pcm, *args):
        calls.append(len(pcm))
        if len(calls) == 2:
            raise KeyboardInterrupt
        whole(pcm, *args)

    monkeypatch.setattr(fidelity, "run_input", limited)
    status, doc, summary = run_bench(["--model-dir", str(tiny_wrap_ckpt), "--dtype", "float32", "--frames", "6",
                                      str(wav_inputs[3]), str(wav_inputs[0])], tmp_path, capsys)
    assert status == 130 and doc["meta"]["cut_short"] and doc["meta"]["frames"] == 6
    assert doc["lockstep"]["all"]["tokens"] == 5 * 9 and summary.group(1) == "float32"


def test_a_background_run_still_answers_a_time_limit(tmp_path, monkeypatch):
    """A shell starts its background jobs with SIGINT ignored: the tool takes SIGINT back for the run
    (a time limit's SIGINT must reach it as KeyboardInterrupt) and gives the old handler back after."""
    import signal

    import bench.fidelity as fidelity
    seen = []
    monkeypatch.setattr(fidelity, "run", lambda args: seen.append(signal.getsignal(signal.SIGINT)) or 0)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert fidelity.main([str(tmp_path / "in.wav")]) == 0
        assert seen == [signal.default_int_handler] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
