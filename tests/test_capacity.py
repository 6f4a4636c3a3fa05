import sys

import pytest
import torch

from engine import capacity
from engine.config import ConfigError, EngineConfig
from engine.runner import ModelRunner


def _state_transformers(runner):
    mimi = runner.mimi
    return (runner.lm.transformer, runner.lm.depformer, mimi.encoder_transformer.transformer,
            mimi.decoder_transformer.transformer)


def test_state_bytes_per_slot_is_what_a_slot_allocates(tiny_wrap_ckpt):
    runner = ModelRunner.load(EngineConfig(model_dir=str(tiny_wrap_ckpt), max_sessions=3))
    rows = runner.max_sessions + 1
    allocated = sum(t.k_cache.nbytes + t.v_cache.nbytes for t in _state_transformers(runner))
    assert capacity.state_bytes_per_slot(runner.lm, runner.mimi) * rows == allocated


def test_too_many_sessions_is_a_clear_error(tiny_wrap_ckpt, monkeypatch):
    probe = ModelRunner.load(EngineConfig(model_dir=str(tiny_wrap_ckpt), max_sessions=1))
    per_slot = capacity.state_bytes_per_slot(probe.lm, probe.mimi)
    # Free memory such that, past the 1 GB headroom, exactly 5 slots' state fits: 4 sessions + scratch.
    free = capacity._HEADROOM_MIN + 5 * per_slot + per_slot // 2
    monkeypatch.setattr(capacity, "free_bytes", lambda device: free)
    with pytest.raises(ConfigError, match=r"--max-sessions 5 needs .* at most 4 session\(s\) fit\. Lower --max-sessions"):
        ModelRunner.load(EngineConfig(model_dir=str(tiny_wrap_ckpt), max_sessions=5))
    assert ModelRunner.load(EngineConfig(model_dir=str(tiny_wrap_ckpt), max_sessions=4)).max_sessions == 4


def test_unknown_free_memory_is_not_checked(tiny_wrap_ckpt, monkeypatch):
    monkeypatch.setattr(capacity, "free_bytes", lambda device: None)
    assert ModelRunner.load(EngineConfig(model_dir=str(tiny_wrap_ckpt), max_sessions=2)).max_sessions == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_cpu_free_memory_is_read():
    assert capacity.free_bytes(torch.device("cpu")) > 0
    assert capacity.free_bytes(torch.device("meta")) is None


def test_an_unusable_cuda_device_is_a_clear_error(monkeypatch):
    assert capacity.check_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device cuda asked for.*use --device cpu"):
        capacity.check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert capacity.check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="has 2 CUDA device.*cuda:0..cuda:1"):
        capacity.check_device("cuda:2")
