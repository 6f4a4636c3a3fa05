"""The benchmarks run end to end on a tiny checkpoint (their numbers are not checked here)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("moshi")


def test_tick_sweep_writes_results(tiny_wrap_ckpt, tmp_path, capsys):
    from bench.tick import main
    main(["--model-dir", str(tiny_wrap_ckpt), "--batch", "1", "3", "--warmup", "1", "--ticks", "3",
          "--output", str(tmp_path / "tick"), "--bandwidth-gbs", "10"])
    doc = json.loads((tmp_path / "tick.json").read_text())
    assert [r["batch"] for r in doc["rows"]] == [1, 3]
    row = doc["rows"][-1]
    assert row["engine"]["n"] == 3 and row["reference"]["n"] == 3 and row["floor_ms"] > 0
    assert set(row["engine"]["stages_ms"]) == {"mimi_encode", "lm_temporal", "lm_depth", "mimi_decode"}
    assert set(row["reference"]["stages_ms"]) == {"mimi_encode", "lm", "mimi_decode"}
    assert "largest B with p99 tick" in capsys.readouterr().out


def test_tick_sweep_measures_the_batch_invariant_mode_when_asked(tiny_wrap_ckpt, tmp_path, capsys):
    from bench.tick import main
    main(["--model-dir", str(tiny_wrap_ckpt), "--batch", "1", "2", "--warmup", "1", "--ticks", "2", "--no-reference",
          "--batch-invariant", "--output", str(tmp_path / "tick"), "--bandwidth-gbs", "10"])
    doc = json.loads((tmp_path / "tick.json").read_text())
    assert doc["meta"]["batch_invariant"] is True and [r["batch"] for r in doc["rows"]] == [1, 2]
    assert "batch-invariant" in capsys.readouterr().out


def test_tick_sweep_cut_short_keeps_the_rows_measured(tiny_wrap_ckpt, tmp_path, monkeypatch):
    """A sweep stopped by a time limit (as on a lent GPU) leaves every finished row in its JSON."""
    import bench.tick as tick
    measure = tick.measure

    def limited(runner, ref, batch, *args):
        if batch == 3:
            raise KeyboardInterrupt
        return measure(runner, ref, batch, *args)

    monkeypatch.setattr(tick, "measure", limited)
    with pytest.raises(KeyboardInterrupt):
        tick.main(["--model-dir", str(tiny_wrap_ckpt), "--batch", "2", "3", "--warmup", "1", "--ticks", "2",
                   "--no-reference", "--output", str(tmp_path / "tick"), "--bandwidth-gbs", "10"])
    doc = json.loads((tmp_path / "tick.json").read_text())
    assert [r["batch"] for r in doc["rows"]] == [2] and doc["meta"]["device"].startswith("cpu")


def test_serving_benchmark_against_a_spawned_server(tiny_wrap_ckpt, tmp_path, capsys):
    from bench.serve import main
    main(["--spawn", "--callers", "2", "--seconds", "0.6", "--rate", "20", "--output", str(tmp_path / "s.json"),
          "--", "--device", "cpu", "--model-dir", str(tiny_wrap_ckpt)])
    row = json.loads((tmp_path / "s.json").read_text())["rows"][0]
    assert row["callers"] == 2 and row["failed"] == 0 and row["first_audio_ms"]["p50"] >= 80
    assert row["probe_realtime_sessions"] in (0, 1, 2)  # the spawned server's start-up probe
    assert "the server's start-up probe: real time with up to" in capsys.readouterr().out


def test_serving_benchmark_beside_a_baseline_pools_its_rounds(tiny_wrap_ckpt, tmp_path, capsys):
    """--baseline runs each count on both servers in turn (here the same one by two names), --rounds
    times, and says what the first adds to the second."""
    from bench.serve import main, spawn_server
    proc, url = spawn_server(["--device", "cpu", "--model-dir", str(tiny_wrap_ckpt), "--no-warmup"])
    try:
        base = url.replace("127.0.0.1", "localhost")
        main(["--url", url, "--baseline", base, "--rounds", "2", "--callers", "2", "--seconds", "0.4", "--rate", "20",
              "--output", str(tmp_path / "s.json")])
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    doc = json.loads((tmp_path / "s.json").read_text())
    for row in doc["rows"] + doc["baseline_rows"]:
        assert row["runs"] == 2 and row["failed"] == 0 and row["first_audio_ms"]["p50"] >= 80
    assert doc["baseline"] == base and "adds p99 first audio" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's plumbing where no GPU is present")
def test_gpu_checks_script_gets_every_stage_to_the_gpu(tmp_path):
    """bench/gpu_checks.sh as a lent GPU would run it, here without one: its pytest stage runs (the
    CUDA tests skip), and every benchmark command gets past its flags to the missing GPU, so a rare,
    short GPU lease is not lost to a renamed test file or a stale flag."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path), PY=sys.executable)
    proc = subprocess.run(["bash", "bench/gpu_checks.sh"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    log = (tmp_path / "log.txt").read_text()
    summary = [line for line in log.splitlines() if " passed" in line or " skipped" in line]
    assert summary and "failed" not in summary[-1] and "error" not in summary[-1], log
    assert "bench.kernels needs a CUDA device" in log
    script = (root / "bench/gpu_checks.sh").read_text()
    # The benchmarks that need one, in the default stages (the KV stage's tick is not one of them).
    on_gpu = script.count("-m bench.tick") - 1 + script.count("-m bench.fidelity ")
    assert log.count("sees no CUDA device here") == on_gpu, log
    assert "unrecognized arguments" not in log and "Traceback" not in log, log
    assert "speech-2.wav" in log  # the fidelity stage made its inputs
    assert proc.returncode == 1  # the tick and fidelity stages, which need the GPU
    soak = subprocess.run(["bash", "bench/gpu_checks.sh", "soak", "kv"], cwd=root,
                          env={**env, "TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    log = (tmp_path / "log.txt").read_text()
    assert "wrote tiny checkpoint" in log
    # Then the soak's ticks, the KV stage's tick and its soak: each to the missing GPU.
    assert log.count("sees no CUDA device here") == on_gpu + 3, log
    assert "Traceback" not in log and soak.returncode == 1, log


def test_gpu_checks_script_keeps_within_its_deadline(tmp_path):
    """Step limits shrink to what is left of DEADLINE (the device tool stops a command at 600 s),
    and a step with no time left is skipped and counted as a failure, not started."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path), PY=sys.executable, DEADLINE="5")
    proc = subprocess.run(["bash", "bench/gpu_checks.sh", "kernels", "tick"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60)
    log = (tmp_path / "log.txt").read_text()
    assert "SKIPPED (no time left):" in log and "bench.kernels" in log and proc.returncode == 1, log
    assert "Traceback" not in log


def test_random_models_are_made_in_the_benchmark_dtype():
    from bench.tick import random_models
    from engine.make_checkpoint import PRESETS
    from engine.runner import ModelRunner
    lm_cfg, mimi_cfg = PRESETS["tiny"]
    lm, mimi = random_models(lm_cfg, mimi_cfg, "cpu", torch.bfloat16)
    weights = list(lm.parameters())
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in weights)
    flat = torch.cat([p.float().flatten() for p in weights])
    assert torch.isfinite(flat).all() and 0.015 < flat.std() < 0.025
    assert all(p.dtype == torch.float32 for p in mimi.parameters())
    runner = ModelRunner(lm, mimi, None, max_sessions=2, kernels="torch")
    idx = torch.tensor([0, 1])
    tokens, audio = runner.forward(idx, idx, torch.zeros(2, runner.frame_size), 250, 25)
    assert tokens.shape == (2, 1 + lm_cfg.dep_q) and torch.isfinite(audio).all()


def test_random_models_that_would_not_fit_are_refused_before_allocation(monkeypatch):
    from bench.tick import random_models
    from engine import capacity
    from engine.config import ConfigError, LMConfig, MimiConfig
    monkeypatch.setattr(capacity, "free_bytes", lambda device: 24 << 30)  # a 24 GB machine
    with pytest.raises(ConfigError, match=r"the LM 30\.8 GB in float32.* use --dtype bfloat16"):
        random_models(LMConfig(), MimiConfig(), "cpu", torch.float32)


def test_kernel_benchmark_runs_every_case_on_cpu(tmp_path, monkeypatch, capsys):
    """bench.kernels end to end under Triton's interpreter at shrunken shapes (fp16 for the LM's,
    as the interpreter mishandles bf16 products): every family, both backends, the JSON."""
    import bench.kernels as bk
    from kernels.dispatch import interpreter_problem
    if os.environ.get("TRITON_INTERPRET") != "1" or interpreter_problem():
        pytest.skip("needs Triton's interpreter")
    for name, value in dict(LM_HEADS=2, LM_CONTEXT=40, DEPTH_HEADS=2, MIMI_HEADS=2, MIMI_CONTEXT=24,
                            RVQ_DIM=32, RVQ_BINS=64, LM_DIM=256, LM_HIDDEN=384, LM_DTYPE=torch.float16).items():
        monkeypatch.setattr(bk, name, value)
    monkeypatch.setattr(bk, "CONVS", [("enc-down", 8, 16, 8, 4, 1, 64, False), ("dec-up", 16, 8, 8, 4, 1, 16, True),
                                      ("mimi-up", 16, 16, 4, 2, 16, 1, True)])
    out = tmp_path / "kernels.json"
    assert bk.main(["--device", "cpu", "--batch", "1", "3", "--warmup", "0", "--iters", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert {r["family"] for r in rows} == set(bk.FAMILIES) and doc["peak_gbps"] > 0
    for family in bk.FAMILIES:  # each case has both backends at both batch sizes
        cases = {(r["case"], r["batch"], r["backend"]) for r in rows if r["family"] == family}
        assert cases == {(c, b, be) for c, b, _ in cases for be in ("torch", "triton")}
        assert {b for _, b, _ in cases} == {1, 3}
    assert all(r["ms"] > 0 and r["bytes"] > 0 for r in rows)
    assert "under Triton's interpreter" in capsys.readouterr().out


def test_kernel_benchmark_on_cuda_gives_torch_an_indexed_device(monkeypatch):
    """`--device cuda` (the GPU check's) reaches torch.cuda.set_device as `cuda:N`: torch refuses one
    without an index before touching the GPU, which the CPU path never reaches."""
    import bench.kernels as bk

    class Reached(Exception):
        pass

    chosen = []

    def set_device(index):
        chosen.append(index)
        raise Reached

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", set_device, raising=False)
    with pytest.raises(Reached):  # torch's own set_device got as far as the driver call
        bk.main(["--device", "cuda"])
    assert chosen == [0]


def test_cpu_kernels_benchmark_checks_and_reports_every_route(tmp_path, capsys):
    from bench.cpu_kernels import main
    from kernels import gemm_cpu
    assert main(["--rows", "1", "13", "--shapes", "96x40", "--megabytes", "0.1", "--repeats", "1",
                 "--sessions", "2", "--json", str(tmp_path / "k.json")]) == 0
    doc = json.loads((tmp_path / "k.json").read_text())
    built = gemm_cpu.library() is not None
    assert [r["rows"] for r in doc["gemm"]] == [1, 13]
    assert all(r["mkl"] > 0 and ("lockstep" in r) == built for r in doc["gemm"])
    assert [r["sessions"] for r in doc["elu"]] == [2] * 4
    assert all(r["torch"] > 0 and ("lockstep" in r) == built for r in doc["elu"])
    assert [(r["stack"], r["sessions"]) for r in doc["stack"]] == [
        ("mimi", 2), ("small temporal", 2), ("small depth", 2)]
    assert all(r["torch"] > 0 and ("lockstep" in r) == built for r in doc["stack"])
    out = capsys.readouterr().out
    assert "weight GB/s" in out and "ELU, us a call" in out and "transformer steps, ms a step" in out


def test_kernel_benchmark_cut_short_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """A time limit (SIGINT) in the middle of a family: the JSON holds every row timed before it."""
    import bench.kernels as bk
    calls = []

    def fake_ms(self, fn, warmup=None, iters=None, flush=True):
        calls.append(fn)
        if len(calls) == 6:  # three for the peak copy, torch and triton of the first norm case, then...
            raise KeyboardInterrupt
        return 1.0

    monkeypatch.setattr(bk.Clock, "ms", fake_ms)
    monkeypatch.setattr(bk, "LM_DIM", 64)
    monkeypatch.setattr(bk, "LM_HIDDEN", 96)
    out = tmp_path / "kernels.json"
    assert bk.main(["--device", "cpu", "--only", "norm", "--batch", "1", "--json", str(out)]) == 130
    rows = json.loads(out.read_text())["rows"]
    assert [(r["case"], r["backend"]) for r in rows] == [("rms4096", "torch"), ("rms4096", "triton")]


def test_the_floor_reads_each_weight_once_but_only_the_looked_up_rows_of_a_table(tiny_lm_ckpt):
    from torch import nn

    from bench.report import tick_bytes
    from engine.config import EngineConfig
    from engine.runner import ModelRunner
    runner = ModelRunner.load(EngineConfig(model_dir=str(tiny_lm_ckpt), device="cpu", max_sessions=2))
    tables = [m for m in runner.lm.modules() if isinstance(m, nn.Embedding)]
    mimi = (runner.mimi.encoder_transformer.transformer, runner.mimi.decoder_transformer.transformer)
    per_slot = (sum(m.embedding_dim * m.weight.element_size() for m in tables)
                + sum(t.kv_bytes(1) for t in (runner.lm.transformer, *mimi)))
    assert tick_bytes(runner, 2, False) - tick_bytes(runner, 1, False) == per_slot
    weights = sum(p.numel() * p.element_size() for m in (runner.lm, runner.mimi) for p in m.parameters())
    table_bytes = sum(m.weight.numel() * m.weight.element_size() for m in tables)
    codebooks = 8 * 2048 * 258 * 4  # the 8 codebooks in use, scored in full by the encoder
    assert tick_bytes(runner, 1, False) == weights - table_bytes + per_slot + codebooks


@pytest.mark.parametrize("which, argv", [("tick", ["--batch", "0"]), ("tick", ["--ticks", "-3"]),
                                         ("tick", ["--warmup", "-1"]), ("tick", ["--bandwidth-gbs", "nan"]),
                                         ("kernels", ["--iters", "0"]), ("serve", ["--rate", "0"]),
                                         ("soak", ["--join-rate", "2"]), ("cpu_kernels", ["--rows", "0"]),
                                         ("cpu_kernels", ["--shapes", "0x5"]), ("cpu_kernels", ["--megabytes", "1e12"]),
                                         ("cpu_kernels", ["--history", str(10**12)]),
                                         ("serve", ["--seconds", "1e12"]), ("tick", ["--output", "/proc/nope/x"]),
                                         ("fidelity", ["--frames", "0"]), ("fidelity", ["--max-top1-drop", "-1"]),
                                         ("fidelity_inputs", ["--count", "0"])])
def test_benchmark_counts_out_of_range_are_refused_by_name(which, argv, capsys):
    import importlib
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(f"bench.{which}").main(argv)
    assert exc.value.code == 2 and f"argument {argv[0]}: " in capsys.readouterr().err
