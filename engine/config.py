"""Typed, validated configuration for Mimi, the Moshi LM and the engine.

The JSON layouts are those of kyutai's checkpoints (`config.json` for the LM, the optional Mimi
config file), so a directory laid out like `kyutai/moshiko-pytorch-bf16` loads unchanged.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

SAMPLE_RATE = 24000
FRAME_RATE = 12.5
FRAME_SIZE = 1920

MOSHI_NAME = "model.safetensors"
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_NAME = "tokenizer_spm_32k_3.model"


class ConfigError(ValueError):
    """A configuration value is invalid; the message says what to change."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the model."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


# What each field annotation of the checkpoint configs admits; JSON gives 512.0, "512" or null as
# readily as 512, and they must fail here, by name, not as a TypeError deep in the model.
_ADMITS: dict[str, tuple[str, Any]] = {
    "int": ("an integer of at most 2^31", lambda v: _is_int(v) and abs(v) <= 2**31),
    "float": ("a finite number of at most 1e9", lambda v: _is_float(v) and abs(v) <= 1e9),
    "float | None": ("a finite number of at most 1e9, or null", lambda v: v is None or _is_float(v) and abs(v) <= 1e9),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "str | None": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "tuple[int, ...]": ("a list of integers of at most 2^31",
                        lambda v: isinstance(v, tuple) and all(_is_int(x) and abs(x) <= 2**31 for x in v)),
}


def _check_types(obj: Any, where: str) -> None:
    """Every field of a config dataclass holds a value of its annotated type."""
    for f in dataclasses.fields(obj):
        if f.type in _ADMITS:
            what, admits = _ADMITS[f.type]
            value = getattr(obj, f.name)
            _check(admits(value), f"{where}{f.name} must be {what}, got {value!r}")


def flag_name(field_name: str) -> str:
    """The command-line flag of an EngineConfig/ServeConfig field."""
    return "--" + {"config_path": "config"}.get(field_name, field_name.replace("_", "-"))


def _positive(obj: Any, where: str, *names: str) -> None:
    for name in names:
        _check(getattr(obj, name) > 0, f"{where}{name} must be positive, got {getattr(obj, name)!r}")


def _at_most(obj: Any, where: str, limit: int, *names: str) -> None:
    """Counts no Moshi-family checkpoint comes near; past them, building the model would hang."""
    for name in names:
        _check(getattr(obj, name) <= limit, f"{where}{name} must be at most {limit}, got {getattr(obj, name)!r}")


def _as_tuple(value: Any) -> Any:
    """JSON lists become the tuples the frozen configs hold; anything else is left for the type check."""
    return tuple(value) if isinstance(value, list) else value


# Activation names a gated feed-forward takes (kyutai's gating), as engine/transformer.py maps them.
GATING_ACTIVATIONS = ("silu", "gelu", "relu", "elu", "sigmoid", "tanh")


@dataclass(frozen=True)
class SeanetConfig:
    channels: int = 1
    dimension: int = 512
    causal: bool = True
    n_filters: int = 64
    n_residual_layers: int = 1
    activation: str = "ELU"
    compress: int = 2
    dilation_base: int = 2
    disable_norm_outer_blocks: int = 0
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    norm: str = "none"
    pad_mode: str = "constant"
    ratios: tuple[int, ...] = (8, 6, 5, 4)
    true_skip: bool = True

    def validate(self) -> None:
        _check_types(self, "seanet.")
        _positive(self, "seanet.", "dimension", "n_filters", "n_residual_layers", "compress", "dilation_base",
                  "kernel_size", "residual_kernel_size", "last_kernel_size")
        _at_most(self, "seanet.", 64, "n_residual_layers")
        _check(len(self.ratios) <= 16, "seanet.ratios must have at most 16 entries")
        _check(self.causal, "seanet.causal must be true: lockstep only streams causal Mimi models")
        _check(self.activation == "ELU", f"seanet.activation {self.activation!r} unsupported; use 'ELU'")
        _check(self.norm == "none", "seanet.norm must be 'none' (weight-norm must be folded into the weights)")
        _check(self.pad_mode in ("constant", "replicate"), "seanet.pad_mode must be 'constant' or 'replicate'")
        _check(self.true_skip, "seanet.true_skip must be true")
        _check(len(self.ratios) > 0 and all(r > 0 for r in self.ratios), "seanet.ratios must be positive integers")

    @property
    def hop_length(self) -> int:
        out = 1
        for r in self.ratios:
            out *= r
        return out


@dataclass(frozen=True)
class QuantizerConfig:
    dimension: int = 256
    n_q: int = 32
    bins: int = 2048
    input_dimension: int = 512
    output_dimension: int = 512
    n_q_semantic: int = 1

    def validate(self) -> None:
        _check_types(self, "quantizer.")
        _positive(self, "quantizer.", "dimension", "input_dimension", "output_dimension")
        _at_most(self, "quantizer.", 1024, "n_q")
        _check(self.n_q > self.n_q_semantic >= 1, "quantizer.n_q must exceed n_q_semantic (>= 1)")
        _check(self.bins > 1, f"quantizer.bins must be at least 2, got {self.bins}")


@dataclass(frozen=True)
class MimiTransformerConfig:
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    causal: bool = True
    layer_scale: float | None = 0.01
    context: int = 250
    conv_layout: bool = True
    max_period: float = 10000
    gating: str = "none"
    norm: str = "layer_norm"
    positional_embedding: str = "rope"
    dim_feedforward: int = 2048
    input_dimension: int = 512
    output_dimensions: tuple[int, ...] = (512,)

    def validate(self) -> None:
        _check_types(self, "transformer.")
        _positive(self, "transformer.", "d_model", "num_heads", "num_layers", "context", "max_period",
                  "dim_feedforward", "input_dimension")
        _at_most(self, "transformer.", 1024, "num_layers")
        _check(self.causal, "transformer.causal must be true for streaming")
        _check(self.d_model % self.num_heads == 0, "transformer.d_model must be divisible by num_heads")
        _check(self.positional_embedding == "rope", "Mimi transformer needs positional_embedding 'rope'")
        _check(self.norm in ("layer_norm", "rms_norm", "rms_norm_f32", "layer_norm_f32"),
               f"transformer.norm {self.norm!r} unsupported")
        _check(self.gating == "none", "Mimi transformer gating must be 'none'")
        _check(len(self.output_dimensions) == 1, "Mimi transformer must have exactly one output")


@dataclass(frozen=True)
class MimiConfig:
    sample_rate: int = SAMPLE_RATE
    channels: int = 1
    frame_rate: float = FRAME_RATE
    seanet: SeanetConfig = field(default_factory=SeanetConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    transformer: MimiTransformerConfig = field(default_factory=MimiTransformerConfig)

    @property
    def frame_size(self) -> int:
        return int(self.sample_rate / self.frame_rate)

    @property
    def encoder_frame_rate(self) -> float:
        return self.sample_rate / self.seanet.hop_length

    @property
    def resample_stride(self) -> int:
        return int(self.encoder_frame_rate / self.frame_rate)

    def validate(self) -> "MimiConfig":
        _check_types(self, "the Mimi config's ")
        self.seanet.validate()
        self.quantizer.validate()
        self.transformer.validate()
        _check(self.channels == 1 and self.seanet.channels == 1, "only mono Mimi models are supported")
        _check(self.sample_rate == SAMPLE_RATE and self.frame_rate == FRAME_RATE,
               f"Mimi must run at {SAMPLE_RATE} Hz / {FRAME_RATE} Hz frames")
        stride = self.encoder_frame_rate / self.frame_rate
        _check(stride == int(stride) and stride >= 1,
               "the SEANet hop length must give an integer multiple of the 12.5 Hz frame rate")
        _check(self.transformer.d_model == self.seanet.dimension == self.transformer.input_dimension
               == self.transformer.output_dimensions[0],
               "Mimi transformer dimensions must equal seanet.dimension")
        _check(self.quantizer.input_dimension == self.quantizer.output_dimension == self.seanet.dimension,
               "quantizer input/output dimensions must equal seanet.dimension")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seanet"]["ratios"] = list(self.seanet.ratios)
        d["transformer"]["output_dimensions"] = list(self.transformer.output_dimensions)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "MimiConfig":
        _check(isinstance(d, dict), "the Mimi config must be a JSON object")
        parts = {"seanet": SeanetConfig, "quantizer": QuantizerConfig, "transformer": MimiTransformerConfig}
        top = {"sample_rate", "channels", "frame_rate", *parts}
        unknown = sorted(set(d) - top)
        _check(not unknown, f"the Mimi config has unknown key(s) {unknown}; it takes {sorted(top)}")
        built: dict[str, Any] = {k: d[k] for k in ("sample_rate", "channels", "frame_rate") if k in d}
        for name, cls in parts.items():
            raw = d.get(name, {})
            _check(isinstance(raw, dict), f"the Mimi config's {name} must be a JSON object")
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(raw) - known)
            _check(not unknown, f"the Mimi config's {name} has unknown key(s) {unknown}")
            built[name] = cls(**{k: _as_tuple(v) for k, v in raw.items()})
        return MimiConfig(**built).validate()


# Keys of kyutai's config.json that describe features lockstep does not implement; each must hold
# the value given here (the one every Moshi dialogue checkpoint uses).
_FIXED_LM_KEYS: dict[str, Any] = {
    "demux_second_stream": False, "demux_second_text_stream": False, "text_card_out": None,
    "norm_emb": False, "bias_proj": False, "depformer_norm": None, "depformer_low_rank_embeddings": None,
    "depformer_weights_per_step_schedule": None, "cross_attention": False, "kv_repeat": 1,
    "conditioners": None, "fuser": None, "extra_heads_num_heads": 0,
}
# Keys that name files or describe uses outside the LM, or how its weights are stored (a LoRA adapter
# is folded in and q8 weights dequantized at load: engine/lora.py, engine/checkpoint.py).
_META_KEYS = {"moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name", "model_type",
              "lora", "lora_name", "lora_rank", "lora_scaling", "quantize",
              "lm_gen_config", "tts_config", "stt_config", "model_id", "depformer_causal",
              "existing_text_end_padding_id", "extra_heads_dim"}


@dataclass(frozen=True)
class LMConfig:
    dim: int = 4096
    text_card: int = 32000
    existing_text_padding_id: int = 3
    n_q: int = 16
    dep_q: int = 8
    card: int = 2048
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.125
    causal: bool = True
    layer_scale: float | None = None
    context: int = 3000
    max_period: float = 10000
    gating: str = "silu"
    norm: str = "rms_norm_f32"
    positional_embedding: str = "rope"
    depformer_dim: int = 1024
    depformer_dim_feedforward: int = int(4.125 * 1024)
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    depformer_layer_scale: float | None = None
    depformer_multi_linear: bool = True
    depformer_context: int = 8
    depformer_max_period: float = 10000
    depformer_gating: str = "silu"
    depformer_pos_emb: str = "none"
    depformer_weights_per_step: bool = True
    delays: tuple[int, ...] = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)

    @property
    def num_codebooks(self) -> int:
        return self.n_q + 1

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def num_user_codebooks(self) -> int:
        return self.n_q - self.dep_q

    @property
    def mimi_codebooks(self) -> int:
        return max(self.dep_q, self.n_q - self.dep_q)

    def validate(self) -> "LMConfig":
        _check_types(self, "config.json's ")
        _positive(self, "config.json's ", "dim", "text_card", "n_q", "card", "num_heads", "num_layers",
                  "hidden_scale", "context", "max_period", "depformer_dim", "depformer_dim_feedforward",
                  "depformer_num_heads", "depformer_num_layers", "depformer_context", "depformer_max_period")
        _at_most(self, "config.json's ", 1024, "num_layers", "depformer_num_layers", "n_q", "depformer_context")
        _check(self.gating in GATING_ACTIVATIONS and self.depformer_gating in GATING_ACTIVATIONS,
               f"gating and depformer_gating must be one of {GATING_ACTIVATIONS}, got {self.gating!r} "
               f"and {self.depformer_gating!r}")
        _check(len(self.delays) == self.n_q + 1,
               f"delays has {len(self.delays)} entries; it needs n_q + 1 = {self.n_q + 1}")
        _check(all(d >= 0 for d in self.delays), "delays must be non-negative")
        _check(max(self.delays) < self.context,
               f"config.json's delays must each be below the context ({self.context}), got {list(self.delays)}")
        _check(0 < self.dep_q <= self.n_q, "dep_q must be in 1..n_q (a depth transformer is required)")
        _check(self.dim % self.num_heads == 0, "dim must be divisible by num_heads")
        _check(self.depformer_dim % self.depformer_num_heads == 0,
               "depformer_dim must be divisible by depformer_num_heads")
        _check(self.causal, "causal must be true")
        _check(self.positional_embedding == "rope", "positional_embedding must be 'rope'")
        _check(self.depformer_pos_emb == "none", "depformer_pos_emb must be 'none'")
        _check(self.norm in ("rms_norm_f32", "rms_norm", "layer_norm", "layer_norm_f32"),
               f"norm {self.norm!r} unsupported")
        _check(self.depformer_weights_per_step, "depformer_weights_per_step must be true")
        _check(0 <= self.existing_text_padding_id < self.text_card, "existing_text_padding_id out of range")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["delays"] = list(self.delays)
        return d

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> "LMConfig":
        names = {f.name for f in dataclasses.fields(LMConfig)}
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key in names:
                kwargs[key] = _as_tuple(value)
            elif key in _FIXED_LM_KEYS:
                expected = _FIXED_LM_KEYS[key]
                _check(value == expected or (expected is None and not value),
                       f"config.json sets {key}={value!r}; lockstep supports only {expected!r} "
                       "(a Moshi dialogue checkpoint)")
            elif key not in _META_KEYS:
                raise ConfigError(f"config.json has unknown key {key!r}; remove it or check the checkpoint")
        dep_dim = kwargs.get("depformer_dim", LMConfig.depformer_dim)
        scale = kwargs.get("hidden_scale", LMConfig.hidden_scale)
        if kwargs.get("depformer_dim_feedforward", 0) is None and _is_int(dep_dim) and _is_float(scale):
            # kyutai's rule for an unset depth FFN width (other types fail the type check, by name).
            kwargs["depformer_dim_feedforward"] = int(scale * dep_dim)
        return LMConfig(**kwargs).validate()


MAX_TEMPERATURE = 10.0  # far past any useful setting; bounds what a caller can ask
MAX_TOP_K = 2**31 - 1


@dataclass(frozen=True)
class SamplingConfig:
    """Per-session sampling settings (the reference's LMGen defaults)."""
    greedy: bool = False
    temperature: float = 0.8
    top_k: int = 250
    text_temperature: float = 0.7
    text_top_k: int = 25
    seed: int | None = None

    def validate(self, name: Callable[[str], str] = str) -> "SamplingConfig":
        """`name` says each field as the caller knows it (a CLI flag, a JSON key)."""
        for f in ("temperature", "text_temperature"):
            t = getattr(self, f)
            _check(isinstance(t, (int, float)) and math.isfinite(t) and 0 <= t <= MAX_TEMPERATURE,
                   f"{name(f)} must be a number in 0..{MAX_TEMPERATURE}, got {t!r}")
        for f in ("top_k", "text_top_k"):
            k = getattr(self, f)
            _check(isinstance(k, int) and 0 <= k <= MAX_TOP_K,
                   f"{name(f)} must be an integer in 0..{MAX_TOP_K} (0, or any value at or past the vocabulary, "
                   f"samples over all of it), got {k!r}")
        _check(self.seed is None or 0 <= self.seed < 2**63, f"{name('seed')} must be in [0, 2**63), got {self.seed}")
        return self

    def overridden(self, given: dict[str, Any], name: Callable[[str], str] = str) -> "SamplingConfig":
        """These settings with what a caller gave in their place (None: not given), validated."""
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None}).validate(name)

    @staticmethod
    def from_lm_gen_config(raw: Any) -> "SamplingConfig":
        """A checkpoint's own sampling defaults: config.json's `lm_gen_config`, the keyword arguments
        kyutai's server passes its LMGen. Settings for features lockstep lacks must keep the value
        that leaves them off."""
        _check(isinstance(raw, dict), f"config.json's lm_gen_config must be a JSON object, got {raw!r}")
        names = {"temp": "temperature", "temp_text": "text_temperature", "top_k": "top_k",
                 "top_k_text": "text_top_k"}
        off = {"cfg_coef": 1.0, "check": None, "support_out_of_sync": False, "cfg_is_masked_until": None,
               "cfg_is_no_text": False}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key in names:
                integer = key.startswith("top_k")
                _check(isinstance(value, int if integer else (int, float)) and not isinstance(value, bool),
                       f"config.json's lm_gen_config.{key} must be {'an integer' if integer else 'a number'}, "
                       f"got {value!r}")
                values[names[key]] = value
            elif key == "use_sampling":
                _check(isinstance(value, bool), f"config.json's lm_gen_config.use_sampling must be true or false, "
                       f"got {value!r}")
                values["greedy"] = not value
            elif key in off:
                _check(off[key] is None or value == off[key] or (not off[key] and not value),
                       f"config.json's lm_gen_config sets {key}={value!r}, which lockstep does not support "
                       f"(it needs {off[key]!r})")
            else:
                raise ConfigError(f"config.json's lm_gen_config has unknown key {key!r}")
        try:
            return SamplingConfig(**values).validate()
        except ConfigError as e:
            raise ConfigError(f"config.json's lm_gen_config: {e}") from None


DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_POLICIES = ("reserve", "elastic")
KV_DTYPES = ("auto", "bf16", "fp16", "fp32", "fp8")


@dataclass(frozen=True)
class KVConfig:
    """The LM's KV pool (engine/kv/pool.py, docs/kv.md): how sessions get pages, what a page
    holds, how many there are."""
    policy: str = "reserve"  # reserve: a session's whole context is promised when it is admitted
    min_seconds: float = 60.0  # elastic: the context every admitted session is promised
    dtype: str = "auto"  # auto: the LM's dtype
    pages: int = 0  # 0: as many as the device's free memory holds (or the slots need)
    page_size: int = 16  # positions (80 ms frames) a page holds

    def validate(self) -> "KVConfig":
        _check(self.policy in KV_POLICIES, f"--kv-policy must be reserve or elastic, got {self.policy!r}")
        _check(self.dtype in KV_DTYPES, f"--kv-dtype must be one of {', '.join(KV_DTYPES)}, got {self.dtype!r}")
        _check(_is_float(self.min_seconds) and 0 < self.min_seconds <= 1e6,
               f"--kv-min-seconds must be a number in (0, 1e6], got {self.min_seconds!r}")
        _check(_is_int(self.pages) and 0 <= self.pages <= 2**31 - 2,
               f"--kv-pages must be an integer >= 0 (0: sized from memory), got {self.pages!r}")
        _check(_is_int(self.page_size) and 1 <= self.page_size <= 4096,
               f"--kv-page-size must be an integer in 1..4096, got {self.page_size!r}")
        return self

    @property
    def min_positions(self) -> int:
        return max(1, math.ceil(self.min_seconds * FRAME_RATE))

    def torch_dtype(self, lm_dtype):
        """The pool's dtype: "auto" is the LM's; fp8 is e4m3 (with per-position scales)."""
        import torch
        if self.dtype == "auto":
            return lm_dtype
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                "fp8": torch.float8_e4m3fn}[self.dtype]


@dataclass(frozen=True)
class EngineConfig:
    """What `lockstep` commands share: where the model lives and how to run it."""
    model_dir: str | None = None
    hf_repo: str | None = None
    moshi_weight: str | None = None
    mimi_weight: str | None = None
    tokenizer: str | None = None
    config_path: str | None = None
    lora_weight: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_sessions: int = 8
    kernels: str = "auto"
    batch_invariant: bool = False
    kv_policy: str = "reserve"
    kv_min_seconds: float = 60.0
    kv_dtype: str = "auto"
    kv_pages: int = 0
    kv_page_size: int = 16

    def __post_init__(self) -> None:
        # Resolved once, here, so every later reader (dtype, loading, capacity) sees a concrete device.
        if self.device == "auto":
            import torch
            object.__setattr__(self, "device", "cuda" if torch.cuda.is_available() else "cpu")

    def validate(self) -> "EngineConfig":
        _check(not (self.model_dir and self.hf_repo), "give either --model-dir or --hf-repo, not both")
        _check(self.dtype in DTYPES, f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        _check(self.max_sessions >= 0, f"--max-sessions must be >= 1, or 0 for as many as fit in memory; "
               f"got {self.max_sessions}")
        _check(self.kernels in ("auto", "torch", "triton"), "--kernels must be auto, torch or triton")
        _check(re.fullmatch(r"cpu|cuda(:\d{1,3})?", self.device) is not None,
               f"--device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("model_dir", "hf_repo", "moshi_weight", "mimi_weight", "tokenizer", "config_path",
                     "lora_weight"):
            # An empty value (an unset shell variable, say) would otherwise read as not given.
            _check(getattr(self, name) != "", f"{flag_name(name)} is empty; give a path or leave it out")
        self.kv.validate()
        return self

    @property
    def kv(self) -> KVConfig:
        return KVConfig(self.kv_policy, self.kv_min_seconds, self.kv_dtype, self.kv_pages, self.kv_page_size)

    @property
    def torch_dtype(self):
        """The LM's dtype; "auto" is bfloat16 on CUDA (the released checkpoints' dtype) and float32
        on CPU (the path that reproduces the reference's tokens)."""
        import torch
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)


def from_dict(cls, values: dict):
    """A config dataclass from a JSON object of its fields (lists back to the tuples it holds)."""
    return cls(**{f.name: _as_tuple(values[f.name]) for f in dataclasses.fields(cls) if f.name in values})


# A real-time loop passes its top at least every frame; this long without it, it is stuck (a hung
# device, a deadlock) and liveness fails, so an orchestrator restarts the server.
STALL_SECONDS = 5.0


def default_api_workers(cores: int | None = None) -> int:
    """API processes for a machine: one per 4 cores, at least 1 and at most 4 (at 128 sessions an
    API core is busy for ~20% of a frame; the rest of the cores stay with the engine's host work)."""
    cores = cores or os.cpu_count() or 1
    return max(1, min(4, cores // 4))


def default_engine_threads(api_workers: int, cores: int | None = None) -> int:
    """CPU threads for the engine's tensor work: the cores the API processes leave. Torch's threads
    wait for one another at every operation, so one of them preempted by an API process (a flood of
    connections) stalls the whole tick: on 2 cores, 2 threads gave 50 ticks over 80 ms in a minute of
    floods, 1 thread none."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores - api_workers)


@dataclass(frozen=True)
class ServeConfig:
    """What `lockstep serve` adds to the engine settings."""
    host: str = "127.0.0.1"
    port: int = 8998
    api_key: tuple[str, ...] = ()
    admission_wait: float = 2.0
    max_body_mb: float = 512.0
    idle_timeout: float = 30.0
    shutdown_timeout: float = 30.0
    max_buffer_seconds: float = 10.0
    no_warmup: bool = False
    admit_realtime: bool = False
    static: str | None = None
    api_workers: int = 0
    engine_threads: int = 0
    max_input_lag: float = 0.3
    metrics_port: int | None = None
    head_timeout: float = 5.0
    engine_timeout: float = 30.0
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    session_prefix: str = ""
    opus_complexity: int = 5
    opus_bitrate: int = 56

    def validate(self) -> "ServeConfig":
        _check(0 < self.port < 65536, f"--port must be in 1..65535, got {self.port}")
        # An empty key would let a request with an empty bearer token in (e.g. `--api-key "$KEY"` with
        # KEY unset in a start script): refused rather than served open.
        _check(all(k.strip() for k in self.api_key), "--api-key must not be empty (or blank)")
        _check(self.admission_wait >= 0, "--admission-wait must be >= 0 seconds")
        _check(self.max_body_mb > 0, "--max-body-mb must be positive")
        _check(self.idle_timeout > 0, "--idle-timeout must be positive (seconds)")
        _check(self.shutdown_timeout >= 0, "--shutdown-timeout must be >= 0 seconds")
        _check(self.max_buffer_seconds >= 0.08, "--max-buffer-seconds must hold at least one 80 ms frame")
        _check(not (self.admit_realtime and self.no_warmup),
               "--admit-realtime admits as many sessions as the start-up capacity probe finds run in real "
               "time, which --no-warmup skips: drop one of them")
        _check(0 <= self.api_workers <= 64, f"--api-workers must be in 0..64 (0: by the machine's cores), "
               f"got {self.api_workers}")
        _check(0 <= self.engine_threads <= 1024, f"--engine-threads must be in 0..1024 (0: the cores the API "
               f"processes leave), got {self.engine_threads}")
        _check(0.08 <= self.max_input_lag <= self.max_buffer_seconds,
               "--max-input-lag must hold at least one 80 ms frame and at most --max-buffer-seconds")
        _check(self.metrics_port is None or (0 < self.metrics_port < 65536 and self.metrics_port != self.port),
               f"--metrics-port must be in 1..65535 and differ from --port, got {self.metrics_port}")
        _check(0 < self.head_timeout <= 600, "--head-timeout must be in (0, 600] seconds")
        _check(self.engine_timeout > STALL_SECONDS, f"--engine-timeout must be more than {STALL_SECONDS:g} s (when "
               "liveness already fails)")
        _check(re.fullmatch(r"[A-Za-z0-9_.-]{0,40}", self.session_prefix) is not None,
               "--session-prefix must be at most 40 letters, digits, '_', '.' or '-'")
        _check(_is_int(self.opus_complexity) and 0 <= self.opus_complexity <= 10,
               f"--opus-complexity must be an integer in 0..10, got {self.opus_complexity!r}")
        _check(_is_int(self.opus_bitrate) and (self.opus_bitrate == 0 or 6 <= self.opus_bitrate <= 510),
               f"--opus-bitrate must be 0 (libopus's choice) or 6..510 kbit/s, got {self.opus_bitrate!r}")
        if self.static is not None:
            _check(os.path.isfile(os.path.join(self.static, "index.html")),
                   f"--static {self.static} must be a folder holding index.html (the web UI's built 'dist' folder)")
        # Browsers give the microphone only to secure contexts: another machine needs HTTPS.
        _check((self.ssl_certfile is None) == (self.ssl_keyfile is None),
               "--ssl-certfile and --ssl-keyfile go together (a certificate and its private key)")
        for flag, path in (("--ssl-certfile", self.ssl_certfile), ("--ssl-keyfile", self.ssl_keyfile)):
            _check(path is None or os.path.isfile(path), f"{flag} {path} is not a file")
        return self

    @property
    def workers(self) -> int:
        """API processes to start."""
        return self.api_workers or default_api_workers()

    @property
    def threads(self) -> int:
        """The engine's CPU threads."""
        return self.engine_threads or default_engine_threads(self.workers)

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_certfile else 'http'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class ClusterConfig:
    """What `lockstep serve --ray` adds: one engine per replica on a Ray cluster (api/cluster.py)."""
    ray: bool = False
    address: str | None = None
    replicas: int = 0
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_slot_usage: float = 0.75
    downscale_delay: float = 60.0
    replica_cpus: float = 1.0
    routing_stats_period: float = 0.25

    def validate(self) -> "ClusterConfig":
        _check(self.replicas >= 0, f"--replicas must be >= 0 (0: one per GPU, or 1 without), got {self.replicas}")
        bounds = (self.min_replicas, self.max_replicas)
        _check((bounds[0] is None) == (bounds[1] is None), "give --min-replicas and --max-replicas together")
        if bounds[0] is not None:
            _check(0 <= bounds[0] <= bounds[1] and bounds[1] >= 1,
                   f"--min-replicas/--max-replicas must satisfy 0 <= min <= max, max >= 1; got {bounds}")
            _check(not self.replicas or bounds[0] <= self.replicas <= bounds[1],
                   "with --min-replicas/--max-replicas, --replicas (the count to start with) must lie between them")
        _check(0 < self.target_slot_usage <= 1, "--target-slot-usage must be in (0, 1]")
        _check(self.downscale_delay >= 0, "--downscale-delay must be >= 0 seconds")
        _check(self.replica_cpus > 0, "--replica-cpus must be positive")
        _check(0.05 <= self.routing_stats_period <= 60, "--routing-stats-period must be in [0.05, 60] seconds")
        return self
