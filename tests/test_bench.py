"""The benchmarks run end to end on a tiny checkpoint (their numbers are not checked here)."""
import json

import pytest

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
    assert "largest B with p99 tick" in capsys.readouterr().out


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
          "--", "--model-dir", str(tiny_wrap_ckpt)])
    row = json.loads((tmp_path / "s.json").read_text())["rows"][0]
    assert row["callers"] == 2 and row["failed"] == 0 and row["first_audio_ms"]["p50"] >= 80
