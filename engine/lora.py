"""LoRA fine-tunes (kyutai's `moshi-finetune` layout), folded into the base weights at load.

A fine-tune's `config.json` sets `lora: true` with `lora_rank`, `lora_scaling` and usually
`lora_name` (its safetensors file); `--lora-weight FILE` names the file instead. The file holds
`P.lora_A.weight` [rank, in] and `P.lora_B.weight` [out, rank] for linear layers `P` of the LM, named
as kyutai's module tree names them. Each is folded as W + scaling · (B @ A), once, so serving a
fine-tune costs exactly what serving its base costs: the engine never sees the adapter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from engine.config import CheckpointError, ConfigError

DEFAULT_SCALING = 2.0  # kyutai's default when a config sets lora without lora_scaling


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scaling: float = DEFAULT_SCALING
    rank: int | None = None  # what config.json declares; the file's shapes must agree


def lora_spec(raw: dict[str, Any], lora_weight: Path | None, fetch: Callable[[str], Path]) -> LoraSpec | None:
    """The adapter a checkpoint asks for: `--lora-weight`, else config.json's `lora_name` when it
    sets `lora: true`; None for a plain checkpoint."""
    enabled = raw.get("lora", False)
    if not isinstance(enabled, bool):  # "false" would read as true
        raise ConfigError(f"config.json's lora must be true or false, got {enabled!r}")
    if raw.get("lora_name") is not None and not isinstance(raw["lora_name"], str):
        raise ConfigError(f"config.json's lora_name must be a file name, got {raw['lora_name']!r}")
    if not enabled and raw.get("lora_name") and lora_weight is None:
        raise ConfigError(f"config.json names lora_name={raw['lora_name']!r} but does not set lora=true; "
                          "set it to use the adapter, or remove lora_name")
    if not enabled and lora_weight is None:
        return None
    if lora_weight is not None:
        path = lora_weight
    elif raw.get("lora_name"):
        path = fetch(raw["lora_name"])
    else:
        raise ConfigError("config.json sets lora=true but names no lora_name: pass the adapter with --lora-weight "
                          "FILE, or set lora=false if its weights already have the adapter merged in")
    scaling, rank = raw.get("lora_scaling", DEFAULT_SCALING), raw.get("lora_rank")
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling):
        raise ConfigError(f"config.json's lora_scaling must be a finite number, got {scaling!r}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ConfigError(f"config.json's lora_rank must be a positive integer, got {rank!r}")
    if not path.is_file():
        raise ConfigError(f"LoRA weights not found: {path}")
    return LoraSpec(path, float(scaling), rank)


def read_adapter(spec: LoraSpec) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(spec.path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"cannot read LoRA safetensors file {spec.path}: {e}") from None


@dataclass(frozen=True)
class Adapter:
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # base weight key -> (A, B) to fold in
    replaced: dict[str, torch.Tensor]  # base key -> a tensor that replaces it outright


def parse_adapter(spec: LoraSpec, adapter: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                  linears: set[str]) -> Adapter:
    """The adapter's (A, B) pairs by the base weight's key in `state`, checked against `linears` (the
    LM's linear layers by module name) and the base shapes, and the base tensors it replaces
    (moshi-finetune's `ft_embed` saves whole embedding tables beside the factors; a saved LoRA
    model names a layer's base weight `P.frozen_W.weight`), as kyutai's loader takes them. One
    error names every key that does not fit. `adapter` is named as the module tree names it (fused
    projections split)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, value in adapter.items():
        base = key.replace(".frozen_W.", ".")
        if base in state:
            if value.shape != state[base].shape or not value.is_floating_point():
                problems.append(f"{key}: {value.dtype} {tuple(value.shape)} cannot replace the base "
                                f"{tuple(state[base].shape)}")
            replaced[base] = value
            continue
        head, dot, tail = key.rpartition(".lora_")
        if not dot or tail not in ("A.weight", "B.weight") or head not in linears:
            problems.append(f"{key}: neither a lora_A/lora_B weight of one of the LM's linear layers nor a "
                            "tensor of the base model")
            continue
        pairs.setdefault(head, {})[tail[0]] = value
    for head, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            problems.append(f"{head}: has lora_{''.join(ab)} without lora_{'B' if 'A' in ab else 'A'}")
            continue
        a, b, w = ab["A"], ab["B"], state[head + ".weight"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != w.shape:
            problems.append(f"{head}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not make "
                            f"the base weight's {tuple(w.shape)}")
        elif spec.rank is not None and a.shape[0] != spec.rank:
            problems.append(f"{head}: rank {a.shape[0]}, but config.json's lora_rank is {spec.rank}")
    if not pairs and not replaced and not problems:
        problems.append("it holds no lora_A/lora_B weights")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise CheckpointError(f"{spec.path} does not fit this model: {shown}")
    return Adapter({head + ".weight": (ab["A"], ab["B"]) for head, ab in pairs.items()}, replaced)


def fold(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
         device: torch.device | str = "cpu") -> torch.Tensor:
    """W + scaling · (B @ A) in float32 on `device` whatever the stored dtypes, so that a bf16 server
    rounds the folded weight once rather than its product and sum apart (on a GPU, because a 7B
    LM's folds at rank 128 are ~2 TFLOP)."""
    w, a, b = (t.to(device, torch.float32) for t in (weight, a, b))
    return w + scaling * (b @ a)
