"""CUDA graphs of the runner's device step, one per (batch bucket, top-k bounds).

A step of B sessions is padded to the smallest bucket >= B; padded rows (and the decode rows of
sessions still inside the initial delay) point at the runner's scratch slot, whose state is never
read for real output. Inputs go into static buffers and a tick is one graph replay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128)


def buckets_for(max_sessions: int) -> list[int]:
    return [b for b in BUCKETS if b < max_sessions] + [max_sessions]


@dataclass
class _Captured:
    replay: Callable[[], None]
    idx: torch.Tensor
    decode_idx: torch.Tensor
    pcm: torch.Tensor
    tokens: torch.Tensor
    audio: torch.Tensor


class GraphedStep:
    def __init__(self, runner):
        self.runner = runner
        self.buckets = runner.buckets
        self.graphs: dict[tuple[int, int, int], _Captured] = {}
        # One memory pool for every graph: replays never overlap and each one's outputs are copied
        # out before the next, so a graph may reuse another's intermediates; memory then follows
        # the largest graph rather than the sum over buckets.
        self.pool = None

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def run(self, idx_host: list[int], decode_host: list[int], pcm: torch.Tensor, bounds: tuple[int, int]
            ) -> tuple[torch.Tensor, torch.Tensor]:
        B = len(idx_host)
        bucket = self.bucket(B)
        g = self.prepare(bucket, bounds)
        pad = [self.runner.scratch_slot] * (bucket - B)
        g.idx.copy_(torch.tensor(idx_host + pad), non_blocking=True)
        g.decode_idx.copy_(torch.tensor(decode_host + pad), non_blocking=True)
        g.pcm[:B].copy_(pcm, non_blocking=True)
        g.pcm[B:].zero_()
        g.replay()
        return g.tokens[:B], g.audio[:B]

    def prepare(self, bucket: int, bounds: tuple[int, int]) -> _Captured:
        """The graph for `bucket` rows and these top-k bounds, captured now if it is not yet."""
        key = (bucket, *bounds)
        return self.graphs.get(key) or self._capture(key)

    def _capture(self, key: tuple[int, int, int]) -> _Captured:
        bucket, k_audio, k_text = key
        dev = self.runner.device
        idx = torch.full((bucket,), self.runner.scratch_slot, device=dev, dtype=torch.long)
        decode_idx = idx.clone()
        pcm = torch.zeros(bucket, self.runner.frame_size, device=dev)
        replay, tokens, audio = self._record(lambda: self.runner.forward(idx, decode_idx, pcm, k_audio, k_text))
        captured = _Captured(replay, idx, decode_idx, pcm, tokens, audio)
        self.graphs[key] = captured
        return captured

    def _record(self, fn: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
        """Captures `fn` (whose static inputs all point at the scratch slot) into a CUDA graph."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        replay, (tokens, audio) = capture(fn, self.pool)
        return replay, tokens, audio


def capture(fn: Callable[[], Any], pool=None) -> tuple[Callable[[], None], Any]:
    """(replay, outputs): `fn` captured into a CUDA graph after two warm-up runs on a side stream,
    and the tensors it returned, which each replay refreshes. The warm-up runs really execute:
    `fn`'s static inputs must point at state that may be written (the runner's scratch slot)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph.replay, out
