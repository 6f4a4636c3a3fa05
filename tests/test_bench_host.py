"""bench/host.py against the stub engine: every transport's callers are served and measured."""
from __future__ import annotations

import json

from bench import host


def test_host_benchmark_measures_every_transport(tmp_path, capsys):
    out = tmp_path / "host.json"
    assert host.main(["--sessions", "3", "--seconds", "8", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["transport"]: r for r in result["rows"]}
    assert set(rows) == set(host.TRANSPORTS)
    for r in rows.values():
        assert r["failed_callers"] == 0, r
        assert r["api_workers"] == 1
        # 3 sessions over a 3 s window at 12.5 frames a second, give or take a tick at each edge
        assert 3 * 3 * 12.5 * 0.8 <= r["session_frames"] <= 3 * 3 * 12.5 * 1.2, r
        assert r["api_us_per_session_frame"] > 0 and r["engine_us_per_session_frame"] > 0
    assert {s["transport"] for s in result["summary"]} == set(host.TRANSPORTS)
    assert "one busy API core carries" in capsys.readouterr().out
