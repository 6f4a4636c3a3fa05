"""Process-wide settings for a long-running engine, applied once the models are loaded.

Two host-side stalls hit every session of a tick at once, so both are taken off the hot path:
- Python's cyclic GC: with the models and libraries loaded, a full collection scans ~330k objects
  (~180 ms on CPU, two ticks). Everything alive at start-up lives as long as the process, so it is
  frozen out of collection.
- glibc's heap: it sizes its mmap and trim thresholds from recent frees, so a tick's activations
  (several MB each on CPU) were now and then handed back to the kernel and faulted in again next
  tick, up to 30k page faults per tick: p99 at 8 CPU sessions moved from ~60 ms to 70-90 ms from
  one run to the next (bench/RESULTS.md). Fixed thresholds keep the pages once the heap has grown.
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform
from pathlib import Path

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses mmap thresholds above 32 MB on 64-bit; blocks larger than that stay mmapped.
_MMAP_THRESHOLD = 32 << 20
# Free memory at the heap's top is returned to the kernel only past this much.
_TRIM_THRESHOLD = 1 << 30


def cache_root() -> Path:
    """Where lockstep keeps what it makes once per machine (the built-in checkpoint, built C
    kernels): `$LOCKSTEP_CACHE`, else ~/.cache/lockstep."""
    return Path(os.environ.get("LOCKSTEP_CACHE", Path.home() / ".cache" / "lockstep"))


def cpuinfo(field: str, path: str = "/proc/cpuinfo") -> str:
    """A field of the first processor in /proc/cpuinfo ('vendor_id', 'model name'); '' where there
    is none."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return ""


def keep_heap_pages() -> bool:
    """Fixes glibc's mmap and trim thresholds (see above). Returns False where the C library is not
    glibc (nothing to do there) or refused a setting."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def settle() -> None:
    """Call once the long-lived objects exist, before the first tick that sessions wait on."""
    keep_heap_pages()
    gc.collect()
    gc.freeze()


def unsettle() -> None:
    """At exit: lets the last collection see the startup objects again (native bindings check
    for leaks then)."""
    gc.unfreeze()


def die_with_parent() -> None:
    """A child of `lockstep serve` ends with it, even when the supervisor is killed outright (Linux
    PR_SET_PDEATHSIG; elsewhere the pipes the children hold to it tell them instead)."""
    if platform.system() != "Linux":
        return
    import signal
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the call above
        os._exit(1)


API_NICE = 5


def yield_to_engine(by: int = API_NICE) -> None:
    """Lowers this process's CPU priority (an API process's), so that on a machine whose cores are
    all busy the engine's tick still runs first: under a flood, connections wait, calls do not.
    Linux groups the processes of a session for scheduling (autogroup) and each API process leads a
    session of its own, so the group is lowered too, where the kernel has them."""
    os.nice(by)
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(by))
    except OSError:  # no autogroups here (or not Linux): the process's own nice is the priority
        pass
