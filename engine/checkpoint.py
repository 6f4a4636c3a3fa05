"""Finding and strictly loading kyutai-layout checkpoints (local directory or Hugging Face repo)."""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from engine.config import (MIMI_NAME, MOSHI_NAME, TOKENIZER_NAME, CheckpointError, ConfigError, EngineConfig,
                           LMConfig, MimiConfig, SamplingConfig)
from engine.lora import Adapter, LoraSpec, fold, lora_spec, parse_adapter, read_adapter

__all__ = ["CheckpointError", "CheckpointFiles", "load_weights", "normalize_keys", "resolve"]


@dataclass(frozen=True)
class CheckpointFiles:
    moshi_weights: Path
    mimi_weights: Path
    tokenizer: Path
    lm: LMConfig
    mimi: MimiConfig
    lora: LoraSpec | None = None  # a fine-tune's adapter, folded into the LM weights at load
    sampling: SamplingConfig = SamplingConfig()  # config.json's lm_gen_config, else the reference's defaults


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object")
    return data


class MissingFileError(CheckpointError):
    """A file the repository does not have, or that is neither cached nor reachable; kyutai's
    loader takes a config.json missing either way for the Moshi 7B defaults."""


def _hf_fetch(repo: str, name: str) -> Path:
    """A file of a Hugging Face repository, from the local cache when it is there: asking the hub
    first would cost minutes of retries on a machine without network."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError
    try:
        cached = try_to_load_from_cache(repo, name)
    except HFValidationError as e:
        raise ConfigError(f"{repo!r} is not a Hugging Face repo id (OWNER/NAME): {e}") from None
    if isinstance(cached, str):
        return Path(cached)
    if cached is not None:  # the cache records that the repository has no such file
        raise MissingFileError(f"Hugging Face repo {repo!r} has no file {name!r}")
    unreachable = (f"cannot get {name!r} from Hugging Face repo {repo!r} ({{}}); it is neither in the local "
                   "cache nor downloadable. Download it once with network access, or use --model-dir.")
    try:
        return Path(hf_hub_download(repo, name))
    except LocalEntryNotFoundError as e:
        raise MissingFileError(unreachable.format(type(e).__name__)) from None
    except EntryNotFoundError:
        raise MissingFileError(f"Hugging Face repo {repo!r} has no file {name!r}") from None
    except Exception as e:  # network errors, unknown repositories
        raise CheckpointError(unreachable.format(type(e).__name__)) from None


def _locate(name: str, fetch: Callable[[str], Path]) -> Path:
    """A file as kyutai's loader names it: `hf://OWNER/REPO/FILE` (a file of any Hugging Face repo),
    `file://PATH` (a local file), else `fetch(name)` (a file of this checkpoint, or a plain path)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a checkpoint file must be named by a non-empty string, got {name!r} (check config.json)")
    if name.startswith("hf://"):
        parts = name.removeprefix("hf://").split("/", 2)
        if len(parts) < 3 or not all(parts):
            raise ConfigError(f"{name!r}: a Hugging Face file is named hf://OWNER/REPO/FILE")
        return _hf_fetch(f"{parts[0]}/{parts[1]}", parts[2])
    if name.startswith("file://"):
        return Path(name.removeprefix("file://"))
    return fetch(name)


def resolve(cfg: EngineConfig) -> CheckpointFiles:
    """Locates every file of a checkpoint: --model-dir or --hf-repo, then per-file overrides."""
    if cfg.model_dir is None and cfg.hf_repo is None:
        raise ConfigError("no checkpoint: pass --model-dir DIR or --hf-repo REPO")
    if cfg.model_dir is not None:
        root = Path(cfg.model_dir)
        if not root.is_dir():
            raise CheckpointError(f"--model-dir {root} is not a directory")

        def fetch(name: str) -> Path:
            return root / name
    else:
        def fetch(name: str) -> Path:
            return _hf_fetch(cfg.hf_repo, name)

    if cfg.config_path is not None:
        raw = _read_json(_locate(cfg.config_path, Path), "config")
    elif cfg.model_dir is not None:
        path = Path(cfg.model_dir) / "config.json"
        raw = _read_json(path, "config") if path.exists() else None
        if raw is None:
            print(f"lockstep: no config.json in {cfg.model_dir}; taking the checkpoint for Moshi 7B, as kyutai's "
                  "loader does", file=sys.stderr)
    else:
        try:
            raw = _read_json(fetch("config.json"), "config")
        except MissingFileError:
            print(f"lockstep: {cfg.hf_repo} gives no config.json (the repository has none, or it is not cached "
                  "and the hub cannot be reached); taking the checkpoint for Moshi 7B, as kyutai's loader does",
                  file=sys.stderr)
            raw = None
    raw = raw or {}  # kyutai's rule: no config.json means the Moshi 7B defaults
    lm = LMConfig.from_dict(raw)
    mimi_cfg_name = raw.get("mimi_config_name")
    if mimi_cfg_name:
        mimi = MimiConfig.from_dict(_read_json(_locate(mimi_cfg_name, fetch), "Mimi config"))
    else:
        mimi = MimiConfig()
    if mimi.quantizer.n_q < lm.mimi_codebooks:
        raise ConfigError(f"the Mimi config's quantizer.n_q is {mimi.quantizer.n_q}, but the LM streams "
                          f"{lm.mimi_codebooks} codebooks each way (config.json's n_q, dep_q)")

    def file(flag: str | None, key: str, default: str) -> Path:  # a flag's override, else config.json's name
        return _locate(flag, Path) if flag else _locate(raw.get(key, default), fetch)
    files = CheckpointFiles(
        moshi_weights=file(cfg.moshi_weight, "moshi_name", MOSHI_NAME),
        mimi_weights=file(cfg.mimi_weight, "mimi_name", MIMI_NAME),
        tokenizer=file(cfg.tokenizer, "tokenizer_name", TOKENIZER_NAME),
        lm=lm, mimi=mimi,
        lora=lora_spec(raw, _locate(cfg.lora_weight, Path) if cfg.lora_weight else None, lambda n: _locate(n, fetch)),
        sampling=SamplingConfig.from_lm_gen_config(raw.get("lm_gen_config", {})))
    for what, path in (("Moshi weights", files.moshi_weights), ("Mimi weights", files.mimi_weights),
                       ("text tokenizer", files.tokenizer)):
        if not path.is_file():
            raise CheckpointError(f"{what} not found: {path}")
    return files


_LEGACY_CODEBOOK = {"inited": "_initialized", "cluster_size": "cluster_usage", "embed_avg": "embedding_sum",
                    "embed_sum": "embedding_sum"}
# kyutai's fused attention projections (weights, their q8 scales, their LoRA factors), all steps'
# parts stacked on dim 0; `_split_name` gives the module list and leaf each part goes to.
_FUSED_ATTN = re.compile(r"(.*self_attn\.)(in_proj_weight|in_proj\.weight|out_proj\.weight|"
                         r"(?:in|out)_proj\.lora_[AB]\.weight)(_scb)?$")


def _split_name(fused: str) -> tuple[str, str]:
    proj, _, leaf = fused.replace("in_proj_weight", "in_proj.weight").partition(".")
    return proj + "s", leaf


def normalize_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Maps kyutai's stored names onto the module tree: fused per-step attention projections (and
    their q8 scales and LoRA factors) are split, and legacy codebook buffer names renamed."""
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition("._codebook.")
        if head and leaf in _LEGACY_CODEBOOK:
            out[f"{head}._codebook.{_LEGACY_CODEBOOK[leaf]}"] = value
            continue
        m = _FUSED_ATTN.match(key)
        if m:
            split, leaf = _split_name(m.group(2))
            n = sum(1 for k in expected if re.fullmatch(re.escape(m.group(1) + split) + r"\.\d+\.weight", k))
            if n and value.dim() and value.shape[0] % n == 0:
                for i, part in enumerate(value.view(n, -1, *value.shape[1:])):
                    out[f"{m.group(1)}{split}.{i}.{leaf}{m.group(3) or ''}"] = part
                continue
        out[key] = value
    return out


def q8_scales(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Pops the row scales of kyutai's q8 checkpoints (`kyutai/moshiko-pytorch-q8`: each linear
    weight stored as int8 rows `X.weight` with their absolute maxima `X.weight_scb`, bitsandbytes'
    row-wise layout) out of `state`: {weight key: scales}."""
    scales, problems = {}, []
    for key in [k for k in state if k.endswith("_scb")]:
        weight, scb = key.removesuffix("_scb"), state.pop(key)
        w = state.get(weight)
        if w is None or w.dtype != torch.int8 or w.dim() != 2 or scb.shape != (w.shape[0],):
            problems.append(f"{key} {tuple(scb.shape)} has no int8 weight of as many rows")
        else:
            scales[weight] = scb
    problems += [f"{k}: int8 without {k}_scb" for k, v in state.items() if v.dtype == torch.int8 and k not in scales]
    if problems:
        raise CheckpointError(f"{path} holds bad q8 weights: " + "; ".join(problems[:8]))
    return scales


def dequantize(weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """A q8 weight in float32: its int8 rows times each row's absolute maximum over 127."""
    return weight.float() * (scb.float() / 127).unsqueeze(1)


def load_weights(model: nn.Module, path: Path, dtype: torch.dtype | None, device: torch.device | str,
                 lora: LoraSpec | None = None) -> None:
    """Strictly loads a safetensors file into `model` (q8 weights dequantized, `lora`'s adapter folded
    in, one weight at a time: a 7B LM in float32 at once would need 28 GB of host memory); one error
    names every missing, unexpected and mis-shaped tensor."""
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    state = normalize_keys(state, model)
    scales = q8_scales(state, path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    # A q8 weight is int8 beside its scales; any other integer (or bool) tensor where the model holds
    # floats, or the reverse, is not this model's.
    mis_typed = [f"{k}: file {state[k].dtype} vs model {expected[k].dtype}"
                 for k in sorted(set(state) & set(expected))
                 if expected[k].is_floating_point() != (state[k].is_floating_point() or k in scales)]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped),
                         ("wrong dtype", mis_typed)):
        if items:
            shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
            problems.append(f"{title}: {shown}")
    if problems:
        raise CheckpointError(f"{path} does not match the model configuration; " + "; ".join(problems))
    adapter = Adapter({}, {}) if lora is None else parse_adapter(
        lora, normalize_keys(read_adapter(lora), model), state,
        {name for name, m in model.named_modules() if isinstance(m, nn.Linear)})
    for k, v in state.items():
        if k in adapter.replaced:
            v = adapter.replaced[k]
        elif k in scales:
            v = dequantize(v, scales[k])
        if k in adapter.pairs:
            v = fold(v, *adapter.pairs[k], lora.scaling, device)
        state[k] = v.to(device=device, dtype=(dtype or expected[k].dtype) if v.is_floating_point() else v.dtype)
    model.load_state_dict(state, strict=True, assign=True)
