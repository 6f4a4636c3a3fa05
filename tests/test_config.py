"""Every config is validated when built, and each refusal names what to change."""
import dataclasses

import pytest

from engine.config import (ConfigError, EngineConfig, LMConfig, MimiConfig, MimiTransformerConfig,
                           QuantizerConfig, SamplingConfig, SeanetConfig, ServeConfig, default_engine_threads)


def _mimi(**parts):
    return MimiConfig(**parts)


@pytest.mark.parametrize("build, match", [
    (lambda: EngineConfig(dtype="int8"), "--dtype must be one of"),
    (lambda: EngineConfig(device="cpu", model_dir="a", hf_repo="b"), "not both"),
    (lambda: EngineConfig(max_sessions=-1), "--max-sessions must be >= 1, or 0 for as many as fit"),
    (lambda: EngineConfig(kernels="cuda"), "--kernels must be auto, torch or triton"),
    (lambda: EngineConfig(device="tpu"), "--device must be 'auto', 'cpu' or 'cuda"),
    (lambda: ServeConfig(port=0), "--port must be in 1..65535"),
    (lambda: ServeConfig(api_key=("ok", " ")), "--api-key must not be empty"),
    (lambda: ServeConfig(admission_wait=-1), "--admission-wait"),
    (lambda: ServeConfig(max_body_mb=0), "--max-body-mb"),
    (lambda: ServeConfig(idle_timeout=0), "--idle-timeout"),
    (lambda: ServeConfig(shutdown_timeout=-1), "--shutdown-timeout"),
    (lambda: ServeConfig(max_buffer_seconds=0.01), "--max-buffer-seconds must hold at least one 80 ms frame"),
    (lambda: ServeConfig(admit_realtime=True, no_warmup=True), "--admit-realtime .* --no-warmup skips"),
    (lambda: ServeConfig(engine_threads=-1), "--engine-threads must be in 0..1024"),
    (lambda: ServeConfig(static="/nonexistent"), "--static /nonexistent must be a folder holding index.html"),
    (lambda: ServeConfig(opus_complexity=11), "--opus-complexity must be an integer in 0..10, got 11"),
    (lambda: ServeConfig(opus_complexity=5.0), "--opus-complexity must be an integer in 0..10, got 5.0"),
    (lambda: SamplingConfig(temperature=-0.1), r"temperature must be a number in 0..10.0, got -0.1"),
    (lambda: SamplingConfig(text_temperature=float("nan")), r"text_temperature must be a number in 0..10.0"),
    (lambda: SamplingConfig(temperature=float("inf")), r"temperature must be a number in 0..10.0, got inf"),
    (lambda: SamplingConfig(text_top_k=-1), r"text_top_k must be an integer in 0..2147483647"),
    (lambda: SamplingConfig(top_k=2**63), r"top_k must be an integer in 0..2147483647"),
    (lambda: SamplingConfig(seed=2**63), "seed must be in"),
    (lambda: LMConfig(delays=(0, 1)), "delays has 2 entries; it needs n_q \\+ 1 = 17"),
    (lambda: LMConfig(delays=(-1,) * 17), "delays must be non-negative"),
    (lambda: LMConfig(dep_q=0), "dep_q must be in 1..n_q"),
    (lambda: LMConfig(num_heads=5), "dim must be divisible by num_heads"),
    (lambda: LMConfig(depformer_num_heads=3), "depformer_dim must be divisible"),
    (lambda: LMConfig(norm="batch_norm"), "norm 'batch_norm' unsupported"),
    (lambda: LMConfig(gating="none"), "gating and depformer_gating must be one of"),
    (lambda: LMConfig(depformer_gating="bogus"), "gating and depformer_gating must be one of"),
    (lambda: LMConfig(num_heads=0), "num_heads must be positive, got 0"),
    (lambda: LMConfig(dim=-64), "dim must be positive, got -64"),
    (lambda: LMConfig(depformer_num_heads=0), "depformer_num_heads must be positive"),
    (lambda: _mimi(transformer=MimiTransformerConfig(num_heads=0)), "transformer.num_heads must be positive"),
    (lambda: EngineConfig(device="cudax"), "--device must be 'auto', 'cpu' or 'cuda"),
    (lambda: EngineConfig(device="cuda:abc"), "--device must be 'auto', 'cpu' or 'cuda"),
    (lambda: EngineConfig(device="cuda:99999999999999999999"), "--device must be 'auto', 'cpu' or 'cuda"),
    (lambda: EngineConfig(lora_weight=""), "--lora-weight is empty"),
    (lambda: EngineConfig(config_path=""), "--config is empty"),
    (lambda: LMConfig(existing_text_padding_id=32000), "existing_text_padding_id out of range"),
    (lambda: _mimi(seanet=SeanetConfig(causal=False)), "seanet.causal must be true"),
    (lambda: _mimi(seanet=SeanetConfig(norm="weight_norm")), "weight-norm must be folded"),
    (lambda: _mimi(seanet=SeanetConfig(pad_mode="reflect")), "seanet.pad_mode"),
    (lambda: _mimi(quantizer=QuantizerConfig(n_q_semantic=0)), "n_q must exceed n_q_semantic"),
    (lambda: _mimi(transformer=MimiTransformerConfig(num_heads=7)), "d_model must be divisible by num_heads"),
    (lambda: _mimi(transformer=MimiTransformerConfig(gating="silu")), "gating must be 'none'"),
    (lambda: _mimi(channels=2), "only mono Mimi models"),
    (lambda: _mimi(sample_rate=16000), "Mimi must run at 24000 Hz"),
    (lambda: _mimi(seanet=SeanetConfig(ratios=(8, 6, 5, 3))), "integer multiple of the 12.5 Hz frame rate"),
    (lambda: _mimi(seanet=SeanetConfig(dimension=256)), "dimensions must equal seanet.dimension"),
])
def test_invalid_settings_say_what_to_change(build, match):
    with pytest.raises(ConfigError, match=match):
        build().validate()


@pytest.mark.parametrize("key, value, match", [
    ("dim", "64", "config.json's dim must be an integer of at most 2\\^31, got '64'"),
    ("dim", None, "dim must be an integer .*, got None"),
    ("dim", 64.0, "dim must be an integer .*, got 64.0"),
    ("context", True, "context must be an integer .*, got True"),
    ("delays", 5, "delays must be a list of integers .*, got 5"),
    ("delays", [0.5] * 17, "delays must be a list of integers"),
    ("gating", None, "gating must be a string, got None"),
    ("hidden_scale", "4", "hidden_scale must be a finite number .*, got '4'"),
    ("layer_scale", "0.1", "layer_scale must be a finite number of at most 1e9, or null"),
    ("causal", "true", "causal must be true or false"),
    ("dim", 10**30, "dim must be an integer of at most 2\\^31"),
    ("hidden_scale", 1e30, "hidden_scale must be a finite number of at most 1e9"),
    ("num_layers", 10**6, "num_layers must be at most 1024"),
    ("delays", [0] + [3000] * 16, r"delays must each be below the context \(3000\)"),
])
def test_config_json_values_of_the_wrong_type_are_named(key, value, match):
    """JSON gives "64", 64.0 or null as easily as 64: each fails by name, not deep in the model."""
    with pytest.raises(ConfigError, match=match):
        LMConfig.from_dict({key: value})


@pytest.mark.parametrize("raw, match", [
    ({"seanet": {"ratios": [8.0, 6, 5, 4]}}, "seanet.ratios must be a list of integers"),
    ({"seanet": {"n_filters": 4.0}}, "seanet.n_filters must be an integer .*, got 4.0"),
    ({"seanet": {"n_filters": 0}}, "seanet.n_filters must be positive"),
    ({"transformer": {"context": 250.5}}, "transformer.context must be an integer .*, got 250.5"),
    ({"transformer": {"num_heads": 0}}, "transformer.num_heads must be positive"),
    ({"quantizer": {"n_q": 10**6}}, "quantizer.n_q must be at most 1024"),
    ({"seanet": {"n_residual_layers": 10**6}}, "seanet.n_residual_layers must be at most 64"),
    ({"frame_rate": "12.5"}, "frame_rate must be a finite number"),
    ({"foo": 1}, r"unknown key\(s\) \['foo'\]"),
    ({"seanet": {"foo": 1}}, r"seanet has unknown key\(s\) \['foo'\]"),
    ({"quantizer": [1]}, "quantizer must be a JSON object"),
    ([], "must be a JSON object"),
])
def test_mimi_config_values_are_checked_by_name(raw, match):
    with pytest.raises(ConfigError, match=match):
        MimiConfig.from_dict(raw)


def test_the_gating_names_are_those_the_model_maps():
    from engine.config import GATING_ACTIVATIONS
    from engine.transformer import _ACTIVATIONS
    assert set(GATING_ACTIVATIONS) == set(_ACTIVATIONS)


@pytest.mark.parametrize("cfg", [EngineConfig(), ServeConfig(), SamplingConfig(), LMConfig(), MimiConfig()])
def test_defaults_are_valid(cfg):
    assert cfg.validate() is cfg


def test_auto_dtype_follows_the_device():
    import torch
    assert EngineConfig().torch_dtype == torch.float32
    assert EngineConfig(device="cuda:1").torch_dtype == torch.bfloat16
    assert EngineConfig(device="cuda", dtype="float16").torch_dtype == torch.float16


def test_auto_device_is_cuda_only_where_torch_sees_a_gpu(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert EngineConfig().device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert EngineConfig().device == "cuda"
    assert EngineConfig(device="auto").torch_dtype == torch.bfloat16
    assert EngineConfig(device="cpu").device == "cpu"


def test_the_engine_takes_the_cores_the_api_processes_leave():
    assert default_engine_threads(1, cores=2) == 1
    assert default_engine_threads(4, cores=16) == 12
    assert default_engine_threads(4, cores=2) == 1
    assert ServeConfig(api_workers=1, engine_threads=3).threads == 3


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineConfig().max_sessions = 3


def test_lm_config_round_trips_through_kyutai_json_keys():
    cfg = LMConfig(dim=64, num_heads=4, num_layers=2, context=10)
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown key 'flux'"):
        LMConfig.from_dict({**cfg.to_dict(), "flux": 1})
    with pytest.raises(ConfigError, match="lockstep supports only False"):
        LMConfig.from_dict({**cfg.to_dict(), "cross_attention": True})
    assert MimiConfig.from_dict(MimiConfig().to_dict()) == MimiConfig()
    with pytest.raises(ConfigError, match=r"seanet has unknown key\(s\) \[.flux.\]"):
        MimiConfig.from_dict({"seanet": {"flux": 1}})


def test_lm_gen_config_gives_the_sampling_defaults():
    assert SamplingConfig.from_lm_gen_config({}) == SamplingConfig()
    got = SamplingConfig.from_lm_gen_config({"temp": 0.6, "temp_text": 0.5, "top_k": 100, "top_k_text": 10,
                                             "cfg_coef": 1.0, "check": True})
    assert got == SamplingConfig(temperature=0.6, text_temperature=0.5, top_k=100, text_top_k=10)
    assert SamplingConfig.from_lm_gen_config({"use_sampling": False}).greedy


@pytest.mark.parametrize("raw, match", [
    ({"cfg_coef": 3.0}, "sets cfg_coef=3.0, which lockstep does not support"),
    ({"support_out_of_sync": True}, "support_out_of_sync"),
    ({"temp": "hot"}, "lm_gen_config.temp must be a number"),
    ({"top_k": 2.5}, "lm_gen_config.top_k must be an integer"),
    ({"use_sampling": "false"}, "use_sampling must be true or false"),
    ({"temp": -1}, "lm_gen_config: temperature must be a number in"),
    ({"beam": 4}, "unknown key 'beam'"),
    ([1], "must be a JSON object"),
])
def test_bad_lm_gen_config_says_what(raw, match):
    with pytest.raises(ConfigError, match=match):
        SamplingConfig.from_lm_gen_config(raw)
