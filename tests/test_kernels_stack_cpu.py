"""The fused CPU transformer step (`kernels/stack_cpu.c`) against the module's own torch path in
float64, over Mimi-, Helium- and depth-transformer-like stacks of odd sizes."""

import copy
import math

import pytest
import torch

from engine.transformer import StreamingTransformer
from kernels import stack_cpu

needs_kernel = pytest.mark.skipif(stack_cpu.library() is None, reason=f"no CPU kernel here: {stack_cpu._bound()[1]}")

# name: (dim, heads, layers, feed-forward, norm, gating, layer scale, context, RoPE period, weights per step)
KINDS = {
    # Mimi's: LayerNorm, plain GELU, layer scales, RoPE, a context (head_dim 8: a masked vector tail)
    "mimi": (40, 5, 2, 72, "layer_norm", "none", 0.3, 7, 10000.0, 0),
    # Helium's: RMSNorm in fp32, SiLU gating, RoPE, a context (head_dim 24)
    "helium": (48, 2, 3, 4 * 48, "rms_norm_f32", "silu", None, 9, 10000.0, 0),
    # the depth transformer's: a weight set per step, no RoPE, no context
    "depth": (32, 2, 2, 50, "rms_norm", "silu", None, None, None, 3),
    "gelu_gate": (36, 3, 2, 60, "layer_norm", "gelu", 0.5, 5, 100.0, 0),
    # the widest heads the kernel takes (8 chunks of 16, Helium's 128), and 7 chunks with a tail
    "wide_heads": (256, 2, 1, 64, "rms_norm", "silu", None, 6, 10000.0, 0),
    "tail_heads": (200, 2, 1, 64, "rms_norm", "silu", None, 6, 10000.0, 0),
}
SESSIONS = 5


def _pair(kind: str):
    """(fp32 module on the kernel, its float64 copy on the torch path), random weights and norms."""
    dim, heads, layers, ff, norm, gating, scale, context, period, per_step = KINDS[kind]
    torch.manual_seed(sum(map(ord, kind)))
    m = StreamingTransformer(dim, heads, layers, ff, norm, gating, scale, context, period, weights_per_step=per_step)
    for name, p in m.named_parameters():
        if "norm" in name and ("weight" in name or "alpha" in name):
            p.data = 1 + 0.2 * torch.randn_like(p)
        elif "norm" in name:  # LayerNorm biases
            p.data = 0.1 * torch.randn_like(p)
        elif "scale" in name:
            p.data = 0.5 + 0.2 * torch.randn_like(p)
        else:
            p.data = torch.randn_like(p) / p.shape[-1] ** 0.5
    ref = copy.deepcopy(m).double()
    m.init_state(SESSIONS)
    ref.init_state(SESSIONS)
    assert stack_cpu.attach(m) == 1 and m.cpu_stack is not None
    return m, ref


def _schedule(kind: str):
    """(slots, T, step) of each call: subsets in any order, 1-3 new positions, rings wrapping."""
    subsets = [[0, 2, 3], [1], [3, 0], [4, 1, 0, 2], [2]]
    if KINDS[kind][-1]:  # a frame is `weights per step` calls of one position, after a reset
        for frame in range(3):
            slots = subsets[frame % len(subsets)]
            yield "reset", slots, 0
            for step in range(KINDS[kind][-1]):
                yield "step", slots, step
        return
    for i in range(14):
        yield "step", subsets[i % len(subsets)], 0 if i % 4 == 3 else 1 + i % 3


def _run(m, slots, T, step, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(slots), T, m.num_heads * m.head_dim, generator=g, dtype=torch.float64)
    return m(x.to(dtype), torch.tensor(slots), step=step)


@needs_kernel
@pytest.mark.parametrize("kind", list(KINDS))
def test_steps_match_the_torch_path_in_float64(kind):
    m, ref = _pair(kind)
    used = set()
    for i, (what, slots, arg) in enumerate(_schedule(kind)):
        used.update(slots)
        if what == "reset":
            m.reset(torch.tensor(slots))
            ref.reset(torch.tensor(slots))
            continue
        T = 1 if KINDS[kind][-1] else arg
        step = arg if KINDS[kind][-1] else 0
        if T == 0:
            continue
        got = _run(m, slots, T, step, torch.float32, i)
        want = _run(ref, slots, T, step, torch.float64, i)
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5, msg=f"call {i}: {slots} x {T}")
        assert torch.equal(m.offsets, ref.offsets)
    for name in ("k_cache", "v_cache"):
        torch.testing.assert_close(getattr(m, name).double(), getattr(ref, name), atol=2e-5, rtol=2e-5)
    for slot in set(range(SESSIONS)) - used:
        assert not m.k_cache[:, slot].any() and m.offsets[slot] == 0


@needs_kernel
def test_gelu_is_within_six_ulps_of_exact():
    x = torch.cat([torch.linspace(-14, 12, 400_003), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0])])
    got = stack_cpu.gelu(x).double()
    xd = x.double()
    exact = 0.5 * xd * torch.erfc(-xd / math.sqrt(2))
    spacing = (torch.nextafter(exact.float().abs(), torch.tensor(float("inf"))).double()
               - exact.float().abs().double())
    normal = exact.abs() >= torch.finfo(torch.float32).tiny
    assert ((got - exact).abs() / spacing)[normal].max() <= 6
    assert (got - exact)[~normal].abs().max() <= 2.0 ** -140  # the subnormal tail below x = -13
    assert got[-6:-4].eq(0).all() and got[-2] == 30.0 and got[-1] == 0.0


@needs_kernel
def test_strided_input_as_mimi_passes_it():
    m, ref = _pair("mimi")
    x = torch.randn(3, 40, 2)  # [B, C, T], seen as [B, T, C] through a transpose
    got = m(x.transpose(1, 2), torch.tensor([0, 1, 2]))
    want = ref(x.double().transpose(1, 2), torch.tensor([0, 1, 2]))
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@needs_kernel
def test_a_rows_result_does_not_depend_on_its_batch_or_the_threads():
    m, _ = _pair("helium")
    state = {k: v.clone() for k, v in m.named_buffers()}
    x = torch.randn(4, 2, 48)
    threads = torch.get_num_threads()
    results = []
    try:
        for n, rows in ((2, [0, 1, 2, 3]), (1, [0, 1, 2, 3]), (2, [2]), (1, [2, 0])):
            torch.set_num_threads(n)
            for k, v in m.named_buffers():
                v.copy_(state[k])
            results.append(m(x[rows], torch.tensor([[3, 1, 0, 4][r] for r in rows]))[rows.index(2)])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)


@needs_kernel
def test_padded_rows_may_share_a_slot():
    """The engine's padded rows all name its scratch slot: allowed, and the real rows are unaffected."""
    m, ref = _pair("mimi")
    x = torch.randn(4, 2, 40)
    got = m(x, torch.tensor([1, 4, 4, 4]))[:1]
    want = ref(x[:1].double(), torch.tensor([1]))
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@needs_kernel
def test_a_bad_slot_is_an_error_and_writes_nothing():
    m, _ = _pair("mimi")
    before = {k: v.clone() for k, v in m.named_buffers()}
    with pytest.raises(ValueError, match="outside the 5 state rows"):
        m(torch.randn(2, 1, 40), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="outside"):
        m(torch.randn(1, 1, 40), torch.tensor([-1]))
    assert all(torch.equal(v, before[k]) for k, v in m.named_buffers())


@needs_kernel
def test_a_negative_offset_is_an_error_and_writes_nothing():
    m, _ = _pair("mimi")
    m.offsets[1] = -1
    before = {k: v.clone() for k, v in m.named_buffers()}
    with pytest.raises(ValueError, match="negative offset"):
        m(torch.randn(2, 1, 40), torch.tensor([0, 1]))
    assert all(torch.equal(v, before[k]) for k, v in m.named_buffers())


@needs_kernel
def test_state_the_kernel_cannot_read_goes_to_the_module_path():
    m, _ = _pair("mimi")
    k = m.cpu_stack
    x = torch.zeros(2, 1, 40)
    assert k.runs(x)
    cache = m.k_cache
    m.k_cache = cache[:, :3].clone()  # fewer state rows than offsets
    assert not k.runs(x)
    m.k_cache = cache
    m.offsets = m.offsets.int()
    assert not k.runs(x)


@needs_kernel
def test_scratch_is_float32_whatever_the_default_dtype():
    m, ref = _pair("helium")
    x = torch.randn(3, 2, 48)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        got = m(x, torch.tensor([0, 1, 2]))
    finally:
        torch.set_default_dtype(default)
    torch.testing.assert_close(got.double(), ref(x.double(), torch.tensor([0, 1, 2])), atol=2e-5, rtol=2e-5)


@needs_kernel
def test_what_the_kernel_leaves_to_the_module():
    m, _ = _pair("mimi")
    k = m.cpu_stack
    assert k.runs(torch.zeros(2, 3, 40))
    assert not k.runs(torch.zeros(2, 3, 40, dtype=torch.float64))
    assert not k.runs(torch.zeros(2, 8, 40))  # more new positions than the ring holds
    assert not k.runs(torch.zeros(stack_cpu.MAX_ROWS + 1, 1, 40))
    with torch.enable_grad():
        assert not k.runs(torch.zeros(2, 3, 40))
        # ...and there the module's own path runs: only it records for autograd
        assert m(torch.zeros(1, 1, 40), torch.tensor([0])).requires_grad
    m.kernel_backend = "triton"
    assert not k.runs(torch.zeros(2, 3, 40))


@needs_kernel
def test_stacks_the_kernel_does_not_cover():
    def stack(**kw):
        args = dict(dim=16, num_heads=2, num_layers=1, dim_feedforward=32, norm="rms_norm", gating="silu",
                    layer_scale=None, context=4, rope_max_period=None)
        args.update(kw)
        return StreamingTransformer(**args)

    assert stack_cpu.unsupported(stack()) is None
    assert "gating activation 'relu'" in stack_cpu.unsupported(stack(gating="relu"))
    assert "head_dim 144" in stack_cpu.unsupported(stack(dim=288, num_heads=2))
    assert "odd head_dim (7)" in stack_cpu.unsupported(stack(dim=14, num_heads=2, rope_max_period=100.0))
    assert "float32" in stack_cpu.unsupported(stack().to(torch.bfloat16))
    m = stack()
    m.layers[0].self_attn.in_projs[0].bias = torch.nn.Parameter(torch.zeros(48))
    assert stack_cpu.unsupported(m) == "projection biases"
    m = stack()
    assert stack_cpu.attach(m.to(torch.float64)) == 0 and m.cpu_stack is None
    with pytest.raises(ValueError, match="cannot run this transformer"):
        stack_cpu.StackKernel(m)


@needs_kernel
def test_the_engine_runs_every_transformer_on_it(tiny_lm_ckpt):
    from engine.config import EngineConfig
    from engine.runner import ModelRunner
    runner = ModelRunner.load(EngineConfig(model_dir=str(tiny_lm_ckpt), device="cpu", dtype="float32",
                                           max_sessions=2, kernels="torch"))
    stacks = [runner.lm.transformer, runner.lm.depformer, runner.mimi.encoder_transformer.transformer,
              runner.mimi.decoder_transformer.transformer]
    assert all(s.cpu_stack is not None for s in stacks)


@needs_kernel
def test_describe_says_how_many_stacks_are_fused_and_why_not():
    fused, _ = _pair("mimi")
    other, _ = _pair("helium")
    assert stack_cpu.describe(fused, other) == "transformer steps fused in C (2 stacks)"
    other.cpu_stack = None
    other.double()
    assert stack_cpu.describe(fused, other) == (
        "1 of 2 transformer steps fused in C (the others: weights are not float32 on CPU)")
