"""`lockstep serve` as a process: SIGTERM refuses new sessions and lets running ones finish."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from engine.host import API_NICE
from tests.servers import LiveServer, free_port, http


def post(url: str, body: dict | bytes):
    return http("POST", url, body)


def start_server(ckpt, *flags: str) -> tuple[subprocess.Popen, int]:
    srv = LiveServer(ckpt, *flags)
    return srv.proc, srv.port


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

    from engine.process.main import build_engine
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

    from engine.process.main import build_engine
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

    from engine.process.main import build_engine
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


def test_the_engine_ticks_in_a_process_of_its_own(tiny_wrap_ckpt):
    srv = LiveServer(tiny_wrap_ckpt, "--max-sessions", "1", "--no-warmup", "--api-workers", "2",
                     "--engine-threads", "1")
    try:
        assert "1 CPU thread(s)" in srv.log()
        pids = srv.pids()
        assert len(pids["engine"]) == 1 and len(pids["api"]) == 2
        assert srv.proc.pid not in pids["engine"] + pids["api"]
        # The API processes yield the CPU to the tick (each lowers itself once it has started).
        def nice(pid: int) -> int:  # the 19th field of /proc/PID/stat
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
        expected = min(19, nice(pids["engine"][0]) + API_NICE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(nice(a) != expected for a in srv.pids()["api"]):
            time.sleep(0.1)
        assert [nice(a) for a in srv.pids()["api"]] == [expected] * 2
    finally:
        assert srv.stop() == 0


def test_a_dead_engine_fails_health_and_ends_the_server_with_status_1(tiny_wrap_ckpt):
    srv = LiveServer(tiny_wrap_ckpt, "--max-sessions", "1", "--no-warmup")
    try:
        sid = json.loads(post(srv.url + "/v1/sessions", {})[1])["id"]
        stream = urllib.request.urlopen(f"{srv.url}/v1/sessions/{sid}/stream", timeout=10)
        os.kill(srv.pids()["engine"][0], signal.SIGKILL)
        # The stream says why it ended rather than hang; the server exits with status 1.
        assert [json.loads(line) for line in stream] == [{"type": "end", "reason": "engine_lost"}]
        assert srv.proc.wait(timeout=20) == 1
        assert "the engine process ended" in srv.log()
    finally:
        srv.stop(signal.SIGKILL)


def test_a_hung_engine_fails_liveness_then_ends_the_server(tiny_wrap_ckpt):
    srv = LiveServer(tiny_wrap_ckpt, "--max-sessions", "1", "--no-warmup", "--engine-timeout", "6")
    engine = srv.pids()["engine"][0]
    try:
        os.kill(engine, signal.SIGSTOP)  # as a hung device or a deadlock would
        deadline = time.monotonic() + 10
        while srv.get("/healthz")[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        status, body = srv.get("/healthz")
        assert status == 503 and "the engine loop has not come round for" in json.loads(body)["reason"]
        assert srv.get("/readyz")[0] == 503
        assert srv.proc.wait(timeout=20) == 1
        assert "--engine-timeout" in srv.log()
    finally:
        try:
            os.kill(engine, signal.SIGKILL)
        except ProcessLookupError:
            pass
        srv.stop(signal.SIGKILL)


def open_call(port: int) -> tuple[socket.socket, str]:
    """A /v1/chat call on a raw connection, two frames of audio in: (connection, session id)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /v1/chat?greedy=1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    send_frames(s, 2)
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    return s, re.search(rb"x-session-id: (\S+)", head).group(1).decode()


def send_frames(s: socket.socket, n: int) -> None:
    frame = b"\x00\x01" * 1920
    for _ in range(n):
        s.sendall(b"%x\r\n" % len(frame) + frame + b"\r\n")


def test_a_dead_api_process_loses_only_its_own_calls_and_is_replaced(tiny_wrap_ckpt):
    """Two API processes: killing one cuts the calls it held; a call held by the other goes on to
    its end, and the supervisor starts a new API process in the dead one's place."""
    srv = LiveServer(tiny_wrap_ckpt, "--max-sessions", "4", "--no-warmup", "--api-workers", "2")
    calls = []
    try:
        owners: dict[str, list] = {}
        for _ in range(4):  # connections land on either process: keep one call on each, if the kernel obliges
            s, sid = open_call(srv.port)
            calls.append(s)
            owner = next(x["api_process"] for x in srv.sessions() if x["id"] == sid)
            owners.setdefault(owner, []).append((s, sid))
        if len(owners) < 2:
            pytest.skip("the kernel handed every connection to one API process")
        (victim, cut), (_, kept) = sorted(owners.items())[:2]
        victim_pid = srv.pids()["api"][int(victim.split("-")[1])]
        os.kill(victim_pid, signal.SIGKILL)
        for s, sid in kept:  # the other process's calls run to their end, with their output
            send_frames(s, 5)
            s.sendall(b"0\r\n\r\n")
        for s, sid in kept:
            got = b""
            while b"input_end" not in got:
                data = s.recv(1 << 16)
                assert data, f"call {sid} was cut"
                got += data
            assert got.count(b"\"type\": \"audio\"") >= 6  # and more where its input ran dry meanwhile
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (len(srv.pids()["api"]) == 2 and victim_pid not in srv.pids()["api"]):
            time.sleep(0.1)
        assert len(srv.pids()["api"]) == 2 and victim_pid not in srv.pids()["api"]
        assert srv.wait_idle()  # the cut calls' sessions ended too (api_process_lost)
        assert "starting another in its place" in srv.log()
    finally:
        for c in calls:
            c.close()
        assert srv.stop() == 0


def test_metrics_on_a_port_of_their_own(tiny_wrap_ckpt):
    port = free_port()
    srv = LiveServer(tiny_wrap_ckpt, "--max-sessions", "1", "--no-warmup", "--metrics-port", str(port),
                     "--api-key", "k", key="k")
    try:
        assert srv.get("/metrics")[0] == 404  # not on the API port
        status, body = http("GET", f"http://127.0.0.1:{port}/metrics")  # no key there
        assert status == 200 and b"lockstep:ticks_total" in body
        assert http("GET", f"http://127.0.0.1:{port}/v1/sessions")[0] == 404
    finally:
        assert srv.stop() == 0
