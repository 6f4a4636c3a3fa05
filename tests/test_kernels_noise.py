"""Triton noise hash (interpreted on CPU) against the torch path: integer arithmetic, so bit-identical."""
import pytest
import torch

pytest.importorskip("triton")
from kernels import noise_triton  # noqa: E402
from kernels.launch import KernelError  # noqa: E402
from kernels.noise import uniform_noise  # noqa: E402


@pytest.mark.parametrize("stream,n,n_streams", [(0, 25, 1), (1, 250, 8), (3, 1, 2), (0, 1300, 1)])
def test_bit_identical_to_torch(stream, n, n_streams):
    # Seeds using all 63 bits, a negative one, counters past 2**32 (their low 32 bits count).
    seeds = torch.tensor([0, 1, 2**62 + 12345, -7, 2**40 + 3])
    counters = torch.tensor([0, 5, 2**33 + 9, 123456, 2999])
    want = uniform_noise(seeds, counters, stream, n, n_streams)
    got = uniform_noise(seeds, counters, stream, n, n_streams, backend="triton")
    assert got.shape == (5, n_streams, n) and got.dtype == torch.float32
    assert torch.equal(got, want)
    assert ((got > 0) & (got < 1)).all()


def test_rows_depend_on_their_own_seed_and_counter():
    seeds, counters = torch.tensor([11, 22, 33]), torch.tensor([1, 2, 3])
    full = uniform_noise(seeds, counters, 1, 64, 2, backend="triton")
    assert torch.equal(full[1:2], uniform_noise(seeds[1:2], counters[1:2], 1, 64, 2, backend="triton"))
    assert not torch.equal(full[0], full[1])


def test_empty_batch():
    e = torch.empty(0, dtype=torch.long)
    assert uniform_noise(e, e, 0, 10, 1, backend="triton").shape == (0, 1, 10)


@pytest.mark.parametrize("bad", ["dtype", "shape", "strided"])
def test_preconditions_are_checked_before_launch(bad):
    seeds, counters = torch.arange(4), torch.arange(4)
    if bad == "dtype":
        seeds = seeds.int()
    elif bad == "shape":
        counters = counters[:3]
    else:
        seeds = torch.arange(8)[::2]
    with pytest.raises(KernelError, match="noise"):
        noise_triton.plan_noise(seeds, counters, 0, 10, 1)
