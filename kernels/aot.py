"""Ahead-of-time compile of every Triton kernel at the specializations the engine launches.

`python -m kernels.aot [--json] [--only FAMILY]` compiles for Hopper (sm_90) without a GPU and
reports, per kernel: shared memory, registers and spill bytes (from `ptxas -v` on the emitted
PTX). It needs the real compiler, so it must run without TRITON_INTERPRET.

Specializations come from the launchers' own planners run on meta tensors at Moshi 7B shapes,
so what is compiled here is exactly what the engine would launch.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch

from kernels.launch import Launch

TARGET = ("cuda", 90, 32)
DTYPES = (torch.bfloat16, torch.float32)
_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8e4nv",
          torch.int64: "i64",
          torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def signature(launch: Launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for `triton.compile`, mirroring what the JIT would pass."""
    names = launch.kernel.arg_names
    sig, attrs = {}, {}
    for i, (name, value) in enumerate(zip(names, launch.args)):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{launch.kernel.__name__}: cannot type argument {name}={value!r}")
    for name in names[len(launch.args):]:
        sig[name] = "constexpr"
    return sig, dict(launch.consts), attrs


def specializations() -> list[tuple[str, Launch]]:
    """(label, launch) for every kernel the engine runs, at Moshi 7B shapes."""
    from kernels import aot_specs
    out, seen = [], set()
    for family, label, launches in aot_specs.all_specs():
        for launch in launches:
            sig, consts, attrs = signature(launch)
            key = (launch.kernel.__name__, repr(sorted(sig.items())), repr(sorted(consts.items())),
                   repr(sorted(attrs)), launch.num_warps)
            if key not in seen:  # several batch sizes often share one specialization
                seen.add(key)
                out.append((f"{family}:{label}", launch))
    return out


def _ptxas_usage(ptx: str) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(TARGET[1]).path, "-v", f"--gpu-name=sm_{TARGET[1]}a", src, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None}


def compile_one(index: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    label, launch = specializations()[index]
    sig, consts, attrs = signature(launch)
    src = triton.compiler.ASTSource(launch.kernel, sig, consts, attrs)
    compiled = triton.compile(src, target=GPUTarget(*TARGET), options={"num_warps": launch.num_warps})
    ptx, cubin = compiled.asm.get("ptx", ""), compiled.asm.get("cubin", b"")
    return {"label": label, "kernel": launch.kernel.__name__, "num_warps": launch.num_warps,
            "ptx_bytes": len(ptx), "cubin_bytes": len(cubin), "shared": compiled.metadata.shared,
            **_ptxas_usage(ptx)}


def compile_all(only: str | None = None, workers: int = 2) -> list[dict]:
    specs = specializations()
    picked = [i for i, (label, _) in enumerate(specs) if only is None or label.startswith(only + ":")]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_one, picked))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON list on stdout")
    p.add_argument("--only", help="one kernel family (attention, rvq, conv, norm)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernels.aot needs the real Triton compiler: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    rows = compile_all(args.only, args.workers)
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        print(f"{r['label']:<48} {r['kernel']:<28} warps={r['num_warps']} shared={r['shared']:>6} "
              f"regs={r['registers']} spills={r['spill_stores']}/{r['spill_loads']} "
              f"ptx={r['ptx_bytes']} cubin={r['cubin_bytes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
