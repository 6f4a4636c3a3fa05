"""lockstep's CPU kernels at the engine's shapes: the product against oneDNN and MKL, ELU and the
fused transformer step against the torch path.

    python -m bench.cpu_kernels                    # or: lockstep bench cpu_kernels ...
    python -m bench.cpu_kernels --only gemm --rows 1 8 16 --megabytes 400

Each product case cycles through enough copies of its weight to fill `--megabytes` (past the
caches: in a tick Mimi's ~290 MB of fp32 weights stream from memory), so the figure is the speed a
product gets inside a tick, as weight bytes per second. ELU runs on SEANet's activations
([sessions, positions, channels], channels-last) and reports microseconds a call. The fused step
runs Mimi's transformer and the `small` checkpoint's LM stacks with `--history` positions in every
ring, against the same module's torch path, in milliseconds a step. Every result is checked
against float64 (the step's against the torch path).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from bench.args import COUNT, at_least, shape
from engine.config import MimiConfig
from engine.make_checkpoint import SMALL_LM
from engine.transformer import StreamingTransformer
from kernels import conv, elu_cpu, gemm_cpu, stack_cpu
from kernels import linear as lin

# (in, out) of Mimi's transformer layers (in_proj, out_proj, linear1, linear2) and of SEANet's
# deepest convs as products (the encoder's 512 -> 1024 downsampling, the decoder's first
# transposed conv), which run a few rows a session.
SHAPES = [(512, 1536), (512, 512), (512, 2048), (2048, 512), (1024, 8192), (4096, 2048)]


def timed(fn, calls: int, repeats: int) -> float:
    """Seconds per call of fn(i) over i in range(calls), after one untimed pass."""
    for i in range(calls):
        fn(i)
    start = time.perf_counter()
    for _ in range(repeats):
        for i in range(calls):
            fn(i)
    return (time.perf_counter() - start) / (repeats * calls)


def case(n_in: int, n_out: int, rows: int, megabytes: float, repeats: int) -> dict:
    g = torch.Generator().manual_seed(n_in * n_out + rows)
    copies = max(2, int(megabytes * 1e6 / (n_in * n_out * 4)))
    weights = [torch.randn(n_out, n_in, generator=g) / n_in ** 0.5 for _ in range(copies)]
    x = torch.randn(rows, n_in, generator=g)
    want = F.linear(x.double(), weights[0].double())
    routes = {"mkl": lambda i: F.linear(x, weights[i])}
    if lin.onednn_available():
        onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in weights]
        routes["onednn"] = lambda i: torch.ops.mkldnn._linear_pointwise(x, onednn[i], None, "none", [], "")
    if gemm_cpu.library() is not None:
        panels = [gemm_cpu.pack(w) for w in weights]
        routes["lockstep"] = lambda i: gemm_cpu.linear(x, panels[i], n_out)
    row = {"in": n_in, "out": n_out, "rows": rows, "weight_mb": n_in * n_out * 4 / 1e6}
    for name, fn in routes.items():
        err = (fn(0).double() - want).abs().max().item()
        if err > 1e-3:
            raise AssertionError(f"{name} differs from float64 by {err:.2e} at {rows} x {n_in} -> {n_out}")
        row[name] = n_in * n_out * 4 / timed(fn, copies, repeats) / 1e9
    return row


# SEANet activations an ELU runs on per session: (positions, channels) from the first layers'
# 1920 x 64 down to the deepest 2 x 1024.
ACTIVATIONS = [(1920, 64), (480, 128), (60, 512), (2, 1024)]


def elu_case(sessions: int, positions: int, channels: int, repeats: int) -> dict:
    x = torch.randn(sessions, positions, channels, generator=torch.Generator().manual_seed(positions)) * 3
    out = torch.empty_like(x)
    row = {"sessions": sessions, "positions": positions, "channels": channels}
    routes = {"torch": lambda i: conv.elu_torch(x, out)}
    if elu_cpu.library() is not None:
        routes["lockstep"] = lambda i: elu_cpu.elu(x, out)
    want = F.elu(x.double())
    for name, fn in routes.items():
        err = (fn(0).double() - want).abs().max().item()
        if err > 1e-6:
            raise AssertionError(f"ELU ({name}) differs from float64 by {err:.2e} on {tuple(x.shape)}")
        row[name] = timed(fn, 50, repeats) * 1e6
    return row


def stacks() -> dict[str, tuple[StreamingTransformer, int]]:
    """name -> (transformer, new positions a step) at Mimi's and the `small` LM's shapes."""
    t, lm = MimiConfig().transformer, SMALL_LM
    torch.manual_seed(0)
    return {
        "mimi": (StreamingTransformer(t.d_model, t.num_heads, t.num_layers, t.dim_feedforward, t.norm, t.gating,
                                      t.layer_scale, t.context, t.max_period), 2),
        "small temporal": (StreamingTransformer(lm.dim, lm.num_heads, lm.num_layers, int(lm.hidden_scale * lm.dim),
                                                lm.norm, lm.gating, lm.layer_scale, lm.context, lm.max_period), 1),
        "small depth": (StreamingTransformer(lm.depformer_dim, lm.depformer_num_heads, lm.depformer_num_layers,
                                             lm.depformer_dim_feedforward, lm.norm, lm.depformer_gating,
                                             lm.depformer_layer_scale, None, None, weights_per_step=lm.dep_q), 1),
    }


@torch.no_grad()
def stack_case(name: str, module: StreamingTransformer, T: int, sessions: int, history: int, repeats: int) -> dict:
    """ms a step of `module` on the torch path and on the fused kernel, every ring `history` deep."""
    module.init_state(sessions)
    lin.prepack(module)
    stack_cpu.attach(module)
    kernel = module.cpu_stack
    slots = torch.arange(sessions)
    depth = module.weights_per_step > 0
    start = torch.full((sessions,), 0 if depth else history, dtype=torch.long)
    x = torch.randn(sessions, T, module.num_heads * module.head_dim)
    for _ in range(1 if depth else 3):  # fill the rings with something to attend over
        module.k_cache.normal_()
        module.v_cache.normal_()

    def step(use_kernel: bool):
        def run(i):
            module.offsets.copy_(start)
            module.cpu_stack = kernel if use_kernel else None
            return module(x, slots, step=min(i, max(0, module.weights_per_step - 1)),
                          position=0 if depth else None)
        return run

    row = {"stack": name, "sessions": sessions, "positions": T, "history": 0 if depth else history}
    routes = {"torch": step(False)}
    if kernel is not None:
        routes["lockstep"] = step(True)
    want = routes["torch"](0).double()
    for route, fn in routes.items():
        err = (fn(0).double() - want).abs().max().item()
        if err > 1e-3:
            raise AssertionError(f"the {name} step ({route}) differs from the torch path by {err:.2e}")
        row[route] = timed(fn, 10, repeats) * 1e3
    module.cpu_stack = kernel
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lockstep bench cpu_kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=["gemm", "elu", "stack"], default=["gemm", "elu", "stack"])
    ap.add_argument("--rows", type=COUNT, nargs="+", default=[1, 2, 4, 8, 12, 16, 24, 32, 64])
    ap.add_argument("--sessions", type=COUNT, nargs="+", default=[1, 8], help="batch sizes of the ELU and step cases")
    ap.add_argument("--history", type=at_least(0, int, 10**6), default=200,
                    help="positions in each ring for the step cases (at most 10^6)")
    ap.add_argument("--shapes", nargs="+", type=shape, default=list(SHAPES), help="IN x OUT, e.g. 512x2048")
    ap.add_argument("--megabytes", type=at_least(0, float, 4096, exclusive=True), default=200,
                    help="weight bytes cycled through per case (at most 4096)")
    ap.add_argument("--repeats", type=COUNT, default=3)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    doc = {"threads": torch.get_num_threads(), "gemm": [], "elu": [], "stack": []}
    built = "built" if gemm_cpu.library() is not None else gemm_cpu.reason()
    print(f"lockstep's CPU kernels: {built} ({torch.get_num_threads()} threads)")
    if "gemm" in args.only:
        routes = ["mkl", "onednn", "lockstep"]
        print("products, weight GB/s")
        print(f"{'in x out':>12} {'rows':>5} " + " ".join(f"{r:>9}" for r in routes))
        for n_in, n_out in args.shapes:
            for m in args.rows:
                row = case(n_in, n_out, m, args.megabytes, args.repeats)
                doc["gemm"].append(row)
                cells = " ".join(f"{row[r]:9.1f}" if r in row else f"{'-':>9}" for r in routes)
                print(f"{f'{n_in}x{n_out}':>12} {m:5d} {cells}", flush=True)
    if "elu" in args.only:
        print("ELU, us a call")
        print(f"{'sessions x positions x channels':>32} {'torch':>9} {'lockstep':>9}")
        for b in args.sessions:
            for positions, channels in ACTIVATIONS:
                row = elu_case(b, positions, channels, args.repeats)
                doc["elu"].append(row)
                mine = f"{row['lockstep']:9.1f}" if "lockstep" in row else f"{'-':>9}"
                print(f"{f'{b} x {positions} x {channels}':>32} {row['torch']:9.1f} {mine}", flush=True)
    if "stack" in args.only:
        print(f"transformer steps, ms a step ({args.history} positions in each ring; the depth one: its first step)")
        print(f"{'stack':>16} {'sessions x positions':>21} {'torch':>9} {'lockstep':>9}")
        for name, (module, T) in stacks().items():
            for b in args.sessions:
                row = stack_case(name, module, T, b, args.history, args.repeats)
                doc["stack"].append(row)
                mine = f"{row['lockstep']:9.2f}" if "lockstep" in row else f"{'-':>9}"
                print(f"{name:>16} {f'{b} x {T}':>21} {row['torch']:9.2f} {mine}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
