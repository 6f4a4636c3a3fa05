"""lockstep on Ray Serve: one engine per replica (one per GPU), every replica behind Ray Serve's
proxies, one endpoint for the whole cluster.

A replica is `lockstep serve` less its supervisor: it starts one engine process (api/engine_process.py,
on the GPU Ray gave the replica, or the CPU) and serves the same ASGI app (api/app.py) over an
engine link, so every route works through Serve's proxy unchanged. The engine does not know it is
distributed. Around the app the replica adds only:
- its replica id at the head of each session id, which the router (api/cluster_router.py) reads to
  send a REST session's later requests to it; a request naming another replica's session reaches
  this one only when that replica is gone, and gets 410;
- its load for the router (`record_routing_stats`) and the autoscaler (`record_autoscaling_stats`,
  api/cluster_scaling.py), its metrics and state for the board (api/cluster_board.py), from which
  /metrics, /healthz and /readyz answer for the whole application;
- Serve's health check (a dead or stalled engine fails it: Serve replaces the replica) and drain.

Two ways in: `lockstep serve --ray ...` (api/cluster_launch.py), or Serve's own config files naming the
builder `api.cluster:app_builder` (deploy/ray-serve.yaml).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time

from ray import serve
from ray.serve.config import RequestRouterConfig

from api.app import check_key, create_app
from api.cluster_board import Board
from api.cluster_router import SID_SEP, Placements, owner_of, route_path, session_in_path
from api.engine_process import EngineFailed, EngineProcess
from api.link import EngineLink
from engine.config import ClusterConfig, ConfigError, EngineConfig, ServeConfig, from_dict
from engine.process.runtime import HEARTBEAT_NAME, SOCKET_NAME

log = logging.getLogger("lockstep")
APP_NAME = "lockstep"
REPORT_SECONDS = 1.0
FINAL_DRAIN_SECONDS = 5.0  # sessions no call holds (REST, not streamed) get this long once Serve's drain is over
FORGET_SECONDS = 2.0  # for the board to drop a removed replica's series


async def _reply(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *headers]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


@serve.ingress()
class LockstepReplica:
    async def __init__(self, engine_args: dict, serve_args: dict, board, stats_period: float) -> None:
        self.id = serve.get_replica_context().replica_id.unique_id
        self.cfg = dataclasses.replace(from_dict(ServeConfig, serve_args), session_prefix=self.id + SID_SEP).validate()
        self.board, self.seq, self.placed = board, 0, Placements(stats_period)
        self.engine = EngineProcess(engine_args, self.cfg)
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.wait_ready)
        except EngineFailed as e:
            self.engine.stop()
            raise RuntimeError(f"replica {self.id}: the engine process ended with status {e.code} while starting "
                               "(its message is in this replica's log)") from None
        self.link = await EngineLink.connect(str(self.engine.runtime / SOCKET_NAME), f"replica-{self.id}",
                                             str(self.engine.runtime / HEARTBEAT_NAME))
        self.link.on_open = self.placed.note
        self.api = create_app(self.link, self.cfg)
        self.reporter = asyncio.create_task(self._report())
        log.info("replica %s: engine process %d ready, %d slots", self.id, self.engine.proc.pid, self.link.max_sessions)

    def __serve_build_asgi_app__(self):
        async def front(scope, receive, send) -> None:  # a function: uvicorn takes a bound method for ASGI2
            await self.front(scope, receive, send)
        return front

    # ---- what the proxy sends -------------------------------------------------------------------
    async def front(self, scope, receive, send) -> None:
        path = route_path(scope) if scope["type"] in ("http", "websocket") else ""
        if scope["type"] == "http" and path in ("/healthz", "/readyz", "/metrics"):
            if await self._whole_application(path, scope, send):
                return
        sid = session_in_path(path) if scope["type"] == "http" else None
        owner = owner_of(sid) if sid else None
        if owner is not None and owner != self.id:
            if not self._authorized(scope):
                return await _reply(send, 401, {"detail": "missing or wrong API key (send 'Authorization: Bearer KEY')"})
            return await _reply(send, 410, {"detail": f"session {sid!r} was lost with its replica ({owner}, which is "
                                                      "gone): start a new session"})
        await self.api(scope, receive, send)

    def _authorized(self, scope) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        return check_key(self.cfg, headers.get("authorization"))

    async def _whole_application(self, path: str, scope, send) -> bool:
        """/metrics, /healthz and /readyz for every replica, from the board; False when the board
        does not answer (this replica's own then answer)."""
        if path == "/metrics" and not self._authorized(scope):
            await _reply(send, 401, {"detail": "missing or wrong API key (send 'Authorization: Bearer KEY')"})
            return True
        try:
            if path == "/metrics":
                text = await self.board.metrics.remote()
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"text/plain; version=0.0.4")]})
                await send({"type": "http.response.body", "body": text.encode()})
                return True
            health = await self.board.health.remote()
        except Exception as e:  # the board is being replaced: this replica answers for itself
            log.warning("replica %s: the board did not answer (%s)", self.id, e)
            return False
        if path == "/healthz":
            ok = health["serving"] > 0
            body = {"status": "ok" if ok else "no replica serving", "replicas": health["replicas"]}
        else:
            ok = health["ready"] > 0
            body = {"status": "ready" if ok else "no replica ready", "free_slots": health["free"],
                    "replicas": health["replicas"]}
        await _reply(send, 200 if ok else 503, body)
        return True

    # ---- what Serve asks ------------------------------------------------------------------------
    def load(self) -> dict:
        state = self.link.state
        return {"seq": self.seq, "free": state["free"], "sessions": state["sessions"], "slots": self.link.max_sessions,
                "waiting": len(self.link._admission), "draining": bool(state["draining"]),
                "stalled": self.link.stalled() is not None, "placed": self.placed.names()}

    def record_routing_stats(self) -> dict:
        self.seq += 1  # the router counts what it sent since this report
        return self.load()

    def record_autoscaling_stats(self) -> dict:
        load = self.load()
        return {"sessions": float(load["sessions"] + load["waiting"]),
                "slots": float(max(1, load["sessions"] + load["free"]) if not load["draining"] else load["slots"])}

    def check_health(self) -> None:
        code = self.engine.proc.poll()
        if code is not None:
            raise RuntimeError(f"replica {self.id}: the engine process ended with status {code}")
        # As `lockstep serve` does: /readyz says "stalled" after 5 s (the router then prefers other
        # replicas), but only a loop stuck for --engine-timeout is a hang worth a new replica.
        age = self.link.heartbeat.age() if self.link.heartbeat else None
        if self.link.lost or (age is not None and age > self.cfg.engine_timeout):
            raise RuntimeError(f"replica {self.id}: {self.link.stalled() or 'the engine loop is stuck'}")

    async def _report(self) -> None:
        while not self.link.lost:
            try:
                text = (await self.link.request("metrics"))["text"]
                await self.board.report.remote(self.id, self.load(), text)
            except Exception as e:
                log.warning("replica %s: could not report to the board (%s)", self.id, e)
            self.engine.skim()
            await asyncio.sleep(REPORT_SECONDS)

    async def __del__(self) -> None:
        """Serve has drained this replica's calls (up to --shutdown-timeout): the sessions no call
        holds get a few seconds, then end with "server_shutdown", then the engine stops."""
        if not hasattr(self, "reporter"):  # it failed while starting: its engine went with it
            return
        self.reporter.cancel()
        try:
            self.link.note("drain")
            deadline = time.monotonic() + min(FINAL_DRAIN_SECONDS, self.cfg.shutdown_timeout)
            while (await self.link.request("list"))["sessions"] and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            self.link.note("end_all", reason="server_shutdown")
            await asyncio.sleep(0.3)  # the end events reach their streams
        except Exception as e:
            log.warning("replica %s: the engine went away while draining (%s)", self.id, e)
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)
        # Bounded: when the whole application goes, the board may be gone first, and a call to a
        # deployment with no replica waits for one that never comes (Serve then kills this replica
        # after its grace period).
        forget = self.board.forget.remote(self.id)
        try:
            await asyncio.wait_for(asyncio.ensure_future(forget), FORGET_SECONDS)
        except Exception:
            forget.cancel()


# ---- building the application --------------------------------------------------------------------
def replica_options(engine_args: dict, serve_cfg: ServeConfig, cluster: ClusterConfig, gpus: float) -> dict:
    """Serve's options for the engine deployment: one GPU each on CUDA, the router, the bounds."""
    device = engine_args.get("device") or "auto"
    on_gpu = device.startswith("cuda") or (device == "auto" and gpus >= 1)
    options = {
        "ray_actor_options": {"num_cpus": cluster.replica_cpus, "num_gpus": 1 if on_gpu else 0},
        # A session is one long request (two for a REST upload beside its stream): admission is the
        # engine's business, Serve's per-replica cap only stops floods.
        "max_ongoing_requests": 64 + 4 * max(1, int(engine_args.get("max_sessions") or 128)),
        "graceful_shutdown_timeout_s": serve_cfg.shutdown_timeout + FINAL_DRAIN_SECONDS + 5,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 2.0,
        "request_router_config": RequestRouterConfig(
            request_router_class="api.cluster_router:LockstepRouter",
            request_router_kwargs={"admission_wait": serve_cfg.admission_wait,
                                   "stats_period": cluster.routing_stats_period},
            request_routing_stats_period_s=cluster.routing_stats_period, max_backoff_s=0.1),
    }
    if cluster.min_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": cluster.min_replicas, "max_replicas": cluster.max_replicas,
            "initial_replicas": cluster.replicas or max(1, cluster.min_replicas), "upscale_delay_s": 5.0,
            "downscale_delay_s": cluster.downscale_delay, "metrics_interval_s": 1.0, "look_back_period_s": 10.0,
            "policy": {"policy_function": "api.cluster_scaling:SlotUsagePolicy",
                       "policy_kwargs": {"target_slot_usage": cluster.target_slot_usage}}}
    else:
        options["num_replicas"] = cluster.replicas or (max(1, int(gpus)) if on_gpu else 1)
    return options


def build(engine_args: dict, serve_cfg: ServeConfig, cluster: ClusterConfig):
    """The Serve application: the engine replicas, and the board they report to."""
    import ray
    if serve_cfg.metrics_port is not None:
        raise ConfigError("--metrics-port does not apply with --ray: /metrics at the front shows every replica")
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    board = serve.deployment(Board, name="LockstepBoard", num_replicas=1, ray_actor_options={"num_cpus": 0})
    engines = serve.deployment(LockstepReplica, name="LockstepReplica",
                               **replica_options(engine_args, serve_cfg, cluster, gpus))
    # The router holds a new session while no replica has a free slot, up to --admission-wait; a
    # replica itself then only waits out a stale report (a slot the router saw free, taken since).
    # The engine's CPU threads: the replica's CPUs less the one its API (the replica actor) runs on,
    # not the whole machine's, which several replicas share.
    replica_cfg = dataclasses.replace(serve_cfg, admission_wait=min(serve_cfg.admission_wait,
                                                                    max(0.5, 2 * cluster.routing_stats_period)),
                                      engine_threads=serve_cfg.engine_threads or max(1, int(cluster.replica_cpus) - 1))
    return engines.bind(engine_args, dataclasses.asdict(replica_cfg), board.bind(), cluster.routing_stats_period)


def app_builder(args: dict):
    """For Serve's config files (`serve run` / `serve deploy`): `args` holds lockstep serve's flags
    by field name (model_dir, max_sessions, admission_wait, replicas, ...)."""
    names = {cls: {f.name for f in dataclasses.fields(cls)} for cls in (EngineConfig, ServeConfig, ClusterConfig)}
    unknown = set(args) - set().union(*names.values())
    if unknown:
        raise ConfigError(f"unknown lockstep settings {sorted(unknown)}; known: {sorted(set().union(*names.values()))}")
    engine_args = {k: v for k, v in args.items() if k in names[EngineConfig]}
    serve_cfg = from_dict(ServeConfig, {k: v for k, v in args.items() if k in names[ServeConfig]}).validate()
    cluster = from_dict(ClusterConfig, {k: v for k, v in args.items() if k in names[ClusterConfig]}).validate()
    return build(engine_args, serve_cfg, cluster)
