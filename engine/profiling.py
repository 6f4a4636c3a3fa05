"""Optional per-stage timing of a step (benchmarks only: it synchronizes the device per stage)."""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch


class StageTimer:
    def __init__(self, device: torch.device | str, enabled: bool = False):
        self.cuda = torch.device(device).type == "cuda"
        self.enabled = enabled
        self.totals: dict[str, list[float]] = defaultdict(list)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        if not self.enabled:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.totals[stage].append(time.perf_counter() - start)

    def reset(self) -> None:
        self.totals.clear()
