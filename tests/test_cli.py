"""The `lockstep` command line."""
import dataclasses
import json

import pytest
import torch

from engine.cli import build_parser, main
from engine.config import EngineConfig, SamplingConfig


def test_make_checkpoint_writes_kyutai_layout(tmp_path, capsys):
    main(["make-checkpoint", str(tmp_path / "ck"), "--preset", "tiny", "--context", "9"])
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["context"] == 9 and cfg["n_q"] == 16 and cfg["dep_q"] == 8
    for key in ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name"):
        assert (tmp_path / "ck" / cfg[key]).is_file()
    assert "wrote tiny checkpoint" in capsys.readouterr().out
    assert "lora" not in cfg and "quantize" not in cfg


def test_make_checkpoint_writes_fine_tunes_and_q8(tmp_path, capsys):
    main(["make-checkpoint", str(tmp_path / "ck"), "--preset", "tiny", "--lora-rank", "3", "--q8"])
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert (cfg["lora"], cfg["lora_rank"], cfg["lora_scaling"], cfg["quantize"]) == (True, 3, 2.0, True)
    for key in ("moshi_name", "lora_name"):
        assert (tmp_path / "ck" / cfg[key]).is_file()
    assert cfg["moshi_name"] == "model.q8.safetensors"
    with pytest.raises(SystemExit):
        main(["make-checkpoint", str(tmp_path / "bad"), "--lora-rank", "0"])
    assert "error: --lora-rank must be a positive integer, got 0" in capsys.readouterr().err


def test_make_checkpoint_refuses_what_it_cannot_write(tmp_path, capsys):
    main(["make-checkpoint", str(tmp_path / "ck")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # never overwrites a checkpoint
        main(["make-checkpoint", str(tmp_path / "ck")])
    assert exc.value.code == 2 and "exists and is not an empty folder" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    for target, code in (("afile", 2), ("afile/sub", 1), ("", 2)):  # the error, not a traceback
        with pytest.raises(SystemExit) as exc:
            main(["make-checkpoint", str(tmp_path / target) if target else ""])
        err = capsys.readouterr().err
        assert exc.value.code == code and err.startswith("lockstep: error: ") and ("afile" in err or not target)
    assert {p.name for p in tmp_path.iterdir()} == {"ck", "afile"}  # no scratch folder left behind
    with pytest.raises(SystemExit) as exc:
        main(["make-checkpoint", str(tmp_path / "big-seed"), "--seed", str(2**64)])
    assert exc.value.code == 2 and "--seed must be in 0..2^63-1" in capsys.readouterr().err


def test_flags_come_from_the_configs():
    args = build_parser().parse_args(["generate", "--output-dir", "o", "x.wav"])
    for f in dataclasses.fields(EngineConfig):
        assert getattr(args, f.name) == f.default
    # Sampling flags left unset stay unset: the checkpoint's lm_gen_config decides them.
    assert all(getattr(args, f.name) is None for f in dataclasses.fields(SamplingConfig))
    args = build_parser().parse_args(["generate", "--output-dir", "o", "--greedy", "--top-k", "3",
                                      "--temperature", "0.5", "--seed", "7", "x.wav"])
    assert (args.greedy, args.top_k, args.temperature, args.seed, args.text_top_k) == (True, 3, 0.5, 7, None)
    # The flag keeps the declared "auto"; the config built from it holds this machine's device.
    assert args.device == "auto"
    assert EngineConfig(device=args.device).device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_config_errors_exit_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model-dir", str(tmp_path / "nope"), "--output-dir", str(tmp_path), "x.wav"])
    assert exc.value.code == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--dtype", "int4", "--model-dir", str(tmp_path), "--output-dir", "o", "x.wav"])


def test_api_keys_from_the_environment_join_the_flags():
    from engine.cli import serve_config
    args = build_parser().parse_args(["serve", "--api-key", "flag-key"])
    assert serve_config(args, {}).api_key == ("flag-key",)
    cfg = serve_config(args, {"LOCKSTEP_API_KEYS": " env-a, env-b  env-c,,"})
    assert cfg.api_key == ("flag-key", "env-a", "env-b", "env-c")
    assert serve_config(build_parser().parse_args(["serve"]), {"LOCKSTEP_API_KEYS": " , "}).api_key == ()


def test_an_empty_api_key_is_refused(capsys):
    # `--api-key "$KEY"` with KEY unset would otherwise admit an empty bearer token.
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--api-key", "", "--model-dir", "unused"])
    assert exc.value.code == 2 and "--api-key must not be empty" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_exits_cleanly(tiny_wrap_ckpt, tmp_path, capsys):
    for argv in (["generate", "--model-dir", str(tiny_wrap_ckpt), "--device", "cuda", "--output-dir", str(tmp_path),
                  "x.wav"], ["bench", "tick", "--dummy", "7b", "--device", "cuda", "--no-reference"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "sees no CUDA device here: use --device cpu" in capsys.readouterr().err


def test_version_names_what_it_runs_on(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("lockstep ") and f"torch {torch.__version__}" in out and "Python 3." in out


def test_make_checkpoint_refuses_what_the_host_cannot_hold(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("engine.make_checkpoint.free_bytes", lambda device: 24 << 30)
    with pytest.raises(SystemExit) as exc:
        main(["make-checkpoint", str(tmp_path / "big"), "--preset", "7b"])
    assert exc.value.code == 2 and "takes ~47 GB of host memory" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()


def test_a_bad_sampling_flag_is_named_as_a_flag(tiny_wrap_ckpt, tmp_path, capsys):
    for flag, value in (("--text-top-k", "-1"), ("--seed", str(2**63)), ("--temperature", "11")):
        with pytest.raises(SystemExit) as exc:
            main(["generate", "--device", "cpu", "--model-dir", str(tiny_wrap_ckpt), "--output-dir", str(tmp_path),
                  flag, value, "x.wav"])
        assert exc.value.code == 2 and f"error: {flag} must be" in capsys.readouterr().err
