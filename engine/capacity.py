"""How many sessions this machine holds: in memory, checked before any state is allocated, and in
time, probed once the model is warm.

Weights that would not fit are refused before any is read (a 7B LM in fp32 on a 24 GB machine
would otherwise end start-up in the OOM killer, which names no flag); session state is sized in
`engine.kv.sizing`. Memory is not the whole answer: a slot that fits but makes the tick outlast its
80 ms frame serves every session late, which `probe_ticks` measures at start-up rather than leaving
to the first crowded minute.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from engine.config import FRAME_RATE, ConfigError

FRAME_SECONDS = 1.0 / FRAME_RATE

# Left free for what a tick allocates beside the state: activations, CUDA graphs, Triton scratch.
_HEADROOM_FRACTION = 0.1
_HEADROOM_MIN = 1 << 30


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


def _budget(device: torch.device) -> tuple[int, int] | None:
    """(free bytes on `device`, the bytes weights or session state may take of it: free less the
    headroom), or None where free memory is unknown."""
    free = free_bytes(device)
    return None if free is None else budget_of(free)


def budget_of(free: int) -> tuple[int, int]:
    """(free, what weights or session state may take of it: free less the headroom)."""
    return free, free - max(_HEADROOM_MIN, int(_HEADROOM_FRACTION * free))


def weight_bytes(module, dtype: torch.dtype | None = None) -> int:
    """Bytes of what a checkpoint fills in a module (its state dict: no session state), floating
    tensors counted in `dtype` when given; works on the meta device, before anything is allocated."""
    return sum(t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())
               for t in module.state_dict().values())


def check_weights_fit(lm, mimi, lm_dtype: torch.dtype, device, lm_file_bytes: int) -> None:
    """Raises ConfigError when the weights would not fit in what `device` has free, before any is
    read: the LM in `lm_dtype` and Mimi in fp32 (on CPU twice, for its packed copies, and
    the LM file's tensors while they are converted). A 7B LM in fp32 on a 24 GB machine would
    otherwise end start-up in the kernel's OOM killer, which names no flag."""
    device = torch.device(device)
    memory = _budget(device)
    if memory is None:
        return
    free, budget = memory
    dtype_name = str(lm_dtype).removeprefix("torch.")
    lm_bytes, mimi_bytes = weight_bytes(lm, lm_dtype), weight_bytes(mimi, torch.float32)
    lm_what = f"the LM {lm_bytes / 1e9:.1f} GB in {dtype_name}"
    if device.type == "cpu":
        if lm_file_bytes > lm_bytes:
            lm_bytes, lm_what = lm_file_bytes, f"the LM's file {lm_file_bytes / 1e9:.1f} GB while converted to {dtype_name}"
        mimi_bytes *= 2
    need = lm_bytes + mimi_bytes
    if need <= budget:
        return
    hint = []
    if lm_dtype.itemsize > 2:
        hint.append(f"--dtype bfloat16 (the LM then takes {weight_bytes(lm, torch.bfloat16) / 1e9:.1f} GB)")
    if device.type == "cpu":
        hint.append("a GPU (--device cuda)")
    fix = f": use {' or '.join(hint)}" if hint else ": free memory, or use a device with more"
    raise ConfigError(f"the weights need {need / 1e9:.1f} GB on {device} ({lm_what}, Mimi {mimi_bytes / 1e9:.1f} GB), "
                      f"but {free / 1e9:.1f} GB is free, of which {budget / 1e9:.1f} GB may hold them{fix}")


def probe_ticks(runner, repeats: int = 3) -> dict[int, float]:
    """Median seconds of one step of B sessions at full context (as full as an elastic pool lets
    them grow), for each batch bucket B the pool can hold at once. Runs on the real slots 0..B-1, so
    each row reads its own KV as sessions would, and leaves every slot free, its pages back in the
    pool; call it only before any session has joined (start-up)."""
    sizes = runner.buckets
    pcm = torch.zeros(max(sizes), runner.frame_size)
    result = {}
    for B in sizes:
        slots = list(range(B))
        if not runner.kv.tables.alloc.can_promise(B * runner.kv.tables.promise):
            break  # an elastic pool that cannot hold this many at their minimum never steps them together
        for s in slots:
            runner.join(s, dataclasses.replace(runner.default_sampling, seed=s))
        runner.fill_context(slots)
        times = []
        for _ in range(repeats + 1):  # the first may still pay for a first use at this size
            start = time.perf_counter()
            runner.step(slots, pcm[:B])
            times.append(time.perf_counter() - start)
        result[B] = statistics.median(times[1:])
        for s in slots:
            runner.leave(s)
    return result


def realtime_sessions(ticks: dict[int, float]) -> int:
    """The largest probed batch whose tick fits in a frame (0 if not even one session's does)."""
    return max((B for B, t in ticks.items() if t < FRAME_SECONDS), default=0)


def describe_ticks(ticks: dict[int, float], max_sessions: int, admit_realtime: bool = False) -> str:
    sizes = sorted(ticks)
    fit = realtime_sessions(ticks)
    line = (f"a tick at full context takes {' / '.join(f'{ticks[B] * 1e3:.0f}' for B in sizes)} ms with "
            f"{' / '.join(map(str, sizes))} session(s) (a frame is {FRAME_SECONDS * 1e3:.0f} ms)")
    if fit == max(sizes):
        return f"{line}: all {max_sessions} slots run in real time"
    slower = min(B for B in sizes if B > fit)
    if fit == 0:
        return (f"{line}: even one session runs slower than real time here, so every tick will be late "
                "(use a faster device, or on a GPU --dtype bfloat16)")
    line = f"{line}: real time holds with {fit} session(s) but not with {slower}"
    if admit_realtime:
        return f"{line}, so --admit-realtime admits at most {fit} at once"
    return (f"{line}, so with more than {fit} at once ticks may run late (lower --max-sessions to {fit}, "
            "serve with --admit-realtime, or use a faster device)")
