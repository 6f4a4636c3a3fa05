"""Kernel benchmark: each Triton kernel beside its torch path at Moshi 7B / Mimi shapes.

    python -m bench.kernels [--batch 1 8 32 64] [--only attention paged rvq conv norm rope noise] [--json OUT]

For every case it prints the time per call (median of CUDA-event timings, each call after a write
of 256 MB that evicts the GPU's L2, as the rest of a tick would: a B=1 ring or a codebook otherwise
stays cached from the previous call and reads above HBM speed), the bytes the operation must move
(its minimal traffic: each valid KV entry, codebook, weight and activation read once and each
output written once), the achieved GB/s on that basis and the fraction of the device's copy
bandwidth, measured first with a large device-to-device copy. Decode kernels are memory bound,
so that fraction is the figure of merit. The calls are timed eagerly: a torch path of many small
ops can be bound by their launches there, which a tick's CUDA graph does not pay. Needs a CUDA
device; elsewhere it says so and exits 0.
`--device cpu` under TRITON_INTERPRET=1 runs every case on the CPU (wall-clock timings that say
nothing about a GPU): the test suite does so at shrunken shapes, so a lent GPU's short lease is not
lost to a bug in the benchmark itself.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch

from bench.args import COUNT, NON_NEGATIVE
from kernels import attention, conv, noise, norm, paged_attention, rope, rvq
from kernels.norm import NormParams

LM_HEADS, LM_HEAD_DIM, LM_CONTEXT = 32, 128, 3000
DEPTH_HEADS, DEPTH_HEAD_DIM, DEPTH_STEPS = 16, 64, 8
MIMI_HEADS, MIMI_HEAD_DIM, MIMI_CONTEXT = 8, 64, 250
RVQ_DIM, RVQ_BINS, RVQ_STAGES = 256, 2048, (1, 7)
LM_DIM, LM_HIDDEN = 4096, 11264
LM_DTYPE = torch.bfloat16  # the released checkpoints' LM dtype
# Representative SEANet layers (Mimi runs fp32): the full-rate first conv, a strided downsampling
# conv, a dilated residual conv, a decoder upsampling conv, Mimi's upsample, and the deepest
# encoder and decoder convs, whose 33 MB weights serve one or two positions a session.
# (name, in, out, kernel, stride, groups, input length, transposed)
CONVS = [("enc-first", 1, 64, 7, 1, 1, 1920, False), ("enc-down", 64, 128, 8, 4, 1, 1920, False),
         ("enc-res", 128, 64, 3, 1, 1, 480, False), ("dec-up", 128, 64, 8, 4, 1, 480, True),
         ("mimi-up", 512, 512, 4, 2, 512, 1, True), ("enc-deep", 512, 1024, 16, 8, 1, 16, False),
         ("dec-deep-up", 1024, 512, 16, 8, 1, 2, True)]


@dataclass
class Row:
    family: str
    case: str
    batch: int
    backend: str
    ms: float
    bytes: int

    @property
    def gbps(self) -> float:
        return self.bytes / self.ms / 1e6


@dataclass(frozen=True)
class Clock:
    """Times a call on `device`: the median of CUDA-event timings on a GPU (cold L2), of wall-clock
    ones on CPU."""
    device: torch.device
    warmup: int = 5
    iters: int = 25
    flush_bytes: int = 256 << 20  # past any GPU's L2 (an H100's is 50 MB, an H200's 60)

    def ms(self, fn: Callable[[], object], warmup: int | None = None, iters: int | None = None,
           flush: bool = True) -> float:
        warmup, iters = self.warmup if warmup is None else warmup, self.iters if iters is None else iters
        for _ in range(warmup):  # includes the Triton JIT compile on first use
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(iters):
                start_s = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start_s) * 1e3)
            return statistics.median(times)
        scrub = torch.empty(self.flush_bytes if flush else 0, dtype=torch.uint8, device=self.device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        torch.cuda.synchronize()
        # All queued, one sync at the end; each scrub also keeps the GPU busy while the next call is
        # being launched, so its start event is not recorded long before its first kernel.
        for start, end in events:
            scrub.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)

    def peak_bandwidth_gbps(self, nbytes: int) -> float:
        """Copy bandwidth on the device (read + write counted), best of several copies of nbytes."""
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        ms = min(self.ms(lambda: dst.copy_(src), warmup=min(3, self.warmup), iters=max(1, min(self.iters, 10)),
                         flush=False) for _ in range(3))
        return 2 * nbytes / ms / 1e6


def _both(family, case, batch, nbytes, make_call, clock: Clock) -> Iterator[Row]:
    for backend in ("torch", "triton"):
        yield Row(family, case, batch, backend, clock.ms(make_call(backend)), nbytes)


def bench_attention(clock: Clock, batches) -> Iterator[Row]:
    device = clock.device
    shapes = [("lm", LM_HEADS, LM_HEAD_DIM, LM_CONTEXT, LM_CONTEXT, 1, LM_DTYPE),
              ("depth", DEPTH_HEADS, DEPTH_HEAD_DIM, DEPTH_STEPS, None, 1, LM_DTYPE),
              ("mimi", MIMI_HEADS, MIMI_HEAD_DIM, MIMI_CONTEXT, MIMI_CONTEXT, 2, torch.float32)]
    for name, H, D, cap, ctx, T, dtype in shapes:
        S = max(batches)
        k_cache = torch.randn(S, H, cap, D, device=device, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        # Full: deep in a call, the ring wrapped many times. Short: 100 frames in (LM/Mimi only).
        contexts = {"full": 5 * cap + 3} if name == "depth" else {"full": 5 * cap + 3, "short": 100}
        for label, offset in contexts.items():
            valid = min(offset + T, cap, ctx if ctx is not None else cap)
            for B in batches:
                q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype) for _ in range(3))
                slots = torch.arange(B, device=device)
                offsets = torch.full((B,), offset, device=device, dtype=torch.long)
                esize = q.element_size()
                nbytes = B * H * D * esize * (2 * valid + 6 * T)  # KV read, q/k/v/out, KV write

                def call(backend, q=q, k=k, v=v, slots=slots, offsets=offsets, kc=k_cache, vc=v_cache):
                    return lambda: attention.ring_attention(q, k, v, kc, vc, slots, offsets, ctx, backend)
                yield from _both("attention", f"{name}-{label}-ctx{valid}", B, nbytes, call, clock)
        del k_cache, v_cache


def bench_paged(clock: Clock, batches) -> Iterator[Row]:
    """The LM's attention through its KV pool's page tables (pages of 16 frames, each slot's pages
    scattered over the pool, as churn leaves them), bf16 or fp8 pages, at full and short context."""
    device, H, D, ctx, page = clock.device, LM_HEADS, LM_HEAD_DIM, LM_CONTEXT, 16
    per_slot, S = -(-ctx // page), max(batches)
    g = torch.Generator().manual_seed(0)
    table = (torch.randperm(S * per_slot, generator=g) + 1).view(S, per_slot).to(device, torch.int32)
    window = torch.full((S,), ctx, device=device, dtype=torch.int32)
    for kv in ("bf16", "fp8"):
        fp8 = kv == "fp8"
        shape = (S * per_slot + 1, H, page, D)
        kp = torch.randn(shape, device=device, dtype=LM_DTYPE)
        if fp8:
            kp, k_scale = paged_attention.quantize_fp8(kp)
            vp, v_scale = paged_attention.quantize_fp8(torch.randn(shape, device=device, dtype=LM_DTYPE))
        else:
            vp, k_scale, v_scale = torch.randn_like(kp), None, None
        cache = paged_attention.PagedKV(kp, vp, k_scale, v_scale, table, window)
        per_pos = H * D * kp.element_size() + (H * 4 if fp8 else 0)  # a position's keys (or values), scales too
        for label, offset in {"full": 5 * ctx + 3, "short": 100}.items():
            valid = min(offset + 1, ctx)
            for B in batches:
                q, k, v = (torch.randn(B, H, 1, D, device=device, dtype=LM_DTYPE) for _ in range(3))
                slots = torch.arange(B, device=device)
                offsets = torch.full((B,), offset, device=device, dtype=torch.long)
                nbytes = B * (2 * valid * per_pos + 4 * H * D * q.element_size())

                def call(backend, q=q, k=k, v=v, slots=slots, offsets=offsets, cache=cache):
                    return lambda: paged_attention.paged_attention(q, k, v, cache, slots, offsets, ctx, backend)
                yield from _both("paged", f"lm-{kv}-{label}-ctx{valid}", B, nbytes, call, clock)
        del kp, vp, cache


def bench_rvq(clock: Clock, batches) -> Iterator[Row]:
    device = clock.device
    g = torch.Generator(device=device).manual_seed(0)
    tables = []
    for n in RVQ_STAGES:
        c = torch.randn(n, RVQ_BINS, RVQ_DIM, device=device, generator=g)
        sq = c.pow(2).sum(-1, keepdim=True)
        tables.append(torch.cat([c, torch.ones_like(sq), sq], -1).contiguous())
    stages = list(RVQ_STAGES)
    table_bytes = sum(t.numel() for t in tables) * 4
    for B in batches:  # one 12.5 Hz frame per slot: N = B rows
        x = torch.randn(len(stages), B, RVQ_DIM, device=device, generator=g)
        codes = torch.randint(0, RVQ_BINS, (B, sum(stages)), device=device, generator=g)
        enc_bytes = table_bytes + x.numel() * 4 + codes.numel() * 8
        yield from _both("rvq", "encode-1+7", B, enc_bytes,
                         lambda be, x=x: (lambda: rvq.encode(x, tables, stages, be)), clock)
        dec_bytes = B * sum(stages) * (RVQ_DIM * 4 + 8) + len(stages) * B * RVQ_DIM * 4
        yield from _both("rvq", "decode-1+7", B, dec_bytes,
                         lambda be, codes=codes: (lambda: rvq.decode(codes, tables, stages, be)), clock)


def bench_conv(clock: Clock, batches) -> Iterator[Row]:
    device = clock.device
    S = max(batches)
    for name, cin, cout, K, stride, groups, L, transposed in CONVS:
        if transposed:
            w = torch.randn(cin, cout // groups, K, device=device) / (cin * K) ** 0.5
            state = torch.zeros(S, cout, K - stride, device=device)
            out_len = L * stride
        else:
            w = torch.randn(cout, cin, K, device=device) / (cin * K) ** 0.5
            state = torch.zeros(S, cin, K - stride, device=device)
            out_len = L // stride
        bias = torch.zeros(cout, device=device) if groups == 1 else None
        for B in batches:
            x = torch.randn(B, cin, L, device=device)
            slots = torch.arange(B, device=device)
            nbytes = 4 * (x.numel() + B * cout * out_len + w.numel() + 2 * B * state[0].numel())

            def call(be, x=x, slots=slots, w=w, bias=bias, state=state, name=name):
                if name.endswith("up"):
                    return lambda: conv.conv_transpose1d_step(x, w, bias, state, slots, stride, groups, "elu", be)
                return lambda: conv.conv1d_step(x, w, bias, state, slots, stride, 1, 1, None,
                                                "elu" if name != "enc-first" else None, be)
            yield from _both("conv", f"{name}-{cin}to{cout}-k{K}s{stride}-L{L}", B, nbytes, call, clock)


def bench_norm(clock: Clock, batches) -> Iterator[Row]:
    device = clock.device
    dtype = LM_DTYPE
    p = NormParams(True, torch.ones(LM_DIM, device=device, dtype=dtype), None, 1e-8, True)
    for B in batches:
        x = torch.randn(B, 1, LM_DIM, device=device, dtype=dtype)
        u = torch.randn_like(x)
        esize = x.element_size()
        yield from _both("norm", "rms4096", B, 2 * x.numel() * esize + LM_DIM * esize,
                         lambda be, x=x: (lambda: norm.norm(x, p, be)), clock)
        yield from _both("norm", "add+rms4096", B, 4 * x.numel() * esize + LM_DIM * esize,
                         lambda be, x=x, u=u: (lambda: norm.add_norm(x, u, None, p, be)), clock)
        h = torch.randn(B, 1, 2 * LM_HIDDEN, device=device, dtype=dtype)
        yield from _both("norm", f"silu-gate{LM_HIDDEN}", B, 3 * B * LM_HIDDEN * esize,
                         lambda be, h=h: (lambda: norm.silu_gate(h, be)), clock)


def bench_rope(clock: Clock, batches) -> Iterator[Row]:
    device = clock.device
    for name, H, D, T, dtype in (("lm", LM_HEADS, LM_HEAD_DIM, 1, LM_DTYPE),
                                 ("mimi", MIMI_HEADS, MIMI_HEAD_DIM, 2, torch.float32)):
        for B in batches:
            q, k, _ = torch.randn(B, T, 3, H, D, device=device, dtype=dtype).permute(2, 0, 3, 1, 4)
            tables = rope.rope_tables(torch.randint(0, 3000, (B,), device=device), T, D, 10000.0)
            # q and k read and written once, plus the fp32 tables.
            nbytes = 4 * q.numel() * q.element_size() + 2 * tables[0].numel() * 4
            yield from _both("rope", f"{name}-{H}x{D}-T{T}", B, nbytes,
                             lambda be, q=q, k=k, tables=tables: (lambda: rope.apply_rope(q, k, tables, be)), clock)


def bench_noise(clock: Clock, batches) -> Iterator[Row]:
    device = clock.device
    # Launch-bound rather than bandwidth-bound: the torch path is ~80 small integer ops.
    for B in batches:
        seeds = torch.randint(0, 2**62, (B,), device=device)
        counters = torch.randint(0, 3000, (B,), device=device)
        yield from _both("noise", "audio-k250x8", B, B * 8 * 250 * 4,
                         lambda be, s=seeds, c=counters: (lambda: noise.uniform_noise(s, c, 1, 250, 8, be)), clock)


FAMILIES = {"attention": bench_attention, "paged": bench_paged, "rvq": bench_rvq, "conv": bench_conv, "norm": bench_norm,
            "rope": bench_rope, "noise": bench_noise}


def indexed(device: torch.device) -> torch.device:
    """`cuda` as `cuda:N` (the current device): torch.cuda.set_device refuses a device without an index."""
    return torch.device("cuda", torch.cuda.current_device()) if device.index is None else device


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=COUNT, nargs="+", default=[1, 8, 32, 64], help="concurrent slots")
    ap.add_argument("--only", nargs="+", choices=sorted(FAMILIES), help="kernel families to run")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warmup", type=NON_NEGATIVE, default=5, help="untimed calls per case (the first compiles)")
    ap.add_argument("--iters", type=COUNT, default=25, help="timed calls per case (the median is reported)")
    ap.add_argument("--json", help="also write the rows (and the measured peak) to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench.kernels needs a CUDA device (it times Triton kernels against the torch path on the "
              "GPU); none is available here, so nothing was measured.")
        return 0
    if device.type == "cuda":
        device = indexed(device)
        torch.cuda.set_device(device)
        name, copy_bytes = torch.cuda.get_device_name(device), 1 << 30
    else:
        from kernels.dispatch import BackendError, _check_triton
        try:
            _check_triton(device)
        except BackendError as e:
            print(f"bench.kernels --device {device}: {e}")
            return 2
        name, copy_bytes = f"{device} under Triton's interpreter (timings say nothing about a GPU)", 1 << 26
    clock = Clock(device, args.warmup, args.iters)
    peak = clock.peak_bandwidth_gbps(copy_bytes)
    print(f"{name}: measured copy bandwidth {peak:.0f} GB/s")
    print(f"{'family':<10} {'case':<34} {'B':>3} {'backend':<7} {'ms':>9} {'MB':>9} {'GB/s':>8} {'peak':>6}")
    rows: list[Row] = []

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": name, "peak_gbps": peak,
                           "rows": [asdict(r) | {"gbps": r.gbps} for r in rows]}, f, indent=1)

    status = 0
    try:
        with torch.no_grad():
            for family in args.only or list(FAMILIES):
                for r in FAMILIES[family](clock, sorted(args.batch)):
                    rows.append(r)
                    print(f"{r.family:<10} {r.case:<34} {r.batch:>3} {r.backend:<7} {r.ms:9.4f} "
                          f"{r.bytes / 1e6:9.2f} {r.gbps:8.0f} {r.gbps / peak:6.1%}", flush=True)
                    save()  # each row as it comes: a time limit loses none of them
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    except KeyboardInterrupt:  # a time limit: keep the rows measured so far
        print(f"interrupted after {len(rows)} rows", flush=True)
        status = 130
    save()
    return status


if __name__ == "__main__":
    sys.exit(main())
