"""`lockstep serve` as a process: SIGTERM refuses new sessions and lets running ones finish."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict | bytes):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def start_server(ckpt, *flags: str) -> tuple[subprocess.Popen, int]:
    """`lockstep serve` in a process, once it answers /healthz: (process, port)."""
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--device", "cpu", "--model-dir", str(ckpt),
                             "--port", str(port), *flags], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return proc, port
        except OSError:
            if proc.poll() is not None:
                pytest.fail(proc.stderr.read().decode()[-2000:])
            time.sleep(0.1)
    proc.kill()
    pytest.fail("the server did not start")


def test_sigterm_drains(tiny_wrap_ckpt):
    proc, port = start_server(tiny_wrap_ckpt, "--max-sessions", "2", "--shutdown-timeout", "20")
    base = f"http://127.0.0.1:{port}"
    try:
        status, body = post(base + "/v1/sessions", {"greedy": True, "end_on_input_end": True})
        assert status == 201
        sid = json.loads(body)["id"]
        stream = urllib.request.urlopen(f"{base}/v1/sessions/{sid}/stream", timeout=30)
        # 1 s of input: the session is still running when the signal arrives.
        assert post(f"{base}/v1/sessions/{sid}/audio", b"\x00\x01" * 24000)[0] == 200
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        status, _ = post(base + "/v1/sessions", {})
        assert status == 503
        events = [json.loads(line) for line in stream]
        assert events[-1] == {"type": "end", "reason": "input_end"}
        assert sum(e["type"] == "audio" for e in events) == 12  # 13 frames in, one of delay
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_build_engine_warms_up_and_freezes_the_startup_heap(tiny_wrap_ckpt, capsys):
    import gc

    from api.server import build_engine
    from engine import capacity
    from engine.config import EngineConfig, ServeConfig
    try:
        engine = build_engine(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=2), ServeConfig())
        assert gc.get_freeze_count() > 0
        out = capsys.readouterr().out
        assert "warmed up batch sizes [1, 2]" in out
        assert "a tick at full context takes" in out and "with 1 / 2 session(s)" in out
        assert engine.runner.max_sessions == 2
        metrics = engine.metrics.render()
        assert 'lockstep:probe_tick_seconds{sessions="2"}' in metrics
        assert f"lockstep:realtime_capacity_sessions {capacity.realtime_sessions(engine.metrics.probe)}" in metrics
    finally:
        gc.unfreeze()


def test_a_batch_invariant_server_warms_and_probes_its_one_shape(tiny_wrap_ckpt, capsys):
    import gc

    from api.server import build_engine
    from engine.config import EngineConfig, ServeConfig
    try:
        cfg = EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=3, batch_invariant=True)
        engine = build_engine(cfg, ServeConfig())
        out = capsys.readouterr().out
        assert "warmed up batch sizes [3]" in out and "with 3 session(s)" in out
        assert "3 slots (batch-invariant: every tick steps them all)" in out
        assert set(engine.metrics.probe) == {3}
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("probe, admitted", [({1: 0.03, 2: 0.2}, 1), ({1: 0.03, 2: 0.05}, 2), ({1: 0.2, 2: 0.3}, None)])
def test_admit_realtime_caps_admission_at_the_probed_capacity(tiny_wrap_ckpt, monkeypatch, capsys, probe, admitted):
    import gc

    from api.server import build_engine
    from engine import capacity
    from engine.config import ConfigError, EngineConfig, SamplingConfig, ServeConfig
    monkeypatch.setattr(capacity, "probe_ticks", lambda runner: probe)
    cfg = EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=2)
    try:
        if admitted is None:
            with pytest.raises(ConfigError, match="even one session runs slower than real time"):
                build_engine(cfg, ServeConfig(admit_realtime=True))
            return
        engine = build_engine(cfg, ServeConfig(admit_realtime=True))
        out = capsys.readouterr().out
        assert (f"--admit-realtime admits at most {admitted} at once" in out) == (admitted < 2)
        assert f"lockstep:admission_limit_sessions {admitted}" in engine.metrics.render()
        sessions = [engine.create_session(SamplingConfig(), lambda event: None) for _ in range(admitted)]
        assert all(sessions) and engine.create_session(SamplingConfig(), lambda event: None) is None
        engine.end_session(sessions[0].id, "done")  # never joined: frees its place at once
        assert engine.create_session(SamplingConfig(), lambda event: None) is not None
    finally:
        gc.unfreeze()


def test_a_trickling_upload_does_not_hold_the_shutdown(tiny_wrap_ckpt):
    """After the drain ends the sessions, an upload still trickling in is cut off (its session has
    ended), so the server stops rather than wait on the connection."""
    import threading
    proc, port = start_server(tiny_wrap_ckpt, "--max-sessions", "1", "--shutdown-timeout", "0.5", "--no-warmup")
    base = f"http://127.0.0.1:{port}"
    try:
        sid = json.loads(post(base + "/v1/sessions", {})[1])["id"]
        replies = []

        def trickle():
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(f"POST /v1/sessions/{sid}/audio HTTP/1.1\r\nHost: x\r\n"
                          "Transfer-Encoding: chunked\r\n\r\n".encode())
                try:
                    for _ in range(100):
                        s.sendall(b"2\r\n\x00\x00\r\n")
                        time.sleep(0.1)
                    s.settimeout(5)
                    replies.append(s.recv(200))
                except OSError as e:  # the server went away first
                    replies.append(repr(e).encode())
        thread = threading.Thread(target=trickle)
        thread.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0  # the session ended, the upload was answered, the server stopped
        thread.join(timeout=15)
        assert replies and (replies[0].startswith(b"HTTP/1.1 409") or b"Error" in replies[0])
    finally:
        if proc.poll() is None:
            proc.kill()
