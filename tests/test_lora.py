"""LoRA fine-tunes: found from config.json or --lora-weight, folded at load, against the reference."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.audio import frames, read_audio
from engine.checkpoint import normalize_keys, resolve
from engine.cli import main
from engine.config import CheckpointError, ConfigError, EngineConfig, SamplingConfig
from engine.generate import run_sessions
from engine.make_checkpoint import LORA_NAME, make_checkpoint
from engine.runner import ModelRunner


@pytest.fixture(scope="session")
def lora_ckpt(tmp_path_factory):
    """The all-tiny checkpoint with short rings, plus a rank-4 adapter on every LM linear layer."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny-lora"), "tiny", seed=1, context=6, mimi_context=5,
                           lora_rank=4)


def _copy(src, dst, **config_changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _greedy(model_dir, inputs, **cfg):
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(model_dir), max_sessions=2, **cfg))
    return run_sessions(runner, inputs, {k: SamplingConfig(greedy=True) for k in inputs})


def test_base_files_do_not_depend_on_the_adapter(lora_ckpt, tiny_wrap_ckpt):
    for name in ("model.safetensors", "tokenizer-e351c8d8-checkpoint125.safetensors"):
        assert (lora_ckpt / name).read_bytes() == (tiny_wrap_ckpt / name).read_bytes()


def test_fold_is_w_plus_scaled_b_a(lora_ckpt):
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(lora_ckpt), max_sessions=1))
    stored, adapter = load_file(str(lora_ckpt / "model.safetensors")), load_file(str(lora_ckpt / LORA_NAME))
    base = normalize_keys(stored, runner.lm)
    assert len(adapter) == 2 * sum(isinstance(m, torch.nn.Linear) for m in runner.lm.modules())
    for head in ("text_linear", "depformer.layers.1.self_attn.out_projs.3", "transformer.layers.0.gating.linear_in"):
        a, b = adapter[f"{head}.lora_A.weight"].float(), adapter[f"{head}.lora_B.weight"].float()
        want = base[f"{head}.weight"].float() + 2.0 * (b @ a)
        assert torch.equal(runner.lm.get_submodule(head).weight, want)
    # Fused attention projections are split before the fold, each step's part with its own adapter.
    fused = stored["transformer.layers.1.self_attn.in_proj_weight"].float()
    a = adapter["transformer.layers.1.self_attn.in_projs.0.lora_A.weight"].float()
    b = adapter["transformer.layers.1.self_attn.in_projs.0.lora_B.weight"].float()
    assert torch.equal(runner.lm.transformer.layers[1].self_attn.in_projs[0].weight, fused.float() + 2.0 * (b @ a))


@pytest.mark.slow
def test_generate_with_an_adapter_matches_the_reference(lora_ckpt, tiny_wrap_ckpt, wav_inputs, tmp_path):
    pytest.importorskip("moshi")
    from reference import reference_generate
    out = tmp_path / "out"
    main(["generate", "--device", "cpu", "--model-dir", str(lora_ckpt), "--max-sessions", "2", "--greedy",
          "--output-dir", str(out), *map(str, wav_inputs)])
    base = _greedy(tiny_wrap_ckpt, {p.stem: frames(read_audio(p)) for p in wav_inputs})
    changed = 0
    for path in wav_inputs:
        got = json.loads((out / f"{path.stem}.json").read_text())
        fr = frames(read_audio(path))
        want = reference_generate(lora_ckpt, fr)
        assert got["text_tokens"] == want["text_tokens"], path.stem
        assert got["audio_tokens"] == want["audio_tokens"], path.stem
        changed += got["audio_tokens"] != base[path.stem].audio_tokens
        # Kyutai's unfused LoRA (beside each layer) rounds otherwise but chooses the same here.
        assert got["text_tokens"] == reference_generate(lora_ckpt, fr, fuse_lora=False)["text_tokens"]
    assert changed == len(wav_inputs)  # the adapter matters: every call goes another way


def test_lora_weight_flag_adapts_a_plain_checkpoint(lora_ckpt, tiny_wrap_ckpt, wav_inputs, tmp_path):
    inputs = {p.stem: frames(read_audio(p)) for p in wav_inputs[:2]}
    plain = _copy(lora_ckpt, tmp_path / "plain", lora=None, lora_rank=None, lora_scaling=None, lora_name=None)
    assert resolve(EngineConfig(device="cpu", model_dir=str(plain))).lora is None
    flagged = _greedy(plain, inputs, lora_weight=str(lora_ckpt / LORA_NAME))
    named = _greedy(lora_ckpt, inputs)
    for k in inputs:
        assert flagged[k].audio_tokens == named[k].audio_tokens
        assert flagged[k].text_tokens == named[k].text_tokens
    # A scaling of 0 leaves the base model.
    zero = _greedy(_copy(lora_ckpt, tmp_path / "zero", lora_scaling=0.0), inputs)
    base = _greedy(tiny_wrap_ckpt, inputs)
    assert all(zero[k].audio_tokens == base[k].audio_tokens for k in inputs)


def test_config_mistakes_are_clear_errors(lora_ckpt, tmp_path):
    def check(match, lora_weight=None, **changes):
        d = _copy(lora_ckpt, tmp_path / f"c{len(list(tmp_path.iterdir()))}", **changes)
        with pytest.raises(ConfigError, match=match):
            resolve(EngineConfig(device="cpu", model_dir=str(d), lora_weight=lora_weight))
    check("sets lora=true but names no lora_name: pass the adapter with --lora-weight FILE, or set "
          "lora=false if its weights already have the adapter merged in", lora_name=None)
    check("lora_name must be a file name, got 5", lora_name=5)
    check("names lora_name='lora.safetensors' but does not set lora=true", lora=False)
    check("LoRA weights not found: .*nowhere.safetensors", lora_weight=str(tmp_path / "nowhere.safetensors"))
    check("lora_rank must be a positive integer, got 0", lora_rank=0)
    check("lora_scaling must be a finite number, got 'x'", lora_scaling="x")
    check("lora_scaling must be a finite number, got nan", lora_scaling=float("nan"))
    check("lora must be true or false, got 'false'", lora="false")
    check("a checkpoint file must be named by a non-empty string, got 7", lora=False, lora_name=None, moshi_name=7)


def test_adapters_that_do_not_fit_name_every_problem(lora_ckpt, tmp_path):
    adapter = load_file(str(lora_ckpt / LORA_NAME))
    bad = dict(adapter)
    bad["emb.0.lora_A.weight"] = torch.zeros(4, 8)  # an embedding: kyutai adapts only linear layers
    del bad["text_linear.lora_B.weight"]
    bad["linears.0.lora_A.weight"] = torch.zeros(4, 3)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    cfg = EngineConfig(device="cpu", model_dir=str(lora_ckpt), max_sessions=1,
                       lora_weight=str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as err:
        ModelRunner.load(cfg)
    msg = str(err.value)
    assert ("emb.0.lora_A.weight: neither a lora_A/lora_B weight of one of the LM's linear layers nor a "
            "tensor of the base model") in msg
    assert "text_linear: has lora_A without lora_B" in msg
    assert "linears.0: lora_A (4, 3) and lora_B (2048, 4) do not make the base weight's (2048, 32)" in msg
    # A rank other than config.json's.
    d = _copy(lora_ckpt, tmp_path / "rank", lora_rank=8)
    with pytest.raises(CheckpointError, match=r"rank 4, but config.json's lora_rank is 8"):
        ModelRunner.load(EngineConfig(device="cpu", model_dir=str(d), max_sessions=1))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "none.safetensors"))
    with pytest.raises(CheckpointError, match="x: neither a lora_A"):
        ModelRunner.load(EngineConfig(device="cpu", model_dir=str(lora_ckpt), max_sessions=1,
                                      lora_weight=str(tmp_path / "none.safetensors")))
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(CheckpointError, match="it holds no lora_A/lora_B weights"):
        ModelRunner.load(EngineConfig(device="cpu", model_dir=str(lora_ckpt), max_sessions=1,
                                      lora_weight=str(tmp_path / "empty.safetensors")))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read LoRA safetensors file"):
        ModelRunner.load(EngineConfig(device="cpu", model_dir=str(lora_ckpt), max_sessions=1,
                                      lora_weight=str(tmp_path / "junk.safetensors")))


def test_cli_reports_a_bad_adapter_without_a_traceback(lora_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--device", "cpu", "--model-dir", str(lora_ckpt), "--lora-weight",
              str(tmp_path / "missing.safetensors"), "--output-dir", str(tmp_path), str(tmp_path / "x.wav")])
    assert exit_.value.code != 0
    assert "LoRA weights not found" in capsys.readouterr().err


def test_the_server_says_which_adapter_it_folded_in(lora_ckpt, capsys):
    import gc

    from engine.process.main import build_engine
    from engine.config import ServeConfig
    try:
        build_engine(EngineConfig(device="cpu", model_dir=str(lora_ckpt), max_sessions=1), ServeConfig(no_warmup=True))
        assert f"{lora_ckpt} + LoRA lora.safetensors (scaling 2, folded in) on cpu" in capsys.readouterr().out
    finally:
        gc.unfreeze()


def test_fused_attention_factors_split_like_the_weights(lora_ckpt, tmp_path):
    """kyutai's loader also takes each attention's per-step factors stacked in one tensor."""
    adapter = load_file(str(lora_ckpt / LORA_NAME))
    fused = {k: v for k, v in adapter.items() if ".self_attn." not in k}
    for layer in range(2):
        for proj in ("in_proj", "out_proj"):
            for f in ("A", "B"):
                prefix = f"depformer.layers.{layer}.self_attn."
                parts = [adapter[f"{prefix}{proj}s.{i}.lora_{f}.weight"] for i in range(8)]
                fused[f"{prefix}{proj}.lora_{f}.weight"] = torch.cat(parts)
    fused.update({k: v for k, v in adapter.items() if k.startswith("transformer.") and ".self_attn." in k})
    save_file(fused, str(tmp_path / "fused.safetensors"))
    want = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(lora_ckpt), max_sessions=1))
    got = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(lora_ckpt), max_sessions=1,
                                        lora_weight=str(tmp_path / "fused.safetensors")))
    for (name, a), (_, b) in zip(want.lm.state_dict().items(), got.lm.state_dict().items()):
        assert torch.equal(a, b), name


def test_an_adapter_on_q8_weights_folds_after_dequantizing(tmp_path):
    from engine.checkpoint import normalize_keys
    d = make_checkpoint(tmp_path / "q8", "tiny", seed=3, lora_rank=2, q8=True)
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(d), max_sessions=1))
    q8 = normalize_keys(load_file(str(d / "model.q8.safetensors")), runner.lm)
    adapter = load_file(str(d / LORA_NAME))
    head = "depformer.layers.1.gating.5.linear_out"
    w = q8[f"{head}.weight"].float() * (q8[f"{head}.weight_scb"] / 127)[:, None]
    a, b = adapter[f"{head}.lora_A.weight"].float(), adapter[f"{head}.lora_B.weight"].float()
    assert torch.equal(runner.lm.get_submodule(head).weight, w + 2.0 * (b @ a))


def test_base_tensors_in_the_adapter_replace_the_base(lora_ckpt, tmp_path):
    """moshi-finetune's ft_embed saves whole embedding tables beside the factors, and a saved LoRA
    model names a linear layer's base weight P.frozen_W.weight: kyutai's loader takes both."""
    adapter = load_file(str(lora_ckpt / LORA_NAME))
    text_emb = torch.randn(257, 64)
    emb3 = torch.randn(2049, 64)
    frozen = torch.randn(256, 64)
    bad = dict(adapter)
    bad.update({"text_emb.weight": text_emb, "emb.3.weight": emb3, "text_linear.frozen_W.weight": frozen})
    save_file(bad, str(tmp_path / "ft_embed.safetensors"))
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(lora_ckpt), max_sessions=1,
                                           lora_weight=str(tmp_path / "ft_embed.safetensors")))
    assert torch.equal(runner.lm.text_emb.weight, text_emb) and torch.equal(runner.lm.emb[3].weight, emb3)
    a, b = adapter["text_linear.lora_A.weight"].float(), adapter["text_linear.lora_B.weight"].float()
    assert torch.equal(runner.lm.text_linear.weight, frozen + 2.0 * (b @ a))  # replaced, then folded
    save_file({**adapter, "text_emb.weight": torch.zeros(3, 64)}, str(tmp_path / "short.safetensors"))
    with pytest.raises(CheckpointError, match=r"text_emb.weight: torch.float32 \(3, 64\) cannot replace the base "
                                              r"\(257, 64\)"):
        ModelRunner.load(EngineConfig(device="cpu", model_dir=str(lora_ckpt), max_sessions=1,
                                      lora_weight=str(tmp_path / "short.safetensors")))
