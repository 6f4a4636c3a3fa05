"""Triton's interpreter rounds float32 -> bfloat16 as torch and compiled kernels do (to nearest, ties to even)."""
import os

import numpy as np
import pytest
import torch

from kernels.interpreter import round_to_bf16_bits

SPECIAL = [float("inf"), -float("inf"), 3.3895e38, -3.3895e38, 3.39e38, 0.0, -0.0, 1e-40, -1e-40, 1 + 2**-8,
           1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20, 65504.0, 1e-45]


def values() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(8192, generator=g) * torch.logspace(-30, 30, 8192), torch.tensor(SPECIAL)])


def test_the_bit_rounding_is_torchs():
    x = values()
    got = round_to_bf16_bits(x.numpy().view(np.uint32))
    assert np.array_equal(got, x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    nan = round_to_bf16_bits(np.array([0x7FC00000, 0x7F800001, 0xFF800001], dtype=np.uint32))
    assert torch.from_numpy(nan.view(np.int16)).view(torch.bfloat16).isnan().all()  # NaNs with low payloads stay NaN


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks Triton's interpreter")
def test_an_interpreted_kernel_stores_bfloat16_rounded_to_nearest():
    import triton
    import triton.language as tl

    import kernels.launch  # noqa: F401  (installs the rounding)

    @triton.jit
    def narrow(x_ptr, y_ptr, z_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n)
        tl.store(y_ptr + i, x.to(tl.bfloat16), mask=i < n)  # an explicit cast
        tl.store(z_ptr + i, x * 1.0, mask=i < n)  # the store's own conversion

    x = values()
    y, z = (torch.empty(len(x), dtype=torch.bfloat16) for _ in range(2))
    narrow[(1,)](x, y, z, len(x), BLOCK=triton.next_power_of_2(len(x)))
    want = x.to(torch.bfloat16).view(torch.int16)
    assert torch.equal(y.view(torch.int16), want) and torch.equal(z.view(torch.int16), want)
