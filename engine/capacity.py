"""Whether the sessions' state fits beside the weights, checked before any of it is allocated.

Every slot's state is preallocated at full context (the LM's 3000-position KV is ~1.6 GB a slot for
Moshi 7B in bf16), so an oversized `--max-sessions` would otherwise end start-up in an out-of-memory
error that names no flag. KV caches are nearly all of that state; the SEANet conv states add kB.
"""
from __future__ import annotations

import torch

from engine.config import ConfigError

# Left free for what a tick allocates beside the state: activations, CUDA graphs, Triton scratch.
_HEADROOM_FRACTION = 0.1
_HEADROOM_MIN = 1 << 30


def state_bytes_per_slot(lm, mimi) -> int:
    """KV bytes one slot holds: the LM's temporal and depth transformers and Mimi's two."""
    transformers = (lm.transformer, lm.depformer, mimi.encoder_transformer.transformer,
                    mimi.decoder_transformer.transformer)
    return sum(t.kv_bytes(t.capacity) for t in transformers)


def check_device(device) -> torch.device:
    """`device` as a torch.device, or a ConfigError saying what to change when this process cannot
    use it (asked before any weight is made there, where torch's own error names no flag)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        if torch.version.cuda:
            build, fix = f"CUDA {torch.version.cuda}", "check nvidia-smi and CUDA_VISIBLE_DEVICES"
        else:
            build, fix = "a CPU-only build", "install a CUDA build of torch on a GPU machine"
        raise ConfigError(f"--device {device} asked for, but torch {torch.__version__} ({build}) sees no "
                          f"CUDA device here: use --device cpu, or {fix}")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(f"--device {device} asked for, but this machine has {count} CUDA device(s): "
                          f"use cuda:0..cuda:{count - 1}")
    return device


def free_bytes(device: torch.device) -> int | None:
    """Memory still free on `device` (CPU: the kernel's MemAvailable), or None where unknown."""
    if device.type == "cuda":
        # Blocks torch's caching allocator holds but no tensor uses (e.g. fp32 weights just cast
        # to bf16) are free to us: the allocator hands them back when a larger request needs it.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_state_fits(lm, mimi, max_sessions: int, device: torch.device) -> None:
    """Raises ConfigError when `max_sessions` slots (plus the runner's scratch slot) cannot fit in
    what `device` has free, saying how many can."""
    free = free_bytes(device)
    if free is None:
        return
    per_slot = state_bytes_per_slot(lm, mimi)
    budget = free - max(_HEADROOM_MIN, int(_HEADROOM_FRACTION * free))
    need = per_slot * (max_sessions + 1)
    if need <= budget:
        return
    fit = max(0, budget // per_slot - 1)
    hint = " or a narrower --dtype (bfloat16 halves the LM's KV)" if lm.transformer.kv_bytes(1) > \
        lm.transformer.kv_bytes(1, torch.bfloat16) else ""
    raise ConfigError(
        f"--max-sessions {max_sessions} needs {need / 1e9:.1f} GB of session state on {device} "
        f"({per_slot / 1e9:.2f} GB a session, KV caches at full context, plus one scratch slot), but "
        f"{free / 1e9:.1f} GB is free after the weights, of which {budget / 1e9:.1f} GB may hold state: "
        f"at most {fit} session(s) fit. Lower --max-sessions{hint}.")
