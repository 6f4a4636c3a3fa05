"""A whole streaming-transformer step in one C call on AVX-512 CPUs (`stack_cpu.c`): plan, launcher.

On CPU a step's ATen ops cost ~3-5 us each whatever their size: a Mimi transformer step of one
session was ~530 of them, half its 7.5 ms, and the tiny LM's stacks nearly all. `attach(module)`
gives every `StreamingTransformer` below it whose layers the kernel covers (fp32 on CPU; RMSNorm or
LayerNorm; GELU, or SiLU/GELU gating; optional layer scales and RoPE; no biases) a `StackKernel`,
which `StreamingTransformer.forward` runs in place of its layers when `runs(x)`: the same step
(its rings', or its KV pool's through the page tables, offsets advanced), computed row by row, so a
row's result does not depend on its batch. Elsewhere (GPU, bf16 or fp8 KV, autograd, the Triton
backend, long offline chunks) the module's own path runs.
"""
from __future__ import annotations

import ctypes
import functools
import threading

import torch
from torch import nn

from kernels import gemm_cpu, native

# Rows (sessions x new positions) a call takes; longer chunks are offline work, where the module's
# batched ATen path has no per-op cost to save.
MAX_ROWS = 256
_FF_GELU, _FF_SILU_GATE, _FF_GELU_GATE = 0, 1, 2


class _Shape(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_int64) for name in ("dim", "heads", "head_dim", "layers", "context", "page_size",
                                                     "pages_per_slot", "pool_pages", "hidden", "ff_kind", "rms",
                                                     "sessions")]
                + [("eps", ctypes.c_float), ("rope_max_period", ctypes.c_float)])


class _Pages(ctypes.Structure):
    _fields_ = [("table", ctypes.c_void_p), ("window", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("norm1_w", "norm1_b", "norm2_w", "norm2_b", "in_proj",
                                                     "out_proj", "ff_in", "ff_out", "scale1", "scale2")]


@functools.cache
def _bound() -> tuple[ctypes.CDLL | None, str]:
    lib, why = native.load("stack_cpu")
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.lockstep_stack_scratch.argtypes = [ctypes.POINTER(_Shape), i64, ctypes.c_int]
        lib.lockstep_stack_scratch.restype = i64
        lib.lockstep_stack_f32.argtypes = [ctypes.POINTER(_Shape), ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr,
                                           ptr, ptr, ctypes.POINTER(_Pages), ptr, ptr, ctypes.c_int]
        lib.lockstep_stack_f32.restype = ctypes.c_int
        lib.lockstep_gelu_f32.argtypes = [ptr, ptr, i64]
        lib.lockstep_gelu_f32.restype = None
    return lib, why


def library() -> ctypes.CDLL | None:
    return _bound()[0]


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The kernel's GELU (exact-erf form) on a contiguous float32 CPU tensor."""
    if not (x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous()):
        raise ValueError(f"gelu takes a contiguous float32 CPU tensor, got {x.dtype} on {x.device}")
    y = torch.empty_like(x)
    library().lockstep_gelu_f32(x.data_ptr(), y.data_ptr(), x.numel())
    return y


def _ff_kind(layer: nn.Module) -> tuple[int, int] | str:
    """(kind, hidden width) of a layer's feed-forward, or why the kernel does not cover it."""
    gating = layer.gating
    if gating is None:
        if layer.linear1.bias is not None or layer.linear2.bias is not None:
            return "feed-forward biases"
        return _FF_GELU, layer.linear1.out_features
    for g in gating if isinstance(gating, nn.ModuleList) else [gating]:
        name = getattr(g.activation, "__name__", "")
        if name not in ("silu", "gelu"):
            return f"gating activation {name or g.activation!r}"
    first = gating[0] if isinstance(gating, nn.ModuleList) else gating
    return (_FF_SILU_GATE if first.activation.__name__ == "silu" else _FF_GELU_GATE), first.linear_out.in_features


def unsupported(module: nn.Module) -> str | None:
    """Why `module` (a StreamingTransformer) cannot run on the kernel, or None when it can."""
    params = list(module.parameters())
    if not params or any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params):
        return "weights are not float32 on CPU"
    if library() is None:  # built only here, so a GPU engine never compiles it
        return _bound()[1]
    if any(b is not None for layer in module.layers for m in layer.modules() for b in [getattr(m, "bias", None)]
           if isinstance(m, nn.Linear)):
        return "projection biases"
    norms = [n for layer in module.layers for n in (layer.norm1, layer.norm2)]
    kinds = {(n.params.rms, n.params.eps, n.params.bias is None) for n in norms}
    if len(kinds) != 1 or (next(iter(kinds))[0] is False and next(iter(kinds))[2]):
        return "mixed or bias-free layer norms"
    ff = {_ff_kind(layer) for layer in module.layers}
    if len(ff) != 1 or isinstance(next(iter(ff)), str):
        return f"feed-forward: {sorted(map(str, ff))}"
    if module.num_heads * module.head_dim != module.layers[0].self_attn.in_projs[0].in_features:
        return "heads x head_dim differs from the width"
    if module.rope_max_period is not None and module.head_dim % 2:
        return f"RoPE over an odd head_dim ({module.head_dim})"
    if module.head_dim > 128:
        return f"head_dim {module.head_dim} (the kernel takes up to 128)"
    if module.context is not None and module.context != module.capacity:
        return "a context other than the ring's capacity"
    if module.pool is not None and module.pool.dtype != torch.float32:
        return f"KV pool in {module.pool.dtype}"
    return None


def _panels(linear: nn.Module) -> torch.Tensor:
    """The module's packed panels (`kernels.linear.prepack` made them for big weights), else a new pack."""
    packed = getattr(linear, "packed", None)
    if packed is not None and packed.panels is not None:
        return packed.panels
    return gemm_cpu.pack(linear.weight)


class StackKernel:
    """A StreamingTransformer's weights laid out for `stack_cpu.c`, one layer table per weight set."""

    def __init__(self, module: nn.Module):
        why = unsupported(module)
        if why is not None:
            raise ValueError(f"the fused CPU step cannot run this transformer: {why}")
        self.module = module
        layer0 = module.layers[0]
        kind, hidden = _ff_kind(layer0)
        norm = layer0.norm1.params
        self.shape = _Shape(
            dim=module.num_heads * module.head_dim, heads=module.num_heads, head_dim=module.head_dim,
            layers=len(module.layers), context=module.capacity, hidden=hidden,
            ff_kind=kind, rms=int(norm.rms), sessions=0, eps=norm.eps,
            rope_max_period=module.rope_max_period or 0.0)
        self._keep: list[torch.Tensor] = []  # every tensor a table points into
        self.tables = [self._table(step) for step in range(max(1, module.weights_per_step))]
        self._scratch = torch.empty(0, dtype=torch.float32, device="cpu")
        self._lock = threading.Lock()  # a call owns the scratch and the shape's state fields
        self._pages = _Pages()

    def _state(self):
        """(keys, values, page table, windows, [pool pages, page size, pages per slot]) as the module
        holds them: its pool's, or its rings' (a page per slot, no table)."""
        m = self.module
        pool = m.pool
        if pool is not None:
            return pool.k, pool.v, pool.page_table, pool.window, [pool.k.shape[1], pool.page_size,
                                                                  pool.page_table.shape[1]]
        k = getattr(m, "k_cache", None)
        return k, getattr(m, "v_cache", None), None, None, None if k is None else [k.shape[1], m.capacity, 1]

    def _ptr(self, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _table(self, step: int) -> ctypes.Array:
        rows = []
        for layer in self.module.layers:
            attn = layer.self_attn
            if layer.gating is None:
                ff_in, ff_out = layer.linear1, layer.linear2
            else:
                g = layer.gating[step] if isinstance(layer.gating, nn.ModuleList) else layer.gating
                ff_in, ff_out = g.linear_in, g.linear_out
            n1, n2 = layer.norm1.params, layer.norm2.params
            scale1, scale2 = (getattr(s, "scale", None) for s in (layer.layer_scale_1, layer.layer_scale_2))
            rows.append(_Layer(*(self._ptr(t) for t in (
                n1.weight, n1.bias, n2.weight, n2.bias, _panels(attn.in_projs[step]), _panels(attn.out_projs[step]),
                _panels(ff_in), _panels(ff_out), scale1, scale2))))
        return (_Layer * len(rows))(*rows)

    def runs(self, x: torch.Tensor) -> bool:
        """Whether this step of x ([B, T, dim]) runs here: on the torch backend, in fp32 on CPU, with the
        module's state laid out as the kernel reads it (anything else takes the module's own path)."""
        m = self.module
        k, v, table, window, layout = self._state()
        offsets = getattr(m, "offsets", None)
        if k is None or v is None or offsets is None or m.kernel_backend != "torch" or torch.is_grad_enabled():
            return False
        s = self.shape
        state = (s.layers, layout[0], s.heads, layout[1], s.head_dim)
        tables_ok = table is None or (
            table.dtype == window.dtype == torch.int32 and table.device.type == window.device.type == "cpu"
            and table.is_contiguous() and window.is_contiguous() and table.shape[0] == window.shape[0] == offsets.shape[0])
        return (x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 3 and x.shape[2] == s.dim
                and 0 < x.shape[1] <= s.context and x.shape[0] * x.shape[1] <= MAX_ROWS
                and offsets.dtype == torch.long and offsets.dim() == 1 and offsets.is_contiguous()
                and offsets.device.type == "cpu" and tables_ok
                and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                        and tuple(t.shape) == state for t in (k, v)))

    def __call__(self, x: torch.Tensor, slots: torch.Tensor, step: int = 0) -> torch.Tensor:
        """The module's step for `slots` ([B]): returns [B, T, dim] and advances their offsets by T."""
        m = self.module
        B, T, C = x.shape
        out = x.new_empty(B, T, C)
        if B == 0:
            return out
        if slots.dtype != torch.long or not slots.is_contiguous():
            slots = slots.to(torch.long).contiguous()
        if slots.shape != (B,) or slots.device.type != "cpu":
            raise ValueError(f"slots must be a CPU [{B}] tensor, got {tuple(slots.shape)} on {slots.device}")
        if not 0 <= step < len(self.tables):
            raise ValueError(f"step {step} outside the {len(self.tables)} weight set(s)")
        lib = library()
        threads = torch.get_num_threads()
        k, v, table, window, layout = self._state()
        with self._lock:
            self.shape.sessions = m.offsets.shape[0]
            self.shape.pool_pages, self.shape.page_size, self.shape.pages_per_slot = layout
            self._pages.table = None if table is None else table.data_ptr()
            self._pages.window = None if window is None else window.data_ptr()
            need = lib.lockstep_stack_scratch(self.shape, B * T, threads)
            if self._scratch.numel() < need:
                self._scratch = torch.empty(need, dtype=torch.float32, device="cpu")
            rc = lib.lockstep_stack_f32(self.shape, ctypes.addressof(self.tables[step]), x.data_ptr(), *x.stride(),
                                        B, T, slots.data_ptr(), m.offsets.data_ptr(), k.data_ptr(), v.data_ptr(),
                                        self._pages, out.data_ptr(), self._scratch.data_ptr(), threads)
        if rc == -1:
            raise ValueError(f"slots {slots.tolist()} reach outside the {m.offsets.shape[0]} state rows")
        if rc == -2:
            raise ValueError(f"slots {slots.tolist()} have a negative offset: {m.offsets[slots].tolist()}")
        if rc != 0:
            raise ValueError(f"the fused CPU step does not take this shape ({B} x {T} rows, {self.shape.dim} wide)")
        return out


def _stacks(*roots: nn.Module) -> list[nn.Module]:
    """The streaming transformers below `roots`: the modules with a `cpu_stack` slot."""
    return [m for root in roots for m in root.modules() if hasattr(m, "cpu_stack") and hasattr(m, "layers")]


def attach(root: nn.Module) -> int:
    """Gives each streaming transformer below `root` a `StackKernel` where the kernel covers it,
    None elsewhere; returns how many got one. Call it once the weights are loaded and packed
    (`kernels.linear.prepack`): the kernel reads the packed copies they have then."""
    count = 0
    for m in _stacks(root):
        m.cpu_stack = StackKernel(m) if unsupported(m) is None else None
        count += m.cpu_stack is not None
    return count


def describe(*roots: nn.Module) -> str:
    """How the streaming transformers below `roots` step, for the start-up line."""
    stacks = _stacks(*roots)
    # Attached before their state is made, a stack whose KV pool came in fp8 still takes its own path.
    fused = [m for m in stacks if m.cpu_stack is not None and unsupported(m) is None]
    if len(fused) == len(stacks):
        return f"transformer steps fused in C ({len(fused)} stacks)"
    why = next(unsupported(m) for m in stacks if not any(m is f for f in fused))
    return f"{len(fused)} of {len(stacks)} transformer steps fused in C (the others: {why})"
