"""The engine on the Triton backend (interpreted) reproduces the reference's greedy tokens, and the
backend choice is explicit per module."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("moshi")
from engine.audio import frames, read_audio, write_wav  # noqa: E402
from engine.cli import main  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.lm import MoshiLM  # noqa: E402
from engine.make_checkpoint import TINY_LM, TINY_MIMI  # noqa: E402
from engine.mimi import Mimi  # noqa: E402
from engine.runner import ModelRunner  # noqa: E402
from kernels.dispatch import BackendError, apply_backend, resolve_backend  # noqa: E402
from reference import reference_generate  # noqa: E402

N_FRAMES = (3, 4)  # the interpreter is slow: short inputs, still past the LM's acoustic delay


def test_generate_with_triton_kernels_matches_reference(tiny_wrap_ckpt, wav_inputs, tmp_path):
    """`lockstep generate --kernels triton` (interpreted here), batched and solo."""
    paths = []
    for p, n in zip(wav_inputs, N_FRAMES):
        paths.append(tmp_path / p.name)
        write_wav(paths[-1], frames(read_audio(p))[:n].reshape(-1))
    common = ["generate", "--device", "cpu", "--model-dir", str(tiny_wrap_ckpt), "--kernels", "triton", "--greedy"]
    main([*common, "--max-sessions", "2", "--output-dir", str(tmp_path / "batched"), *map(str, paths)])
    main([*common, "--output-dir", str(tmp_path / "solo"), str(paths[0])])
    for i, path in enumerate(paths):
        fr = frames(read_audio(path))
        want = reference_generate(tiny_wrap_ckpt, fr)
        assert len(want["text_tokens"]) == len(fr) - 1
        for run in ("batched", "solo") if i == 0 else ("batched",):
            got = json.loads((tmp_path / run / f"{path.stem}.json").read_text())
            assert got["text_tokens"] == want["text_tokens"], (run, path.stem)
            assert got["audio_tokens"] == want["audio_tokens"], (run, path.stem)
        pcm = read_audio(tmp_path / "batched" / f"{path.stem}.wav")
        assert np.abs(pcm - np.clip(want["pcm"].numpy(), -1, 1)).max() <= 3 / 32768


def test_runner_load_applies_the_backend(tiny_wrap_ckpt):
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=1, kernels="triton"))
    assert runner.lm.transformer.kernel_backend == "triton" and runner.mimi.quantizer.kernel_backend == "triton"
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=1))
    assert runner.lm.transformer.kernel_backend == "torch"


def test_resolve_backend(monkeypatch):
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("auto", torch.device("cuda:0")) == "triton"
    assert resolve_backend("triton", "cuda") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", "cpu")
    with pytest.raises(BackendError, match="unknown kernels backend"):
        resolve_backend("cuda", "cpu")


def test_interpreter_problem_names_the_fix():
    from kernels.dispatch import interpreter_problem
    problem = interpreter_problem("3.6.0", "2.4.1")
    assert "triton>=3.7" in problem and "numpy<2.4" in problem
    assert interpreter_problem("3.6.0", "2.3.5") is None
    assert interpreter_problem("3.7.1", "2.5.0") is None
    assert interpreter_problem("3.10.0+git1234", "2.4.0rc1") is None


def test_apply_backend_records_the_choice_on_modules_with_kernels():
    torch.manual_seed(0)
    lm, mimi = MoshiLM(TINY_LM), Mimi(TINY_MIMI)
    applied = apply_backend(lm, "triton") | {"mimi." + k: v for k, v in apply_backend(mimi, "triton").items()}
    for name in ("transformer", "depformer", "out_norm", "transformer.layers.0.norm1",
                 "transformer.layers.0.gating", "mimi.quantizer", "mimi.encoder.model.0",
                 "mimi.decoder.model.2", "mimi.encoder_transformer.transformer", "mimi.downsample.conv"):
        assert applied[name] == "triton", name
    assert lm.transformer.kernel_backend == "triton" and mimi.upsample.convtr.kernel_backend == "triton"
    assert set(apply_backend(lm, "torch").values()) == {"torch"}
    assert lm.transformer.kernel_backend == "torch"
    with pytest.raises(BackendError):
        apply_backend(lm, "auto")
    # A configuration without a Triton kernel keeps torch, and says so.
    from engine.transformer import ActivationGating
    gelu = ActivationGating(8, 32, "gelu")
    assert apply_backend(gelu, "triton") == {"": "torch"}
