"""What every Triton launcher in `kernels/` produces: a list of launches, planned before any runs.

Launchers validate operands and plan grids/constexprs in a pure function returning `Launch`es, then
run them. The ahead-of-time compile (`kernels.aot`) calls the same planners on meta tensors, so it
compiles exactly the specializations the engine launches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    from kernels import interpreter
    interpreter.install()  # bf16 rounded as compiled kernels round it


@dataclass
class Launch:
    kernel: Any  # a @triton.jit function
    grid: tuple[int, ...]
    args: list[Any]
    consts: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.consts, num_warps=self.num_warps)


def run_all(launches: list[Launch]) -> None:
    for launch in launches:
        launch.run()


class KernelError(ValueError):
    """A Triton launcher's precondition failed; the message names the kernel and the operand."""


def checker(name: str) -> Callable[[bool, str], None]:
    def check(cond: bool, msg: str) -> None:
        if not cond:
            raise KernelError(f"{name} (triton): {msg}")
    return check


def same_device(*tensors: torch.Tensor) -> bool:
    return len({t.device for t in tensors}) == 1
