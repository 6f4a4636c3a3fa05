"""The soak benchmark: churn passes on a sound engine and catches a slot that leaks state."""
import json

from bench import soak
from engine.config import EngineConfig
from engine.runner import ModelRunner


def runner_for(ckpt, sessions=4):
    return ModelRunner.load(EngineConfig(device="cpu", model_dir=str(ckpt), max_sessions=sessions))


def test_soak_passes_on_the_engine(tiny_wrap_ckpt, tmp_path, capsys):
    out = tmp_path / "soak.json"
    assert soak.main(["--device", "cpu", "--model-dir", str(tiny_wrap_ckpt), "--max-sessions", "4", "--ticks", "300",
                      "--join-rate", "0.5", "--replay-alone", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["failed"] == [] and doc["witness_mismatches"] == [] and doc["errors"] == []
    # Enough churn: the count moves with the run's random path (~20 here), which any change to when
    # sessions end shifts.
    assert doc["witnesses"] >= 2 and doc["sessions_finished"] == doc["sessions"] >= 15
    assert doc["underruns"] > 0 and doc["dropped_samples"] > 0  # the misbehaving callers did misbehave
    assert isinstance(doc["witnesses_parted_alone"], list)  # reported, whatever it holds
    assert doc["witnesses_pcm_moved_alone"]  # without --batch-invariant the last bits do move
    assert "soak passed" in capsys.readouterr().out


def test_soak_catches_a_slot_that_keeps_its_last_callers_state(tiny_wrap_ckpt):
    runner = runner_for(tiny_wrap_ckpt)
    runner.mimi.reset = lambda slots: None  # joining no longer clears the codec's streaming state
    result = soak.soak(runner, 200, seed=0, join_rate=0.5)
    assert result["witness_mismatches"]
    assert any("output changed under churn" in line for line in soak.verdict(result, 500, 64.0))


def test_verdict_names_each_failure():
    mem = {"python_objects": 1000, "rss_mb": 100.0}
    result = {"errors": ["caller-3: frame 2 where 1 was due"], "witness_mismatches": [], "sessions": 5,
              "sessions_finished": 4, "memory_before": mem,
              "memory_after": {"python_objects": 3000, "rss_mb": 300.0}}
    failed = soak.verdict(result, 500, 64.0)
    assert failed == ["caller-3: frame 2 where 1 was due", "Python objects grew by 2000",
                      "resident memory grew by 200 MB", "5 sessions created, 4 finished"]
    ok = {**result, "errors": [], "sessions_finished": 5, "memory_after": mem}
    assert soak.verdict(ok, 500, 64.0) == []


def test_batch_invariant_soak_replays_witnesses_alone_to_the_bit(tiny_wrap_ckpt, tmp_path):
    out = tmp_path / "soak.json"
    assert soak.main(["--device", "cpu", "--model-dir", str(tiny_wrap_ckpt), "--max-sessions", "4", "--ticks", "250",
                      "--join-rate", "0.5", "--batch-invariant", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["batch_invariant"] and doc["witnesses"] >= 2
    assert doc["witnesses_parted_alone"] == doc["witnesses_pcm_moved_alone"] == []
    failing = {**doc, "witnesses_pcm_moved_alone": ["caller-0"]}
    assert any("differed alone" in line for line in soak.verdict(failing, 10**9, 10**9))


def test_soak_with_a_tiny_elastic_pool_refuses_caps_and_leaks_no_page(tmp_path_factory, tmp_path, capsys):
    """An LM context of 80 frames in pages of 4, each call promised 3.2 s (11 pages: every witness
    whole), 30 pages for 4 slots: callers are refused for pages, long calls capped, witnesses intact,
    and every page back once all have gone."""
    from engine.make_checkpoint import make_checkpoint
    ckpt = make_checkpoint(tmp_path_factory.mktemp("ctx80"), "tiny", seed=1, context=80, mimi_context=5)
    out = tmp_path / "soak.json"
    assert soak.main(["--device", "cpu", "--model-dir", str(ckpt), "--max-sessions", "4", "--ticks", "300",
                      "--join-rate", "0.5", "--kv-policy", "elastic", "--kv-pages", "30", "--kv-page-size", "4",
                      "--kv-min-seconds", "3.2", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["failed"] == [] and doc["witness_mismatches"] == [] and doc["witnesses"] >= 2
    assert doc["kv_pages_total"] == 30 and doc["kv_pages_left"] == doc["kv_promised_left"] == 0
    assert doc["sessions_rejected"] > 0 and doc["kv_capped_peak"] > 0 and doc["kv_pages_peak"] > 22
    assert "KV pool (elastic): 30 pages" in capsys.readouterr().out
    failing = {**doc, "kv_pages_left": 3}
    assert any("KV pages not back in the pool" in line for line in soak.verdict(failing, 10**9, 10**9))
