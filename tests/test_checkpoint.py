"""Checkpoint discovery and strict loading: clear errors for every way a checkpoint can be wrong."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint import CheckpointError, resolve
from engine.config import ConfigError, EngineConfig, LMConfig
from engine.runner import ModelRunner


@pytest.fixture
def ckpt_copy(tiny_wrap_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_wrap_ckpt, dst)
    return dst


def load(model_dir, **kw):
    return ModelRunner.load(EngineConfig(device="cpu", model_dir=str(model_dir), **kw))


def test_loads_and_uses_config(ckpt_copy):
    runner = load(ckpt_copy, dtype="bfloat16")
    assert runner.lm.cfg.context == 6
    assert runner.mimi.cfg.transformer.context == 5
    assert next(runner.lm.parameters()).dtype == torch.bfloat16
    assert next(runner.mimi.parameters()).dtype == torch.float32


def test_missing_tensor_is_named(ckpt_copy):
    path = ckpt_copy / "model.safetensors"
    state = load_file(str(path))
    del state["text_linear.weight"]
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"missing: text_linear\.weight"):
        load(ckpt_copy)


def test_wrong_shape_and_unexpected_are_named(ckpt_copy):
    path = ckpt_copy / json.loads((ckpt_copy / "config.json").read_text())["mimi_name"]
    state = load_file(str(path))
    key = "decoder.model.0.conv.conv.weight"
    state[key] = torch.zeros(3, 3, 3)
    state["bogus.weight"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        load(ckpt_copy)
    msg = str(err.value)
    assert "unexpected: bogus.weight" in msg and f"wrong shape: {key}: file (3, 3, 3)" in msg


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.int64])
def test_an_integer_tensor_for_a_float_weight_is_named(ckpt_copy, dtype):
    path = ckpt_copy / "model.safetensors"
    state = load_file(str(path))
    state["text_linear.weight"] = state["text_linear.weight"].gt(0).to(dtype)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=rf"wrong dtype: text_linear\.weight: file {dtype}"):
        load(ckpt_copy)


@pytest.mark.parametrize("patch, match", [
    ({"dim": 65}, "divisible by num_heads"),
    ({"delays": [0, 1]}, "delays has 2 entries"),
    ({"flux_capacitor": 1}, "unknown key 'flux_capacitor'"),
    ({"demux_second_stream": True}, "demux_second_stream"),
])
def test_bad_config_says_what_to_change(ckpt_copy, patch, match):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    (ckpt_copy / "config.json").write_text(json.dumps({**cfg, **patch}))
    with pytest.raises(ConfigError, match=match):
        load(ckpt_copy)


def test_unparseable_config_and_missing_files(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="Moshi weights not found"):
        load(ckpt_copy)
    (ckpt_copy / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read config"):
        load(ckpt_copy)


def test_missing_config_means_moshi_7b_defaults(tmp_path):
    for name in ("model.safetensors", "tokenizer-e351c8d8-checkpoint125.safetensors", "tokenizer_spm_32k_3.model"):
        (tmp_path / name).write_bytes(b"")
    files = resolve(EngineConfig(device="cpu", model_dir=str(tmp_path)))
    assert files.lm == LMConfig()


def _offline_hub(tmp_path, monkeypatch, repos: dict):
    """A Hugging Face cache holding `repos` ({"owner/name": folder}) and no network."""
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    for repo, folder in repos.items():
        repo_dir = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
        shutil.copytree(folder, repo_dir / "snapshots" / ("0" * 40))
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def test_hf_repo_from_offline_cache(tiny_wrap_ckpt, tmp_path, monkeypatch):
    _offline_hub(tmp_path, monkeypatch, {"kyutai/tiny-test": tiny_wrap_ckpt})
    runner = ModelRunner.load(EngineConfig(device="cpu", hf_repo="kyutai/tiny-test"))
    assert runner.lm.cfg.context == 6
    with pytest.raises(CheckpointError, match="neither in the local cache"):
        ModelRunner.load(EngineConfig(device="cpu", hf_repo="kyutai/not-there"))


def test_a_cached_repo_loads_without_asking_the_hub(tiny_wrap_ckpt, tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE and no network: what the cache holds is used without a request (which on
    such a machine costs minutes of retries)."""
    import huggingface_hub
    import huggingface_hub.constants as hf_constants
    _offline_hub(tmp_path, monkeypatch, {"kyutai/tiny-test": tiny_wrap_ckpt})
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise AssertionError("asked the hub for a cached file")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    assert ModelRunner.load(EngineConfig(device="cpu", hf_repo="kyutai/tiny-test")).lm.cfg.context == 6


def test_a_repo_without_config_json_is_moshi_7b_but_an_unreachable_file_is_an_error(
        tiny_wrap_ckpt, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError
    folder = tmp_path / "legacy"
    shutil.copytree(tiny_wrap_ckpt, folder)
    (folder / "config.json").unlink()
    (folder / "mimi_config.json").unlink()
    _offline_hub(tmp_path, monkeypatch, {"kyutai/legacy": folder})
    asked = []

    def hub(repo, name, **kwargs):
        asked.append(name)
        if name == "config.json":
            raise EntryNotFoundError("404: no such file")
        raise ConnectionError("no network")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    files = resolve(EngineConfig(device="cpu", hf_repo="kyutai/legacy"))
    assert files.lm == LMConfig() and asked == ["config.json"]
    assert "gives no config.json (the repository has none" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=r"cannot get 'other.safetensors' .*\(ConnectionError\); it is "
                                              "neither in the local cache nor downloadable"):
        resolve(EngineConfig(device="cpu", hf_repo="kyutai/legacy", moshi_weight="hf://kyutai/legacy/other.safetensors"))


def test_a_tokenizer_smaller_than_the_text_vocabulary_is_pointed_out(ckpt_copy, capsys):
    from engine.tokenizer import train_tokenizer
    train_tokenizer(ckpt_copy / "tokenizer_spm_32k_3.model", 64)  # the LM has 256 text tokens
    load(ckpt_copy)
    assert "has 64 pieces, fewer than the LM's 256 text tokens" in capsys.readouterr().err


def test_kyutai_config_keys_are_understood():
    raw = {"moshi_name": "model.safetensors", "mimi_name": "m.safetensors", "tokenizer_name": "t.model",
           "depformer_causal": True, "conditioners": {}, "cross_attention": False, "model_id": {"sig": "x"},
           "lm_gen_config": {"temp": 0.8}, "depformer_dim_feedforward": None, "depformer_dim": 512,
           "hidden_scale": 4.125}
    cfg = LMConfig.from_dict(raw)
    assert cfg.depformer_dim_feedforward == int(4.125 * 512) and cfg.dim == 4096


@pytest.fixture(scope="module")
def q8_ckpt(tmp_path_factory):
    """The tiny_wrap checkpoint's weights, stored as kyutai's -q8 repositories store them."""
    from engine.make_checkpoint import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("tiny-q8"), "tiny", seed=1, context=6, mimi_context=5, q8=True)


def test_q8_weights_are_dequantized_at_load(q8_ckpt, tiny_wrap_ckpt):
    from engine.checkpoint import normalize_keys
    assert json.loads((q8_ckpt / "config.json").read_text())["quantize"] is True
    stored = load_file(str(q8_ckpt / "model.q8.safetensors"))
    # Stored as kyutai stores them: fused per-step projections, their scales fused alike.
    assert stored["depformer.layers.0.self_attn.in_proj_weight"].dtype == torch.int8
    assert stored["depformer.layers.0.self_attn.in_proj_weight_scb"].shape == (8 * 3 * 32,)
    runner, base = load(q8_ckpt), load(tiny_wrap_ckpt)
    q8 = normalize_keys(stored, runner.lm)
    for name, m in runner.lm.named_modules():
        if isinstance(m, torch.nn.Linear):
            cb, scb = q8[f"{name}.weight"], q8[f"{name}.weight_scb"]
            assert torch.equal(m.weight, cb.float() * (scb / 127)[:, None]), name
            # Within half a step of int8 of the bf16 weights it was quantized from.
            err = (m.weight - base.lm.get_submodule(name).weight).abs()
            assert (err <= scb[:, None] / 254 * (1 + 1e-3)).all(), name
    base_state = base.lm.state_dict()
    for key, value in runner.lm.state_dict().items():
        if "emb" in key or "norm" in key:
            assert torch.equal(value, base_state[key]), key


def test_q8_model_generates(q8_ckpt, wav_inputs):
    from engine.audio import frames, read_audio
    from engine.config import SamplingConfig
    from engine.generate import run_sessions
    inputs = {p.stem: frames(read_audio(p)) for p in wav_inputs[:2]}
    res = run_sessions(load(q8_ckpt, max_sessions=2), inputs, {k: SamplingConfig(greedy=True) for k in inputs})
    for k, fr in inputs.items():
        assert len(res[k].text_tokens) == len(fr) - 1 and len(res[k].pcm) == len(fr) - 1


def test_bad_q8_weights_are_named(q8_ckpt, tmp_path):
    dst = tmp_path / "q8"
    shutil.copytree(q8_ckpt, dst)
    state = load_file(str(dst / "model.q8.safetensors"))
    del state["text_linear.weight_scb"]
    state["linears.0.weight_scb"] = torch.ones(3)
    save_file(state, str(dst / "model.q8.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load(dst)
    msg = str(err.value)
    assert "linears.0.weight_scb (3,) has no int8 weight of as many rows" in msg
    assert "text_linear.weight: int8 without text_linear.weight_scb" in msg


def test_files_named_in_another_repo_or_as_local_paths(tiny_wrap_ckpt, tmp_path, monkeypatch):
    """kyutai's names: hf://OWNER/REPO/FILE in config.json or a flag, file://PATH for a local file."""
    from engine.make_checkpoint import make_checkpoint
    lora = make_checkpoint(tmp_path / "lora", "tiny", seed=1, context=6, mimi_context=5, lora_rank=2)
    _offline_hub(tmp_path, monkeypatch, {"kyutai/tiny-test": tiny_wrap_ckpt, "someone/fine-tune": lora})
    dst = tmp_path / "ck"
    dst.mkdir()
    shutil.copy(tiny_wrap_ckpt / "model.safetensors", dst)
    cfg = json.loads((tiny_wrap_ckpt / "config.json").read_text())
    mimi = "tokenizer-e351c8d8-checkpoint125.safetensors"
    cfg.update(mimi_name=f"hf://kyutai/tiny-test/{mimi}", mimi_config_name="hf://kyutai/tiny-test/mimi_config.json",
               tokenizer_name=f"file://{tiny_wrap_ckpt / cfg['tokenizer_name']}")
    (dst / "config.json").write_text(json.dumps(cfg))
    files = resolve(EngineConfig(device="cpu", model_dir=str(dst), lora_weight="hf://someone/fine-tune/lora.safetensors"))
    assert files.mimi_weights.read_bytes() == (tiny_wrap_ckpt / mimi).read_bytes()
    assert files.tokenizer == tiny_wrap_ckpt / cfg["tokenizer_name"].rpartition("/")[2]
    assert files.lora.path.read_bytes() == (lora / "lora.safetensors").read_bytes()
    assert files.mimi.transformer.context == 5
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(dst), max_sessions=1,
                                           moshi_weight=f"file://{lora / 'model.safetensors'}",
                                           lora_weight="hf://someone/fine-tune/lora.safetensors"))
    assert runner.lora is not None
    with pytest.raises(ConfigError, match="a Hugging Face file is named hf://OWNER/REPO/FILE"):
        resolve(EngineConfig(device="cpu", model_dir=str(dst), lora_weight="hf://someone/lora.safetensors"))
    with pytest.raises(CheckpointError, match="cannot get 'x.safetensors' from Hugging Face repo 'someone/gone'"):
        resolve(EngineConfig(device="cpu", model_dir=str(dst), mimi_weight="hf://someone/gone/x.safetensors"))
