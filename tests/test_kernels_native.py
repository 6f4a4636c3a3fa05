"""Building lockstep's C kernels: once per machine, and a clear reason wherever they cannot run."""
import os

import pytest

from kernels import native

needs_build = pytest.mark.skipif(native.load("gemm_cpu")[0] is None, reason=native.load("gemm_cpu")[1])


def test_build_failures_say_why(monkeypatch, tmp_path):
    source = native.KERNELS / "elu_cpu.c"
    monkeypatch.setenv("LOCKSTEP_CACHE", str(tmp_path))
    monkeypatch.setenv("LOCKSTEP_NATIVE", "0")
    assert native.build(source) == (None, "LOCKSTEP_NATIVE=0 keeps the ATen/oneDNN paths")
    monkeypatch.delenv("LOCKSTEP_NATIVE")
    monkeypatch.setattr(native.host, "cpuinfo", lambda field: "fpu sse avx2")
    assert native.build(source) == (None, "the CPU has no AVX-512F")
    monkeypatch.setattr(native.host, "cpuinfo", lambda field: "fpu avx512f")
    monkeypatch.setattr(native, "gnu_openmp_loaded", lambda: False)
    assert native.build(source) == (None, "torch does not run on GNU OpenMP in this process")
    monkeypatch.setattr(native, "gnu_openmp_loaded", lambda: True)
    monkeypatch.setenv("CC", "no-such-compiler")
    lib, why = native.build(source)
    assert lib is None and "no C compiler ('no-such-compiler'" in why
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: error: bad flag' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    lib, why = native.build(source)
    assert lib is None and "failed on elu_cpu.c: cc: error: bad flag" in why
    assert not list((tmp_path / "kernels").iterdir())  # no half-built file is left to load


def test_gnu_openmp_is_read_from_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /x/torch/lib/libgomp.so.1\n")
    assert native.gnu_openmp_loaded(str(maps))
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /x/libiomp5.so\n")
    assert not native.gnu_openmp_loaded(str(maps))
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /x/torch.libs/libgomp-a34b3233.so.1\n")  # renamed: no
    assert not native.gnu_openmp_loaded(str(maps))
    assert not native.gnu_openmp_loaded(str(tmp_path / "missing"))


@needs_build
def test_built_once_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCKSTEP_CACHE", str(tmp_path))
    lib, why = native.build(native.KERNELS / "gemm_cpu.c")
    assert lib is not None and why == ""
    (built,) = (tmp_path / "kernels").glob("gemm_cpu-*.so")
    stamp = built.stat().st_mtime_ns
    os.utime(built, ns=(stamp, stamp))
    assert native.build(native.KERNELS / "gemm_cpu.c")[0] is not None
    assert built.stat().st_mtime_ns == stamp
