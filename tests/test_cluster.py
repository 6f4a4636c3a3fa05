"""lockstep on Ray Serve (api/cluster.py), end to end: a real two-node Ray cluster started here
(ray.cluster_utils.Cluster), two CPU replicas of a tiny checkpoint deployed by Serve's own CLI from a
config file naming api.cluster:app_builder, every request through Serve's proxies (the head node's
and the second node's, on ports of their own)."""
import asyncio
import base64
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from engine.audio import pcm_to_s16le
from tests.servers import free_port, read_events
from tests.test_api import expected  # noqa: F401 (the fixture: what `lockstep generate` gives)

ray = pytest.importorskip("ray")
aiohttp = pytest.importorskip("aiohttp")
pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SLOTS = 4  # per replica
ADMISSION_WAIT = 3.0


class Front:
    def __init__(self, url: str, url2: str):
        self.url, self.url2 = url, url2

    async def json(self, http, method: str, path: str, base: str | None = None, **kw) -> tuple[int, dict, dict]:
        async with http.request(method, (base or self.url) + path, **kw) as r:
            body = await r.read()
            return r.status, (json.loads(body) if body.strip() else {}), dict(r.headers)


def wait_for(check, timeout: float = 60.0, what: str = "the condition"):
    """Polls `check` (each poll awaits the cluster's answer) until it returns a true value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def get(url: str) -> tuple[int, dict | str]:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = r.read().decode()
            return r.status, (json.loads(body) if r.headers.get_content_type() == "application/json" else body)
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body or b"{}")
        except ValueError:  # Serve's own answer while the application deploys
            return e.code, {"detail": body.decode(errors="replace")}
    except OSError:
        return 0, {}


def ready_replicas(front: Front) -> set[str]:
    status, body = get(front.url + "/readyz")
    return {r for r, v in body.get("replicas", {}).items() if v["ready"]} if status == 200 else set()


def node_args() -> dict:
    """A node of two CPUs whose agents listen on ports given here: a raylet then need not wait for
    its agents to report theirs (which, on a loaded machine, can outlast its startup timeout)."""
    return {"num_cpus": 2, "metrics_agent_port": free_port(), "metrics_export_port": free_port(),
            "dashboard_agent_listen_port": free_port(), "runtime_env_agent_port": free_port()}


def serve_config(port: int, ckpt, replicas: int | None = None) -> dict:
    """A Serve config file for lockstep's application builder, as deploy/ray-serve.yaml is;
    `replicas` overrides Serve's replica count (an in-place update: the replicas are kept)."""
    app = {"name": "lockstep", "route_prefix": "/", "import_path": "api.cluster:app_builder",
           "args": {"device": "cpu", "model_dir": str(ckpt), "max_sessions": SLOTS, "replicas": 2,
                    "replica_cpus": 2, "admission_wait": ADMISSION_WAIT, "idle_timeout": 60}}
    if replicas is not None:
        app["deployments"] = [{"name": "LockstepReplica", "num_replicas": replicas}]
    return {"proxy_location": "EveryNode", "http_options": {"host": "127.0.0.1", "port": port},
            "applications": [app]}


def serve_run(address: str, config: dict, folder: Path) -> None:
    """Serve's own CLI deploys the config, as a user of Serve's config files would."""
    import subprocess
    import sys
    path = folder / "serve.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(config))
    serve_cli = Path(sys.executable).with_name("serve")
    done = subprocess.run([str(serve_cli), "run", "--non-blocking", "--address", address, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def front(tiny_wrap_ckpt, tmp_path_factory):
    from ray import serve
    from ray.cluster_utils import Cluster

    from api.cluster_launch import NODE_ENV
    port, port2 = free_port(), free_port()
    # Both nodes run on this machine: the second node's proxy takes a port of its own.
    env = {"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(port2), **NODE_ENV}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cluster = Cluster()
    folder = tmp_path_factory.mktemp("serve")
    try:
        cluster.add_node(include_dashboard=False, **node_args())
        cluster.add_node(**node_args())
        ray.init(address=cluster.address, log_to_driver=False)
        # Two CPUs per replica and per node: one replica on each node.
        serve_run(cluster.address, serve_config(port, tiny_wrap_ckpt), folder)
        srv = Front(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port2}")
        srv.scale = lambda n: serve_run(cluster.address, serve_config(port, tiny_wrap_ckpt, n), folder)  # type: ignore[attr-defined]
        wait_for(lambda: len(ready_replicas(srv)) == 2, timeout=180, what="both replicas on the board")
        yield srv
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def wait_idle(front: Front) -> None:
    """Until every slot of both replicas is free (the sessions of a test before have ended)."""
    wait_for(lambda: get(front.url + "/readyz")[1].get("free_slots") == 2 * SLOTS, timeout=90,
             what="every slot free")


@pytest.fixture(scope="module")
def long_calls(tiny_wrap_ckpt, expected):
    """Inputs several seconds long (an input repeated), and what `lockstep generate` gives for each."""
    from engine.config import EngineConfig, SamplingConfig
    from engine.generate import run_sessions
    from engine.runner import ModelRunner
    runner = ModelRunner.load(EngineConfig(device="cpu", model_dir=str(tiny_wrap_ckpt), max_sessions=2))
    inputs = {f"charlie{k}": np.concatenate([expected["charlie"][0]] * k) for k in (2, 4)}
    out = run_sessions(runner, inputs, {name: SamplingConfig(greedy=True) for name in inputs})
    return {name: (inputs[name], out[name].text_tokens, out[name].audio_tokens) for name in inputs}


def replica_worker_pid(replica: str) -> int:
    """The Ray worker process of a replica: the parent of the engine process whose session ids
    start with the replica's id (read from the engine's runtime folder)."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"engine.process" in cmd:
            try:  # another server's engine may end (and take its folder) meanwhile
                config = json.loads((Path(cmd[-2].decode()) / "config.json").read_text())
            except (OSError, ValueError):
                continue
            if config["serve"].get("session_prefix") == replica + ".":
                return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    raise LookupError(f"no engine process for replica {replica}")


def owner(sid: str) -> str:
    return sid.split(".", 1)[0]


async def paced(raw: bytes, realtime: bool):
    for i in range(0, len(raw), 3840):
        if realtime:
            await asyncio.sleep(0.08)
        yield raw[i:i + 3840]


async def rest_session(http, front: Front, pcm: np.ndarray, realtime: bool = False, on_created=None,
                       swap: bool = False) -> tuple[dict, list[dict]]:
    """Create on one proxy, look it up, upload and stream through the other: every later request
    of the session must reach the replica that made it, whichever proxy it enters by."""
    first, second = (front.url2, front.url) if swap else (front.url, front.url2)
    status, info, _ = await front.json(http, "POST", "/v1/sessions", first,
                                       json={"greedy": True, "end_on_input_end": True, "realtime": realtime})
    assert status == 201, info
    if on_created:
        on_created(info)
    status, looked_up, _ = await front.json(http, "GET", f"/v1/sessions/{info['id']}", second)
    assert status == 200 and looked_up["id"] == info["id"], looked_up
    events: list[dict] = []

    reader = asyncio.create_task(read_events(http, f"{first}/v1/sessions/{info['id']}/stream", events))
    try:
        async with http.post(f"{second}/v1/sessions/{info['id']}/audio", data=paced(pcm_to_s16le(pcm), realtime)) as r:
            assert r.status == 200, await r.text()
    except aiohttp.ClientError:
        pass  # its replica went away mid-upload: the stream says what happened
    await asyncio.wait_for(reader, 60)
    return info, events


def tokens_of(events: list[dict]) -> tuple[list, list]:
    tokens = [e for e in events if e["type"] == "tokens"]
    return [e["text_token"] for e in tokens], [e["audio_tokens"] for e in tokens]


def metric_by_replica(front: Front, name: str) -> dict[str, float]:
    status, text = get(front.url + "/metrics")
    assert status == 200
    out = {}
    for line in text.splitlines():
        if line.startswith(f"lockstep:{name}{{"):
            labels, value = line[len(name) + 10:].rsplit("} ", 1)
            out[dict(kv.split("=", 1) for kv in labels.split(","))["replica"].strip('"')] = float(value)
    return out


def test_one_view_of_health_and_metrics(front):
    status, body = get(front.url + "/healthz")
    assert status == 200 and len(body["replicas"]) == 2
    status, body = get(front.url2 + "/readyz")
    assert status == 200 and body["free_slots"] == 2 * SLOTS
    slots = metric_by_replica(front, "slots_total")
    assert slots == {r: SLOTS for r in body["replicas"]}
    _, text = get(front.url + "/metrics")
    assert "# TYPE lockstep:step_duration_seconds histogram" in text and "lockstep:cluster_replicas 2" in text
    assert text.count("# TYPE lockstep:step_duration_seconds histogram") == 1  # one family, every replica in it


def test_every_kind_of_session_runs_over_both_replicas_with_generate_tokens(front, expected):
    from api.client import chat
    sphn = pytest.importorskip("sphn")
    created = metric_by_replica(front, "sessions_created_total")

    async def websocket_call():
        pcm = expected["charlie"][0].reshape(-1)
        writer, reader = sphn.OpusStreamWriter(24000), sphn.OpusStreamReader(24000)
        got = 0
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(front.url2.replace("http", "ws") + "/api/chat") as ws:
                assert await ws.receive_bytes(timeout=30) == b"\x00"
                for i in range(0, len(pcm), 1920):
                    page = writer.append_pcm(pcm[i:i + 1920])
                    if page:
                        await ws.send_bytes(b"\x01" + page)
                while got < 24000 * 0.5:
                    msg = await ws.receive_bytes(timeout=30)
                    if msg[0] == 1:
                        decoded = reader.append_bytes(msg[1:])
                        got += 0 if decoded is None else len(decoded)
        return got

    async def main():
        async with aiohttp.ClientSession() as http:
            names = ["delta", "bravo"]
            rest = [rest_session(http, front, expected[n][0].reshape(-1), swap=i % 2 == 1) for i, n in enumerate(names)]
            chats = [chat(front.url, expected["delta"][0].reshape(-1), realtime=False, params={"greedy": True}),
                     chat(front.url2, expected["delta"][0].reshape(-1), realtime=True, params={"greedy": True})]
            results = await asyncio.gather(*rest, *chats, websocket_call())
            return names, results

    names, results = asyncio.run(main())
    for name, (info, events) in zip(names, results[:2]):
        assert tokens_of(events) == (expected[name][1], expected[name][2]) and events[-1]["reason"] == "input_end", \
            (info["id"], events[-3:])
    for res in results[2:4]:  # /v1/chat as fast as it goes, and paced in real time (lockstep client)
        assert res.text_tokens == expected["delta"][1] and res.end_reason == "input_end"
    assert results[4] >= 24000 * 0.5
    wait_for(lambda: sum(metric_by_replica(front, "sessions_created_total").values()) >= sum(created.values()) + 5,
             what="the board to count the 5 sessions")
    now = metric_by_replica(front, "sessions_created_total")
    assert len(now) == 2 and all(now[r] > created.get(r, 0) for r in now), (created, now)  # both replicas used


def test_twenty_rest_sessions_each_reach_their_replica(front, expected):
    names = ["delta", "bravo"] * 10
    wait_idle(front)

    async def main():
        # Half the slots at a time: two proxies place apart on reports up to a period old, so at
        # full occupancy a caller may meet a full replica while the other has a slot (the 503 test).
        gate = asyncio.Semaphore(SLOTS)
        async with aiohttp.ClientSession() as http:
            async def one(i, name):
                async with gate:
                    info, events = await rest_session(http, front, expected[name][0].reshape(-1), swap=i % 2 == 1)
                # Ended: its own replica answers (404), not another (410).
                status, body, _ = await front.json(http, "DELETE", f"/v1/sessions/{info['id']}", front.url2)
                return info, events, status
            return await asyncio.gather(*[one(i, n) for i, n in enumerate(names)])

    results = asyncio.run(main())
    for name, (info, events, deleted) in zip(names, results):
        assert tokens_of(events) == (expected[name][1], expected[name][2]), info["id"]
        assert deleted == 404
    assert len({owner(info["id"]) for info, _, _ in results}) == 2


def test_all_slots_busy_gets_503_then_a_freed_slot_admits_the_next_caller(front):
    wait_idle(front)

    async def main():
        async with aiohttp.ClientSession() as http:
            held = []
            for _ in range(2 * SLOTS):
                status, info, _ = await front.json(http, "POST", "/v1/sessions", json={"realtime": False})
                assert status == 201, info
                held.append(info["id"])
            assert {owner(s) for s in held} == set(ready_replicas(front))  # filled evenly: both
            start = time.monotonic()
            status, body, headers = await front.json(http, "POST", "/v1/sessions", json={})
            waited = time.monotonic() - start
            assert status == 503 and int(headers["Retry-After"]) >= 1, body
            assert "busy" in body["detail"] and ADMISSION_WAIT * 0.9 <= waited < ADMISSION_WAIT + 5
            # A caller waits; a slot frees on one replica; the router sends the caller there.
            waiting = asyncio.create_task(front.json(http, "POST", "/v1/sessions", front.url2, json={}))
            await asyncio.sleep(0)  # the caller is on its way before the slot frees
            status, _, _ = await front.json(http, "DELETE", f"/v1/sessions/{held[3]}")
            assert status == 204
            status, info, _ = await waiting
            assert status == 201, info
            for sid in held[:3] + held[4:] + [info["id"]]:
                assert (await front.json(http, "DELETE", f"/v1/sessions/{sid}"))[0] == 204

    asyncio.run(main())


def test_a_killed_replica_ends_its_calls_others_finish_and_it_is_replaced(front, expected, long_calls):
    pcm, want_text, want_audio = long_calls["charlie2"]
    pcm = pcm.reshape(-1)
    short = expected["delta"]
    wait_idle(front)
    before = ready_replicas(front)

    async def main():
        created: list[dict] = []
        async with aiohttp.ClientSession() as http:
            # Uploads run through at once; each stream runs a frame a tick (4.6 s).
            # Both made through one proxy: its router spreads them (two routers decide apart).
            calls = [asyncio.create_task(rest_session(http, front, pcm, on_created=created.append))
                     for i in range(2)]
            wait_until = time.monotonic() + 30
            while len(created) < 2 and time.monotonic() < wait_until:
                await asyncio.sleep(0.05)
            owners = [owner(c["id"]) for c in created]
            assert len(set(owners)) == 2, owners  # one call on each replica
            await asyncio.sleep(1.0)  # both calls well under way
            victim = owners[0]
            os.kill(replica_worker_pid(victim), signal.SIGKILL)
            results = await asyncio.gather(*calls)
            # `created` is in the order the calls were admitted, not the order of `calls`.
            (lost_info, lost_events), (kept_info, kept_events) = sorted(
                results, key=lambda r: owner(r[0]["id"]) != victim)
            status, body, _ = await front.json(http, "GET", f"/v1/sessions/{lost_info['id']}")
            return victim, lost_events, kept_events, status, body

    victim, lost_events, kept_events, status, body = asyncio.run(main())
    assert lost_events[-1] == {"type": "end", "reason": "replica_lost"}
    assert status == 410 and "lost with its replica" in body["detail"]
    assert kept_events[-1]["reason"] == "input_end" and tokens_of(kept_events) == (want_text, want_audio)
    # Serve replaces the replica; once it is up, new calls are admitted and placed on it too.
    replacement = wait_for(lambda: (ready_replicas(front) - before) if len(ready_replicas(front)) == 2 else None,
                           timeout=120, what="the replacement replica")

    async def again():
        async with aiohttp.ClientSession() as http:
            return await asyncio.gather(*[rest_session(http, front, short[0].reshape(-1)) for _ in range(2)])

    results = asyncio.run(again())
    assert all(tokens_of(events) == (short[1], short[2]) for _, events in results)

    def placed_on_replacement() -> bool:  # once the routers have it in their lists too
        async def two():
            async with aiohttp.ClientSession() as http:
                made = [await front.json(http, "POST", "/v1/sessions", json={}) for _ in range(2)]
                for _, info, _ in made:
                    await front.json(http, "DELETE", f"/v1/sessions/{info['id']}")
                return {owner(info["id"]) for status, info, _ in made if status == 201}
        return bool(asyncio.run(two()) & replacement)

    wait_for(placed_on_replacement, timeout=60, what="a new session placed on the replacement")


def test_scaling_down_drains_the_removed_replica(front, long_calls):
    """Serve scaled from 2 replicas to 1 (an in-place update of the config) while a call runs on
    each: the replica removed stops admitting and keeps its call to the end; none is cut."""
    from ray import serve
    pcm, want_text, want_audio = long_calls["charlie4"]  # within --max-buffer-seconds: uploaded at once
    pcm = pcm.reshape(-1)
    wait_idle(front)
    before = ready_replicas(front)

    def states() -> dict:
        return serve.status().applications["lockstep"].deployments["LockstepReplica"].replica_states

    def reported_sessions(replica: str) -> int:
        return get(front.url + "/readyz")[1].get("replicas", {}).get(replica, {}).get("sessions", 0)

    async def main():
        created: list[dict] = []
        async with aiohttp.ClientSession() as http:
            # One call, then, once its replica reports it, another: the router puts it on the other.
            calls = [asyncio.create_task(rest_session(http, front, pcm, on_created=created.append))]  # 9.2 s
            while not created or not reported_sessions(owner(created[0]["id"])):
                await asyncio.sleep(0.05)
            calls.append(asyncio.create_task(rest_session(http, front, pcm, on_created=created.append)))
            while len(created) < 2:
                await asyncio.sleep(0.05)
            await asyncio.get_running_loop().run_in_executor(None, front.scale, 1)
            removing_mid_call = False
            while not all(c.done() for c in calls):
                removing_mid_call |= states().get("RUNNING", 0) == 1
                await asyncio.sleep(0.2)
            return [c.result() for c in calls], removing_mid_call

    results, removing_mid_call = asyncio.run(main())
    assert len({owner(info["id"]) for info, _ in results}) == 2
    assert removing_mid_call, "Serve took the replica out only after both calls had ended"
    for info, events in results:  # none was cut: each ran to its input's end, every frame right
        assert events[-1] == {"type": "end", "reason": "input_end"}, events[-1]
        assert tokens_of(events) == (want_text, want_audio)
    wait_for(lambda: states().get("RUNNING", 0) == 1 and len(ready_replicas(front)) == 1, timeout=90,
             what="the scale-down to one replica")
    assert ready_replicas(front) < before
