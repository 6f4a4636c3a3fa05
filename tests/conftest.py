import os
import sys

# Triton's interpreter must be chosen before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The reference package torch.compiles its hot functions, which on CPU costs minutes per shape.
os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests that build checkpoints")
    config.addinivalue_line("markers", "cluster: a real two-node Ray cluster (-m 'not cluster' leaves it out)")
    if os.environ["TRITON_INTERPRET"] not in ("", "0"):
        from kernels.dispatch import interpreter_problem
        problem = interpreter_problem()
        if problem:
            pytest.exit(problem, returncode=2)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="session")
def tiny_wrap_ckpt(tmp_path_factory):
    """All-tiny checkpoint whose LM and Mimi contexts are short enough that every ring wraps."""
    from engine.make_checkpoint import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("tiny-wrap"), "tiny", seed=1, context=6, mimi_context=5)


@pytest.fixture(scope="session")
def tiny_lm_ckpt(tmp_path_factory):
    """Tiny LM with the full-size Mimi."""
    from engine.make_checkpoint import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("tiny-lm"), "tiny-lm", seed=2)


@pytest.fixture(scope="session")
def wav_inputs(tmp_path_factory):
    """Synthetic speech-like inputs of different lengths, rates and channel counts."""
    import wave

    import numpy as np
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    specs = [("alpha", 24000, 1, 1.7), ("bravo", 16000, 2, 1.1), ("charlie", 44100, 1, 2.3),
             ("delta", 24000, 1, 0.9)]
    paths = []
    for name, rate, channels, seconds in specs:
        n = int(rate * seconds)
        t = np.arange(n) / rate
        f0 = 120 + 80 * np.sin(2 * np.pi * 0.7 * t)
        sig = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / rate) + 0.05 * rng.standard_normal(n)
        data = np.stack([sig] * channels, axis=1)
        path = root / f"{name}.wav"
        with wave.open(str(path), "wb") as w:
            w.setnchannels(channels)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes((np.clip(data, -1, 1) * 32767).astype("<i2").tobytes())
        paths.append(path)
    return paths
