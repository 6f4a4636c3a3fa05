"""lockstep's C kernels for the CPU path (`kernels/*.c`): built on first use, loaded with ctypes.

Each source is compiled with the system's C compiler (`$CC`, else `cc`) into lockstep's cache
directory (`$LOCKSTEP_CACHE/kernels`, keyed by the source, the headers beside it, the compiler and
the flags; a fraction of a second), and only where the CPU has AVX-512F and torch runs on GNU
OpenMP, and unless LOCKSTEP_NATIVE=0 (for comparisons, or to rule the kernels out); otherwise
`load` says why and the callers keep their ATen/oneDNN paths. Threads are torch's own: a library
links libgomp, which resolves to the copy torch has loaded, so both share one OpenMP pool, and a
call takes `torch.get_num_threads()` of them. ctypes releases the GIL for the call.
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
LIBS = ["-lm"]
KERNELS = Path(__file__).parent


@functools.cache
def load(name: str) -> tuple[ctypes.CDLL | None, str]:
    """(the library built from `kernels/<name>.c`, '') or (None, why it cannot run here)."""
    lib, why = build(KERNELS / f"{name}.c")
    if lib is None:
        log.info("%s stays on ATen/oneDNN: %s", name, why)
    return lib, why


def gnu_openmp_loaded(maps: str = "/proc/self/maps") -> bool:
    """Whether this process already runs a GNU OpenMP named libgomp.so.1 (torch's CPU wheels bring
    one): a kernel's dependency on that name then resolves to it. Under any other runtime (Intel's,
    or a libgomp renamed by a wheel's repair tool) the kernel would load a second OpenMP, whose
    worker pool would take the same cores as torch's."""
    try:
        with open(maps) as f:
            return any(line.rstrip().endswith("/libgomp.so.1") for line in f)
    except OSError:
        return False


def build(source: Path) -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("LOCKSTEP_NATIVE", "1") == "0":
        return None, "LOCKSTEP_NATIVE=0 keeps the ATen/oneDNN paths"
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
        headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]
        key = hashlib.sha256("\0".join([source.read_text(), *headers, cc, version, *FLAGS, *LIBS]).encode()
                             ).hexdigest()[:16]
        target = host.cache_root() / "kernels" / f"{source.stem}-{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            # Built beside the target and renamed: processes starting together never load half a file.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                done = subprocess.run([cc, *FLAGS, str(source), *LIBS, "-o", tmp], capture_output=True, text=True,
                                      timeout=120)
                if done.returncode != 0:
                    return None, f"{cc} failed on {source.name}: {done.stderr.strip()[-400:]}"
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return ctypes.CDLL(str(target)), ""
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"building {source.name} failed: {e}"
