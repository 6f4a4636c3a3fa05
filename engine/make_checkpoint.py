"""`lockstep make-checkpoint`: random-weight checkpoints in the kyutai repository layout.

Every structural flag of Moshi 7B / Mimi is kept (16 streams, 8 generated codebooks, acoustic
delays, SiLU gating, fp32 RMSNorm, RoPE, per-step depth weights, split RVQ, SEANet ratios); only
sizes shrink. Weights are random but scaled so greedy choices are decisive.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.capacity import free_bytes, weight_bytes
from engine.config import (MIMI_NAME, MOSHI_NAME, TOKENIZER_NAME, ConfigError, LMConfig, MimiConfig,
                           MimiTransformerConfig, QuantizerConfig, SeanetConfig)
from engine.lm import MoshiLM
from engine.lora import DEFAULT_SCALING
from engine.mimi import Mimi
from engine.tokenizer import train_tokenizer

TINY_LM = LMConfig(dim=64, text_card=256, num_heads=4, num_layers=2, context=3000, depformer_dim=32,
                   depformer_dim_feedforward=int(4.125 * 32), depformer_num_heads=2, depformer_num_layers=2)
SMALL_LM = LMConfig(dim=512, text_card=1000, num_heads=8, num_layers=6, context=3000, depformer_dim=256,
                    depformer_dim_feedforward=int(4.125 * 256), depformer_num_heads=4, depformer_num_layers=4)
TINY_MIMI = MimiConfig(
    seanet=SeanetConfig(dimension=32, n_filters=4),
    quantizer=QuantizerConfig(dimension=16, input_dimension=32, output_dimension=32),
    transformer=MimiTransformerConfig(d_model=32, num_heads=2, num_layers=2, dim_feedforward=64,
                                      input_dimension=32, output_dimensions=(32,)))

PRESETS: dict[str, tuple[LMConfig, MimiConfig]] = {
    "tiny": (TINY_LM, TINY_MIMI),          # everything tiny: fast tests
    "tiny-lm": (TINY_LM, MimiConfig()),    # tiny LM, full-size Mimi
    "small": (SMALL_LM, MimiConfig()),     # a few-M-parameter LM for CPU benchmarks
    "7b": (LMConfig(), MimiConfig()),      # real shapes, random weights (~46 GB of host memory to write)
}
MIMI_CONFIG_NAME = "mimi_config.json"
LORA_NAME = "lora.safetensors"
Q8_NAME = "model.q8.safetensors"  # kyutai's name in its -q8 repositories


def _randomize_lm(lm: MoshiLM, gen: torch.Generator) -> None:
    for name, p in lm.named_parameters():
        if name.endswith("alpha"):
            p.data.uniform_(0.8, 1.2, generator=gen)
        elif "emb" in name:
            p.data.normal_(0, 1.0, generator=gen)
        elif name.startswith(("text_linear", "linears")):
            p.data.normal_(0, 4 / math.sqrt(p.shape[1]), generator=gen)
        else:
            p.data.normal_(0, 1 / math.sqrt(p.shape[1]), generator=gen)


def _randomize_mimi(mimi: Mimi, gen: torch.Generator) -> None:
    for name, p in mimi.named_parameters():
        if p.dim() == 1 and name.endswith(("weight", "scale")) and "conv" not in name:
            p.data.uniform_(0.8, 1.2, generator=gen) if name.endswith("weight") else p.data.fill_(0.1)
        elif p.dim() == 1:
            p.data.normal_(0, 0.02, generator=gen)
        else:
            fan_in = p[0].numel()
            p.data.normal_(0, 1 / math.sqrt(fan_in), generator=gen)
    for name, buf in mimi.named_buffers():
        if name.endswith("embedding_sum"):
            buf.normal_(0, 1.0, generator=gen)
        elif name.endswith("cluster_usage"):
            buf.uniform_(0.5, 2.0, generator=gen)
        elif name.endswith("_initialized"):
            buf.fill_(1.0)


def _fuse_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stores per-step attention projections (and q8 scales) fused, as kyutai's released files do."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, value in state.items():
        for split, fused in ((".self_attn.in_projs.", ".self_attn.in_proj_weight"),
                             (".self_attn.out_projs.", ".self_attn.out_proj.weight")):
            if split in key:
                prefix, rest = key.split(split)
                suffix = "_scb" if rest.endswith("_scb") else ""
                groups.setdefault(prefix + fused + suffix, []).append((int(rest.split(".")[0]), value))
                break
        else:
            out[key] = value
    for key, parts in groups.items():
        out[key] = torch.cat([v for _, v in sorted(parts, key=lambda p: p[0])], dim=0)
    return out


def _random_lora(lm: MoshiLM, rank: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """An adapter on every linear layer, as moshi-finetune trains one, large enough to change
    greedy choices (a trained adapter starts from B = 0 and moves away from it)."""
    out = {}
    for name, m in lm.named_modules():
        if isinstance(m, torch.nn.Linear):
            out[f"{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=gen) / math.sqrt(m.in_features)
            out[f"{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=gen) * (0.5 / math.sqrt(rank))
    return out


def _q8(state: dict[str, torch.Tensor], lm: MoshiLM) -> dict[str, torch.Tensor]:
    """Every linear weight as kyutai's -q8 files store it (bitsandbytes' row-wise int8 of the bf16
    weights): int8 rows `X.weight` and each row's absolute maximum `X.weight_scb` (float32); other
    tensors in bf16."""
    out = {k: v.to(torch.bfloat16) for k, v in state.items()}
    for name, m in lm.named_modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight.detach().to(torch.bfloat16).float()  # kyutai quantized its bf16 release
            scb = w.abs().amax(dim=1)
            out[f"{name}.weight"] = (w * (127 / scb.clamp_min(1e-30)).unsqueeze(1)).round().to(torch.int8)
            out[f"{name}.weight_scb"] = scb
    return out


def make_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0, context: int | None = None,
                    mimi_context: int | None = None, lora_rank: int | None = None, q8: bool = False) -> Path:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    lm_cfg, mimi_cfg = PRESETS[preset]
    for flag, value in (("--context", context), ("--mimi-context", mimi_context)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value}")
    if context is not None:
        lm_cfg = dataclasses.replace(lm_cfg, context=context)
    if mimi_context is not None:
        mimi_cfg = dataclasses.replace(mimi_cfg, transformer=dataclasses.replace(mimi_cfg.transformer,
                                                                                   context=mimi_context))
    lm_cfg.validate()
    mimi_cfg.validate()
    if lora_rank is not None and lora_rank < 1:
        raise ConfigError(f"--lora-rank must be a positive integer, got {lora_rank}")
    if not 0 <= seed < 2**63:
        raise ConfigError(f"--seed must be in 0..2^63-1, got {seed}")
    if not str(out_dir):
        raise ConfigError("make-checkpoint: the folder is empty; name one")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder; make-checkpoint writes only a new one")
    _check_host_memory(lm_cfg, mimi_cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and moved into place whole: a run that dies leaves no half
    # checkpoint there, and of two runs at once one fails instead of mixing their files.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 is for the scratch, not for the checkpoint
    try:
        _write(tmp, lm_cfg, mimi_cfg, seed, lora_rank, q8)
        if out.exists():
            out.rmdir()  # empty, as checked; fails if another run filled it meanwhile
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_host_memory(lm_cfg: LMConfig, mimi_cfg: MimiConfig) -> None:
    """The LM is made in float32 and saved from a bfloat16 copy: refuse before allocating what the
    host does not have (the 7b preset needs ~46 GB)."""
    with torch.device("meta"):
        lm, mimi = MoshiLM(lm_cfg), Mimi(mimi_cfg)
    need = weight_bytes(lm, torch.float32) + weight_bytes(lm, torch.bfloat16) + 2 * weight_bytes(mimi)
    free = free_bytes(torch.device("cpu"))
    if free is not None and need > free:
        raise ConfigError(f"writing this checkpoint takes ~{need / 1e9:.0f} GB of host memory and "
                          f"{free / 1e9:.0f} GB is free; use a smaller --preset or a bigger machine")


def _write(out: Path, lm_cfg: LMConfig, mimi_cfg: MimiConfig, seed: int, lora_rank: int | None, q8: bool) -> None:
    gen = torch.Generator().manual_seed(seed)

    lm = MoshiLM(lm_cfg)
    _randomize_lm(lm, gen)
    lm_state = _q8(lm.state_dict(), lm) if q8 else {k: v.to(torch.bfloat16) for k, v in lm.state_dict().items()}
    moshi_name = Q8_NAME if q8 else MOSHI_NAME
    save_file({k: v.contiguous() for k, v in _fuse_attention(lm_state).items()}, str(out / moshi_name))
    if lora_rank is not None:  # its own generator: the base files are the same with an adapter or without
        lora = _random_lora(lm, lora_rank, torch.Generator().manual_seed(seed + 1))
        save_file({k: v.to(torch.bfloat16) for k, v in lora.items()}, str(out / LORA_NAME))
    del lm, lm_state

    mimi = Mimi(mimi_cfg)
    _randomize_mimi(mimi, gen)
    save_file({k: v.contiguous() for k, v in _fuse_attention(mimi.state_dict()).items()}, str(out / MIMI_NAME))

    # The built-in corpus supports up to 1000 pieces; larger text vocabularies keep ids past it unused.
    train_tokenizer(out / TOKENIZER_NAME, min(lm_cfg.text_card, 1000))
    config = {**lm_cfg.to_dict(), "moshi_name": moshi_name, "mimi_name": MIMI_NAME,
              "tokenizer_name": TOKENIZER_NAME, "model_type": "moshi"}
    if mimi_cfg != MimiConfig():
        (out / MIMI_CONFIG_NAME).write_text(json.dumps(mimi_cfg.to_dict(), indent=2))
        config["mimi_config_name"] = MIMI_CONFIG_NAME
    if lora_rank is not None:
        config.update(lora=True, lora_rank=lora_rank, lora_scaling=DEFAULT_SCALING, lora_name=LORA_NAME)
    if q8:
        config["quantize"] = True
    (out / "config.json").write_text(json.dumps(config, indent=2))
