"""Triton's CPU interpreter (TRITON_INTERPRET=1) made to round float32 -> bfloat16 as compiled kernels do.

Compiled Triton (PTX `cvt.rn.bf16.f32`) and torch round to nearest, ties to even. The interpreter
(3.x, 3.9 included) keeps the top 16 bits, rounding toward zero, so every bf16 value an interpreted
kernel writes is biased toward zero by half an ulp on average: lockstep's bf16 LM on interpreted
Triton kernels came out ~20% further from the float32 oracle than kyutai's own bf16
(`lockstep bench fidelity`), a gap the compiled kernels do not have. `install()` replaces the
interpreter's float32 -> bfloat16 narrowing with round-to-nearest-even, so what the CPU suite checks
of the bf16 kernels is what a GPU runs; every other conversion is left as it is. `kernels.launch`
installs it on import when the interpreter is on.
"""
from __future__ import annotations

import numpy as np


def round_to_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """float32 bit patterns (uint32) -> the bfloat16 bit patterns (uint16) nearest them, ties to even;
    past the largest finite value rounds to infinity, and a NaN stays a (quiet) NaN."""
    bits = np.asarray(bits, dtype=np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)


def install() -> bool:
    """Patches the interpreter (once); False where this Triton has no interpreter builder to patch."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "create_fp_trunc", None)
    if original is None or not hasattr(interpreter, "TensorHandle"):
        return False
    if getattr(original, "rounds_to_nearest", False):
        return True

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.asarray(src.data)
            return interpreter.TensorHandle(round_to_bf16_bits(data.view(np.uint32)), dst_type.scalar)
        return original(self, src, dst_type)

    create_fp_trunc.rounds_to_nearest = True
    builder.create_fp_trunc = create_fp_trunc
    return True
