"""`lockstep serve --ray` (api/cluster_launch.py's serve_on_ray) end to end: it starts a Ray of its own,
deploys one CPU replica, serves a call through Serve's proxy with `lockstep generate`'s tokens, and
drains and exits 0 on SIGTERM, leaving no Ray behind."""
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.servers import ROOT, free_port, http
from tests.test_api import expected  # noqa: F401 (the fixture: what `lockstep generate` gives)

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def raylets() -> set[int]:
    found = subprocess.run(["pgrep", "-f", "raylet"], capture_output=True, text=True).stdout.split()
    return {int(pid) for pid in found}


def test_serve_ray_serves_a_call_and_drains_on_sigterm(tiny_wrap_ckpt, expected):
    from api.client import chat
    before = raylets()
    port = free_port()
    log = tempfile.TemporaryFile()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own, not the tests'
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--ray", "--replicas", "1", "--device", "cpu",
                             "--model-dir", str(tiny_wrap_ckpt), "--max-sessions", "2", "--shutdown-timeout", "5",
                             "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def output() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")

    try:
        deadline = time.monotonic() + 240
        while "lockstep: serving" not in output():
            assert proc.poll() is None and time.monotonic() < deadline, output()[-3000:]
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}"
        assert http("GET", url + "/readyz")[0] == 200
        pcm, want_text, _ = expected["delta"]
        result = asyncio.run(chat(url, pcm.reshape(-1), realtime=False, params={"greedy": True}))
        assert result.text_tokens == want_text and result.end_reason == "input_end"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, output()[-3000:]
        assert "draining" in output()
        # Each replica finished its own shutdown (its board gone first), not killed after its grace period.
        assert "did not shut down after grace period" not in output(), output()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The Ray it started went with it.
    deadline = time.monotonic() + 30
    while raylets() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not raylets() - before
