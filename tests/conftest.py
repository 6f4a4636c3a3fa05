import os
import sys

# Triton's interpreter must be chosen before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests that build checkpoints")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
