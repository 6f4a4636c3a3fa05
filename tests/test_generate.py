"""End to end: `lockstep generate` against the reference package, batching and seeding invariance."""
import json

import numpy as np
import pytest
import torch

from engine.audio import frames, read_audio
from engine.cli import main
from engine.config import EngineConfig, SamplingConfig
from engine.generate import run_sessions
from engine.runner import ModelRunner

pytest.importorskip("moshi")
from reference import reference_generate  # noqa: E402


def load_inputs(paths):
    return {p.stem: frames(read_audio(p)) for p in paths}


@pytest.mark.parametrize("ckpt, flags", [("tiny_wrap_ckpt", []), ("tiny_lm_ckpt", []),
                                         ("tiny_wrap_ckpt", ["--batch-invariant"])])
def test_generate_matches_reference_with_continuous_batching(ckpt, flags, request, wav_inputs, tmp_path):
    model_dir = request.getfixturevalue(ckpt)
    out = tmp_path / "out"
    # 4 inputs through 2 slots: later inputs join as earlier ones finish.
    main(["generate", "--device", "cpu", "--model-dir", str(model_dir), "--max-sessions", "2", "--greedy",
          *flags, "--output-dir", str(out), *map(str, wav_inputs)])
    for path in wav_inputs:
        got = json.loads((out / f"{path.stem}.json").read_text())
        want = reference_generate(model_dir, frames(read_audio(path)))
        assert len(got["text_tokens"]) == len(frames(read_audio(path))) - 1
        assert got["text_tokens"] == want["text_tokens"], path.stem
        assert got["audio_tokens"] == want["audio_tokens"], path.stem
        wav = read_audio(out / f"{path.stem}.wav")
        ref_pcm = np.clip(want["pcm"].numpy(), -1, 1)
        assert wav.shape == ref_pcm.shape
        assert np.abs(wav - ref_pcm).max() < 3 / 32768


def test_mimi_pcm_matches_reference_closely(tiny_wrap_ckpt, wav_inputs):
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=3))
    inputs = load_inputs(wav_inputs[:3])
    res = run_sessions(runner, inputs, {k: SamplingConfig(greedy=True) for k in inputs})
    for name, fr in inputs.items():
        want = reference_generate(tiny_wrap_ckpt, fr)
        got = torch.from_numpy(np.concatenate(res[name].pcm))
        torch.testing.assert_close(got, want["pcm"], rtol=1e-4, atol=1e-4 * float(want["pcm"].abs().max()))


def test_seeded_sampling_is_batch_invariant(tiny_wrap_ckpt, wav_inputs):
    # Exact here: this checkpoint's logits meet no near-tie that batch-shape rounding could tip
    # (docs/sampling.md); `bench.soak` checks the general case in batches of the same shapes.
    inputs = load_inputs(wav_inputs)
    sampling = {k: SamplingConfig(seed=1234 + i, top_k=5, text_top_k=3) for i, k in enumerate(inputs)}
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=4))
    together = run_sessions(runner, inputs, sampling)
    for name in inputs:
        alone = run_sessions(runner, {name: inputs[name]}, {name: sampling[name]})[name]
        assert alone.text_tokens == together[name].text_tokens
        assert alone.audio_tokens == together[name].audio_tokens
    # Different seeds really sample differently (the test would be vacuous otherwise).
    other = run_sessions(runner, {"alpha": inputs["alpha"]}, {"alpha": SamplingConfig(seed=99, top_k=5)})
    assert other["alpha"].audio_tokens != together["alpha"].audio_tokens


def test_unreadable_input_does_not_stop_others(tiny_wrap_ckpt, wav_inputs, tmp_path, capsys):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--device", "cpu", "--model-dir", str(tiny_wrap_ckpt), "--output-dir", str(out), "--seed", "3",
              str(bad), str(wav_inputs[3])])
    assert exc.value.code == 1
    assert "broken.wav" in capsys.readouterr().err
    doc = json.loads((out / "delta.json").read_text())
    assert len(doc["text_tokens"]) == len(doc["audio_tokens"]) > 0
    assert all(len(a) == 8 for a in doc["audio_tokens"])


@pytest.mark.parametrize("ckpt", ["tiny_wrap_ckpt", "tiny_lm_ckpt"])
def test_mimi_codes_match_reference_frame_by_frame(ckpt, request, wav_inputs):
    model_dir = request.getfixturevalue(ckpt)
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(model_dir), max_sessions=2))
    fr = frames(read_audio(wav_inputs[0]))
    want = reference_generate(model_dir, fr)["codes"]
    slot = torch.tensor([1])
    runner.mimi.reset(slot)
    got = [runner.mimi.encode_step(torch.from_numpy(f).view(1, 1, -1), slot)[0].tolist() for f in fr]
    assert got == want


def test_batch_invariant_mode_gives_the_same_bits_in_any_batch(tiny_wrap_ckpt, wav_inputs):
    inputs = load_inputs(wav_inputs)
    sampling = {k: SamplingConfig(seed=7 + i, temperature=1.0, top_k=0) for i, k in enumerate(inputs)}
    name = "charlie"  # the longest: its batch shrinks from four to one as the others end

    def together_and_alone(invariant: bool):
        runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=4,
                                               batch_invariant=invariant))
        together = run_sessions(runner, inputs, sampling)[name]
        return together, run_sessions(runner, {name: inputs[name]}, {name: sampling[name]})[name]

    together, alone = together_and_alone(False)
    # By default the last bits move with the batch's shape (which is what the mode is for).
    assert not all(np.array_equal(a, b) for a, b in zip(together.pcm, alone.pcm))
    together, alone = together_and_alone(True)
    assert together.text_tokens == alone.text_tokens and together.audio_tokens == alone.audio_tokens
    assert len(together.pcm) == len(alone.pcm) and all(np.array_equal(a, b) for a, b in zip(together.pcm, alone.pcm))


def test_the_checkpoints_lm_gen_config_sets_the_defaults(tiny_wrap_ckpt, wav_inputs, tmp_path):
    import shutil
    model_dir = tmp_path / "ck"
    shutil.copytree(tiny_wrap_ckpt, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["lm_gen_config"] = {"use_sampling": False, "top_k": 5, "temp": 1.0}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    paths = wav_inputs[:2]
    main(["generate", "--device", "cpu", "--model-dir", str(model_dir), "--output-dir", str(tmp_path / "a"),
          *map(str, paths)])
    main(["generate", "--device", "cpu", "--model-dir", str(model_dir), "--no-greedy", "--seed", "3",
          "--output-dir", str(tmp_path / "b"), *map(str, paths)])
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(model_dir), max_sessions=2))
    assert runner.default_sampling == SamplingConfig(greedy=True, top_k=5, temperature=1.0)
    inputs = load_inputs(paths)
    from engine.generate import session_seed
    sampled = run_sessions(runner, inputs, {k: SamplingConfig(top_k=5, temperature=1.0, seed=session_seed(3, k))
                                            for k in inputs})
    for path in paths:
        greedy = json.loads((tmp_path / "a" / f"{path.stem}.json").read_text())
        assert greedy["text_tokens"] == reference_generate(model_dir, inputs[path.stem])["text_tokens"]
        # --no-greedy samples, with the checkpoint's top-k and temperature.
        assert json.loads((tmp_path / "b" / f"{path.stem}.json").read_text())["audio_tokens"] == \
            sampled[path.stem].audio_tokens != greedy["audio_tokens"]


def test_output_names_are_unique_and_do_not_depend_on_the_order(tmp_path):
    from engine.generate import output_names
    a1, a2, dash = tmp_path / "d1" / "a.wav", tmp_path / "d2" / "a.wav", tmp_path / "d1" / "a-1.wav"
    names = output_names([dash, a1, a2])
    assert len(set(names)) == 3 and names[0] == "a-1"
    assert output_names([a2, a1]) == names[:0:-1]  # each file keeps its name in any order
    # The same file twice: a second output, named past every other input's stem.
    x, x2 = tmp_path / "x.wav", tmp_path / "x-2.wav"
    assert output_names([x, x, x2]) == ["x", "x-3", "x-2"]


def test_output_names_hold_for_links_odd_bytes_long_stems_and_crafted_clashes(tmp_path):
    import os
    import zlib

    from engine.config import ConfigError
    from engine.generate import MAX_NAME_BYTES, output_names, session_seed
    a, link = tmp_path / "a.wav", tmp_path / "alink.wav"
    a.write_bytes(b"x")
    link.symlink_to(a)
    assert output_names([a, link]) == ["a", "alink"] and output_names([link, a]) == ["alink", "a"]
    odd = [tmp_path / "x1" / os.fsdecode(b"b\xff.wav"), tmp_path / "x2" / os.fsdecode(b"b\xff.wav")]
    names = output_names(odd)
    assert len(set(names)) == 2 and session_seed(1, names[0]) != session_seed(1, names[1])
    long = output_names([tmp_path / ("é" * 200 + ".wav")])[0]
    assert len(os.fsencode(long)) <= MAX_NAME_BYTES
    # A stem that is another input's hashed name: refused, not one input silently dropped.
    d1 = tmp_path / "d1" / "a.wav"
    crafted = tmp_path / "d3" / f"a-{zlib.crc32(os.fsencode(str(d1))):08x}.wav"
    with pytest.raises(ConfigError, match="would both write"):
        output_names([d1, tmp_path / "d2" / "a.wav", crafted])


def test_outputs_that_would_overwrite_an_input_are_refused(tmp_path, capsys):
    (tmp_path / "a.wav").write_bytes(b"x")
    for out in (str(tmp_path), ""):
        with pytest.raises(SystemExit) as exc:
            main(["generate", "--device", "cpu", "--model-dir", str(tmp_path), "--output-dir", out,
                  str(tmp_path / "a.wav")])
        assert exc.value.code == 2
        assert ("a.wav would overwrite an input" if out else "--output-dir is empty") in capsys.readouterr().err


def test_an_interrupted_run_keeps_the_outputs_of_sessions_that_ended(tiny_wrap_ckpt, wav_inputs, tmp_path,
                                                                       monkeypatch, capsys):
    from engine.serving import EngineLoop
    out, ticks, tick = tmp_path / "out", [0], EngineLoop.tick
    shortest = min(wav_inputs, key=lambda p: len(read_audio(p)))

    def tick_then_interrupt(self):
        ticks[0] += 1
        if ticks[0] > len(frames(read_audio(shortest))) + 3:  # the shortest call has ended by then
            raise KeyboardInterrupt
        return tick(self)
    monkeypatch.setattr(EngineLoop, "tick", tick_then_interrupt)
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--device", "cpu", "--model-dir", str(tiny_wrap_ckpt), "--output-dir", str(out),
              "--greedy", *map(str, wav_inputs)])
    assert exc.value.code == 130 and "interrupted" in capsys.readouterr().err
    assert (out / f"{shortest.stem}.json").exists() and len(list(out.glob("*.json"))) < len(wav_inputs)


def test_inputs_with_one_stem_in_two_folders_each_get_their_output(tiny_wrap_ckpt, wav_inputs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    (one / "a.wav").write_bytes(wav_inputs[0].read_bytes())
    (two / "a.wav").write_bytes(wav_inputs[1].read_bytes())
    out = tmp_path / "out"
    main(["generate", "--device", "cpu", "--model-dir", str(tiny_wrap_ckpt), "--output-dir", str(out), "--greedy",
          str(one / "a.wav"), str(two / "a.wav")])
    docs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    frame_counts = sorted(len(d["text_tokens"]) for d in docs)
    want = sorted(len(frames(read_audio(p))) - 1 for p in wav_inputs[:2])
    assert len(docs) == 2 and frame_counts == want


@pytest.mark.parametrize("out, said", [("afile", "afile is a file; name a folder"),
                                       ("afile/sub", "afile/sub: cannot make it a folder")])
def test_an_output_dir_that_cannot_be_made_is_refused_before_loading(out, said, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as exc:  # tmp_path holds no checkpoint: loading would fail later
        main(["generate", "--device", "cpu", "--model-dir", str(tmp_path), "--output-dir", str(tmp_path / out),
              "x.wav"])
    assert exc.value.code == 2 and f"--output-dir {tmp_path}/{said}" in capsys.readouterr().err


def test_an_output_that_cannot_be_written_loses_only_itself(tiny_wrap_ckpt, wav_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    (out / f"{wav_inputs[0].stem}.wav").mkdir(parents=True)  # in the way of the first input's audio
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--device", "cpu", "--model-dir", str(tiny_wrap_ckpt), "--output-dir", str(out), "--greedy",
              str(wav_inputs[0]), str(wav_inputs[1])])
    assert exc.value.code == 1
    assert f"cannot write {wav_inputs[0].stem}'s output" in capsys.readouterr().err
    assert (out / f"{wav_inputs[1].stem}.json").exists()
