"""Deviation of teacher-forced logits from the oracle's, per stream, for `bench.fidelity`.

Per compared token: whether the run's greedy choice is the oracle's token, KL(oracle || run) between
the two distributions at the sampling temperature (over the whole vocabulary: a top-k cut would make
the divergence infinite wherever the two cut sets differ), and the largest |logit difference|.
"""
from __future__ import annotations

import math

import torch

# Divergences below this many nats are float32 rounding of the logits, not a difference of method:
# a run that is bit-identical to the oracle (the reference in float32) has exactly 0, and dividing
# by it would make lockstep's float32 ratio meaningless. bf16 deviations are ~1e-4 and up.
KL_FLOOR = 1e-7


def kl_divergence(oracle: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, V] logits (any float dtype) -> [B] KL(softmax(oracle / T) || softmax(logits / T)), in float64."""
    p = torch.log_softmax(oracle.double() / temperature, dim=-1)
    q = torch.log_softmax(logits.double() / temperature, dim=-1)
    return (p.exp() * (p - q)).sum(dim=-1).clamp_min(0.0)


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(0.99 * len(s)) - 1))]


class StreamDeviation:
    """Running figures of one run on one stream."""

    def __init__(self):
        self.kl: list[float] = []
        self.agree = 0
        self.max_abs = 0.0

    def add(self, oracle: torch.Tensor, logits: torch.Tensor, oracle_tokens: torch.Tensor, top1: torch.Tensor,
            temperature: float) -> None:
        self.kl.extend(kl_divergence(oracle, logits, temperature).tolist())
        self.agree += int((top1.cpu() == oracle_tokens.cpu()).sum())
        self.max_abs = max(self.max_abs, float((logits.double() - oracle.double()).abs().max()))

    def merge(self, other: "StreamDeviation") -> None:
        self.kl += other.kl
        self.agree += other.agree
        self.max_abs = max(self.max_abs, other.max_abs)

    def summary(self) -> dict:
        n = len(self.kl)
        return {"tokens": n, "top1_agreement": self.agree / n if n else float("nan"),
                "kl_mean": sum(self.kl) / n if n else float("nan"), "kl_p99": p99(self.kl),
                "max_abs_logit_diff": self.max_abs}


def stream_names(dep_q: int) -> list[str]:
    return ["text"] + [f"audio {cb + 1}" for cb in range(dep_q)]


class RunDeviation:
    """One run (the reference or lockstep, in the chosen dtype) against the oracle, every stream."""

    def __init__(self, dep_q: int):
        self.names = stream_names(dep_q)
        self.streams = [StreamDeviation() for _ in self.names]

    def pooled(self) -> StreamDeviation:
        """Every stream's tokens together: the run's overall figures."""
        total = StreamDeviation()
        for s in self.streams:
            total.merge(s)
        return total

    def summary(self) -> dict:
        out = {name: s.summary() for name, s in zip(self.names, self.streams)}
        out["all"] = self.pooled().summary()
        return out


class PairedTop1:
    """Which of the two runs picked the oracle's token, token by token: misses of one run alone
    against the other's alone say whether a gap in top-1 agreement is more than chance."""

    def __init__(self):
        self.counts = [[0, 0], [0, 0]]  # [reference right][lockstep right]

    def add(self, oracle_tokens: torch.Tensor, reference: torch.Tensor, lockstep: torch.Tensor) -> None:
        oracle_tokens = oracle_tokens.cpu()
        for r, s in zip((reference.cpu() == oracle_tokens).tolist(), (lockstep.cpu() == oracle_tokens).tolist()):
            self.counts[int(r)][int(s)] += 1

    def summary(self) -> dict:
        c = self.counts
        return {"both_right": c[1][1], "reference_only_right": c[1][0], "lockstep_only_right": c[0][1],
                "both_wrong": c[0][0]}


def deviation_ratio(lockstep: dict, reference: dict) -> float:
    """lockstep's mean KL over the reference's (both at the same dtype), each floored at `KL_FLOOR`."""
    return max(lockstep["kl_mean"], KL_FLOOR) / max(reference["kl_mean"], KL_FLOOR)
