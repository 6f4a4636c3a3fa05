"""lockstep's C kernels for the CPU path (`kernels/*.c`): built on first use, loaded with ctypes.

Each source is compiled with the system's C compiler (`$CC`, else `cc`) into lockstep's cache
directory (`$LOCKSTEP_CACHE/kernels`, keyed by the source, compiler and flags; a fraction of a
second), and only where the CPU has AVX-512F and torch runs on GNU OpenMP; otherwise `load` says
why and the callers keep their ATen/oneDNN paths. Threads are torch's own: a library links libgomp,
which resolves to the copy torch has loaded, so both share one OpenMP pool, and a call takes
`torch.get_num_threads()` of them. ctypes releases the GIL for the call.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from engine import host

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-mavx512f", "-fopenmp", "-shared", "-fPIC"]
KERNELS = Path(__file__).parent


@functools.cache
def load(name: str) -> tuple[ctypes.CDLL | None, str]:
    """(the library built from `kernels/<name>.c`, '') or (None, why it cannot run here)."""
    lib, why = build(KERNELS / f"{name}.c")
    if lib is None:
        log.info("%s stays on ATen/oneDNN: %s", name, why)
    return lib, why


def gnu_openmp_loaded(maps: str = "/proc/self/maps") -> bool:
    """Whether this process already runs GNU OpenMP (torch's PyPI builds bring their libgomp): a
    kernel's libgomp must resolve to it, or the process would hold two OpenMP runtimes whose
    worker pools take the same cores."""
    try:
        with open(maps) as f:
            return any("libgomp" in line for line in f)
    except OSError:
        return False


def build(source: Path) -> tuple[ctypes.CDLL | None, str]:
    if "avx512f" not in host.cpuinfo("flags").split():
        return None, "the CPU has no AVX-512F"
    if not gnu_openmp_loaded():
        return None, "torch does not run on GNU OpenMP in this process"
    name = os.environ.get("CC", "cc")
    cc = shutil.which(name)
    if cc is None:
        return None, f"no C compiler ({name!r} is not on PATH; set CC)"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([source.read_text(), cc, version, *FLAGS]).encode()).hexdigest()[:16]
        target = host.cache_root() / "kernels" / f"{source.stem}-{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            # Built beside the target and renamed: processes starting together never load half a file.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                done = subprocess.run([cc, *FLAGS, str(source), "-o", tmp], capture_output=True, text=True, timeout=120)
                if done.returncode != 0:
                    return None, f"{cc} failed on {source.name}: {done.stderr.strip()[-400:]}"
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return ctypes.CDLL(str(target)), ""
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"building {source.name} failed: {e}"
