"""The parts of lockstep on Ray Serve that need no cluster: the router's placement and affinity, the
board's merged metrics, the autoscaling policy, the proxy middleware, the builder's settings."""
import asyncio
import json
import pickle
import time
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID  # noqa: E402
from ray.serve._private.common import StreamingHTTPRequest  # noqa: E402
from ray.serve._private.request_router.common import PendingRequest, RequestRoutingContext  # noqa: E402

from api.cluster_board import Board, merge, with_label  # noqa: E402
from api.cluster_proxy import END_LINE, ReplicaLossMiddleware  # noqa: E402
from api.cluster_router import LockstepRouter, Placements, opens_session, owner_of, route_path, session_in_path  # noqa: E402
from ray.serve import context as serve_context  # noqa: E402
from api.cluster_scaling import SlotUsagePolicy, desired_replicas  # noqa: E402
from engine.config import ClusterConfig, ConfigError, ServeConfig  # noqa: E402

DEPLOYMENT = DeploymentID(name="LockstepReplica", app_name="lockstep")


@dataclass
class Replica:
    """What the router reads of a running replica: its id and its latest load report."""
    unique_id: str
    routing_stats: dict = field(default_factory=dict)

    @property
    def replica_id(self) -> ReplicaID:
        return ReplicaID(self.unique_id, DEPLOYMENT)


def request(method: str, path: str, kind: str = "http", age: float = 0.0) -> PendingRequest:
    """A request as the proxy hands it to the router: the pickled ASGI scope."""
    scope = {"type": kind, "method": method, "path": path, "root_path": "", "headers": []}
    arg = pickle.dumps(StreamingHTTPRequest(asgi_scope=scope, proxy_actor_name="proxy"))
    metadata = SimpleNamespace(internal_request_id=uuid.uuid4().hex)
    return PendingRequest(args=[arg], kwargs={}, metadata=metadata, created_at=time.time() - age,  # type: ignore[arg-type]
                          future=None, routing_context=RequestRoutingContext())  # type: ignore[arg-type]


def stats(seq: int, free: int, sessions: int, slots: int = 4, **more) -> dict:
    return {"seq": seq, "free": free, "sessions": sessions, "slots": slots, "waiting": 0, "draining": False,
            "stalled": False, **more}


def router(admission_wait: float = 2.0) -> LockstepRouter:
    r = LockstepRouter(DEPLOYMENT, DeploymentHandleSource.PROXY)
    r.initialize_state(admission_wait=admission_wait)
    return r


def choose(r: LockstepRouter, replicas, pending) -> list[str]:
    ranks = asyncio.run(r.choose_replicas(replicas, pending))
    assert all(len(rank) == 1 for rank in ranks)  # one per rank: Ray's queue-length pick never overrides
    return [rank[0].unique_id for rank in ranks]


def test_paths_name_sessions_and_sessions_name_replicas():
    assert session_in_path("/v1/sessions/abc.x1/stream") == "abc.x1" and session_in_path("/v1/sessions/abc.x1") == "abc.x1"
    assert session_in_path("/v1/sessions") is None and session_in_path("/v1/chat") is None
    assert owner_of("abc.x1") == "abc" and owner_of("nodot") is None and owner_of(".x") is None and owner_of("a.") is None
    assert route_path({"path": "/app/v1/chat", "root_path": "/app"}) == "/v1/chat"
    assert opens_session({"type": "http", "method": "POST", "path": "/v1/chat"})
    assert opens_session({"type": "websocket", "path": "/api/chat"})
    assert not opens_session({"type": "http", "method": "GET", "path": "/v1/sessions"})


def test_a_session_request_goes_to_its_replica_whatever_the_load():
    a, b = Replica("aaa", stats(1, 0, 4)), Replica("bbb", stats(1, 4, 0))
    r = router()
    for path in ("/v1/sessions/aaa.s1", "/v1/sessions/aaa.s1/audio", "/v1/sessions/aaa.s1/stream"):
        method = "POST" if path.endswith("audio") else "GET"
        assert choose(r, [b, a], request(method, path)) == ["aaa"]
    # Its replica is gone: any replica takes it (and answers 410); an id no replica made, by load.
    assert choose(r, [b, a], request("GET", "/v1/sessions/zzz.s1"))[0] == "bbb"
    assert choose(r, [b, a], request("GET", "/v1/sessions/nodot"))[0] == "bbb"


def test_new_sessions_go_to_free_replicas_least_loaded_first_and_count_what_was_sent():
    a, b, c = Replica("aaa", stats(1, 1, 3)), Replica("bbb", stats(1, 2, 2)), Replica("ccc", stats(1, 0, 4))
    r = router()
    now = [100.0]
    r.clock = lambda: now[0]

    def ranks() -> list[str]:  # a request that opens nothing: ranked, not counted
        return choose(r, [a, b, c], request("GET", "/healthz"))

    first = request("POST", "/v1/sessions")
    assert choose(r, [a, b, c], first) == ["bbb", "aaa", "ccc"]
    # Counted once chosen, before Ray confirms it: bbb (1 free, 3 busy) now ties with aaa.
    assert set(ranks()[:2]) == {"aaa", "bbb"}
    # Ray sent it to aaa after all: the count follows it.
    r.on_request_routed(first, a.replica_id, None)
    assert ranks()[0] == "bbb"
    assert choose(r, [a, b, c], request("POST", "/v1/chat"))[0] == "bbb"
    assert choose(r, [a, b, c], request("GET", "/api/chat", kind="websocket"))[0] == "bbb"
    fresh = request("POST", "/v1/chat")
    assert choose(r, [a, b, c], fresh) == []  # all full with what was sent: held
    # A report seen at once may predate what was sent: it still counts.
    b.routing_stats = stats(2, 2, 2)
    assert choose(r, [a, b, c], fresh) == []
    # A report seen a period later includes it: the count starts again.
    now[0] += r.window + 0.01
    b.routing_stats = stats(3, 2, 2)
    assert choose(r, [a, b, c], fresh)[0] == "bbb"
    # Requests that open nothing are not counted.
    r.on_request_routed(request("GET", "/metrics"), a.replica_id, None)
    now[0] += r.window + 0.01
    a.routing_stats = stats(2, 1, 3)
    assert set(ranks()[:2]) == {"aaa", "bbb"}  # aaa still has its free slot


def test_a_report_naming_a_sent_session_as_placed_stops_its_count_at_once():
    """A full replica's report that names the request this router sent it holds it in its counts:
    counting it again would hold a caller for a slot that is free."""
    a = Replica("aaa", stats(1, 1, 3))
    r = router()
    r.clock = lambda: 100.0
    first = request("POST", "/v1/chat")
    assert choose(r, [a], first) == ["aaa"]
    fresh = request("POST", "/v1/chat")
    assert choose(r, [a], fresh) == []  # its one free slot went to `first`
    a.routing_stats = stats(2, 1, 3, placed=["someone-else"])  # not yet placed: still counted
    assert choose(r, [a], fresh) == []
    # Placed, and ended since: the slot is free again, at once.
    a.routing_stats = stats(3, 1, 3, placed=[first.metadata.internal_request_id, "someone-else"])
    assert choose(r, [a], fresh) == ["aaa"]


def test_a_request_asked_about_again_does_not_count_against_itself():
    """Ray may ask again for a request it was already given a replica for (its send did not go
    through): the request's own count must not make the last free slot look taken."""
    a = Replica("aaa", stats(1, 1, 3))
    r = router()
    last = request("POST", "/v1/chat")
    assert choose(r, [a], last) == ["aaa"]
    assert choose(r, [a], last) == ["aaa"] and not last.routing_context.should_backoff
    assert choose(r, [a], request("POST", "/v1/chat")) == []  # another caller does see it taken


def test_a_replica_names_the_requests_it_placed_for_a_few_report_periods():
    now = [0.0]
    placed = Placements(stats_period=1.0, clock=lambda: now[0])
    placed.note()  # outside a request: Serve's context names none
    assert placed.names() == []
    serve_context._set_request_context(_internal_request_id="req-1")
    try:
        placed.note()
    finally:
        serve_context._unset_request_context()
    now[0] = 3.9
    assert placed.names() == ["req-1"]
    now[0] = 4.1  # four periods on: every router has seen a report with it
    assert placed.names() == []


def test_draining_or_stalled_replicas_come_last():
    a = Replica("aaa", stats(1, 4, 0, draining=True))
    b = Replica("bbb", stats(1, 4, 0, stalled=True))
    c = Replica("ccc", stats(1, 1, 3))
    assert choose(router(), [a, b, c], request("POST", "/v1/sessions"))[0] == "ccc"


def test_with_no_free_slot_a_new_session_is_held_then_sent_to_the_least_loaded():
    a, b = Replica("aaa", stats(1, 0, 4)), Replica("bbb", stats(1, 0, 4, waiting=2))
    r = router(admission_wait=2.0)
    fresh = request("POST", "/v1/sessions")
    assert choose(r, [a, b], fresh) == [] and fresh.routing_context.should_backoff  # Ray retries after a backoff
    assert choose(r, [a, b], request("POST", "/v1/sessions", age=2.5)) == ["aaa", "bbb"]
    assert choose(r, [a, b], request("GET", "/healthz")) == ["aaa", "bbb"]  # not held: it opens nothing
    b.routing_stats = stats(2, 1, 3)
    assert choose(r, [a, b], fresh) == ["bbb", "aaa"]


def test_labels_are_added_to_every_sample():
    assert with_label("x 1", "replica", "a") == 'x{replica="a"} 1'
    assert with_label('x{le="0.5"} 2', "replica", "a") == 'x{le="0.5",replica="a"} 2'


def test_the_board_merges_families_once_with_every_replica_in_each():
    text = ("# TYPE lockstep:ticks_total counter\nlockstep:ticks_total {n}\n"
            "# HELP lockstep:step h\n# TYPE lockstep:step histogram\n"
            'lockstep:step_bucket{{le="0.1"}} {n}\nlockstep:step_count {n}\n')
    lines = merge({"b": text.format(n=2), "a": text.format(n=1)})
    assert lines == ["# TYPE lockstep:ticks_total counter", 'lockstep:ticks_total{replica="a"} 1',
                     'lockstep:ticks_total{replica="b"} 2', "# HELP lockstep:step h", "# TYPE lockstep:step histogram",
                     'lockstep:step_bucket{le="0.1",replica="a"} 1', 'lockstep:step_count{replica="a"} 1',
                     'lockstep:step_bucket{le="0.1",replica="b"} 2', 'lockstep:step_count{replica="b"} 2']


def test_the_board_says_what_can_take_calls_and_forgets_the_silent(monkeypatch):
    board = Board()
    board.report("a", stats(1, 2, 2), "lockstep:x 1\n")
    board.report("b", stats(1, 4, 0, draining=True), "lockstep:x 2\n")
    health = board.health()
    assert (health["serving"], health["ready"], health["free"]) == (2, 1, 2)
    assert "lockstep:cluster_replicas 2" in board.metrics() and 'lockstep:x{replica="b"} 2' in board.metrics()
    import api.cluster_board as cb
    now = time.monotonic()
    monkeypatch.setattr(cb.time, "monotonic", lambda: now + cb.STALE_SECONDS + 1)
    assert board.health()["serving"] == 0 and "lockstep:cluster_replicas 0" in board.metrics()


def test_slot_usage_policy_sizes_to_the_target_within_bounds():
    assert desired_replicas(0, 8, 0.75, 1, 4) == 1
    assert desired_replicas(6, 8, 0.75, 1, 4) == 1 and desired_replicas(7, 8, 0.75, 1, 4) == 2
    assert desired_replicas(100, 8, 0.75, 1, 4) == 4 and desired_replicas(0, 8, 0.75, 0, 4) == 0

    class Ctx:
        aggregated_metrics = {"sessions": {"r1": 6.0, "r2": 6.0}, "slots": {"r1": 8.0, "r2": 8.0}}
        capacity_adjusted_min_replicas, capacity_adjusted_max_replicas, target_num_replicas = 1, 5, 2

    assert SlotUsagePolicy(0.5)(Ctx()) == (3, {})
    Ctx.aggregated_metrics = {}
    assert SlotUsagePolicy(0.5)(Ctx()) == (2, {})
    with pytest.raises(ValueError):
        SlotUsagePolicy(0.0)


async def _through(app, scope) -> list[dict]:
    sent = []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await ReplicaLossMiddleware(app)(scope, receive, send)
    return sent


def test_the_proxy_middleware_ends_a_cut_stream_and_leaves_whole_ones_alone():
    async def cut_ndjson(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x-ndjson")]})
        await send({"type": "http.response.body", "body": b'{"type": "audio"}\n', "more_body": True})

    async def whole(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x-ndjson")]})
        await send({"type": "http.response.body", "body": b'{"type": "end", "reason": "input_end"}\n'})

    async def cut_websocket(scope, receive, send):
        await send({"type": "websocket.accept"})

    sent = asyncio.run(_through(cut_ndjson, {"type": "http"}))
    assert sent[-1] == {"type": "http.response.body", "body": END_LINE, "more_body": False}
    assert json.loads(END_LINE) == {"type": "end", "reason": "replica_lost"}
    assert len(asyncio.run(_through(whole, {"type": "http"}))) == 2
    sent = asyncio.run(_through(cut_websocket, {"type": "websocket"}))
    assert sent[-1] == {"type": "websocket.close", "code": 1011, "reason": "replica_lost"}


def test_cluster_settings_are_checked():
    with pytest.raises(ConfigError, match="together"):
        ClusterConfig(min_replicas=1).validate()
    with pytest.raises(ConfigError, match="lie between"):
        ClusterConfig(replicas=3, min_replicas=1, max_replicas=2).validate()
    ClusterConfig(replicas=2, min_replicas=1, max_replicas=2).validate()
    with pytest.raises(ConfigError):
        ClusterConfig(min_replicas=3, max_replicas=2).validate()
    with pytest.raises(ConfigError):
        ClusterConfig(target_slot_usage=1.5).validate()
    with pytest.raises(ConfigError, match="session-prefix"):
        ServeConfig(session_prefix="a/b").validate()


def test_the_builder_takes_lockstep_settings_by_name():
    from api.cluster import app_builder, replica_options
    with pytest.raises(ConfigError, match="unknown lockstep settings"):
        app_builder({"model_dir": "x", "max_sesions": 4})
    with pytest.raises(ConfigError, match="metrics-port"):
        app_builder({"metrics_port": 9100})
    options = replica_options({"device": "cuda"}, ServeConfig(), ClusterConfig(), gpus=8)
    assert options["ray_actor_options"]["num_gpus"] == 1 and options["num_replicas"] == 8
    options = replica_options({"device": "cpu"}, ServeConfig(), ClusterConfig(min_replicas=0, max_replicas=3), gpus=8)
    assert options["ray_actor_options"]["num_gpus"] == 0 and "num_replicas" not in options
    assert options["autoscaling_config"]["policy"]["policy_function"] == "api.cluster_scaling:SlotUsagePolicy"
    # A replica's engine threads come from its own CPUs (less its API's), not the machine's.
    serve_args = lambda args: app_builder({"model_dir": "x", **args})._bound_deployment.init_args[1]  # noqa: E731
    assert serve_args({"replica_cpus": 8})["engine_threads"] == 7
    assert serve_args({"replica_cpus": 1})["engine_threads"] == 1
    assert serve_args({"replica_cpus": 8, "engine_threads": 2})["engine_threads"] == 2


def test_the_example_serve_config_is_valid_and_builds():
    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from api.cluster import app_builder
    from tests.servers import ROOT
    with open(f"{ROOT}/deploy/ray-serve.yaml") as f:
        config = yaml.safe_load(f)
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    assert app["import_path"] == "api.cluster:app_builder"
    assert isinstance(app_builder(app["args"]), Application)


def test_the_node_environment_file_is_what_lockstep_serve_ray_sets():
    """`ray start` nodes get lockstep's node environment from deploy/ray-node.env: the same as
    `lockstep serve --ray` gives a Ray it starts itself, and each setting one Serve knows."""
    from ray.serve._private import constants

    from api.cluster_launch import NODE_ENV
    from tests.servers import ROOT
    lines = [line for line in open(f"{ROOT}/deploy/ray-node.env").read().splitlines()
             if line.strip() and not line.startswith("#")]
    assert dict(line.split("=", 1) for line in lines) == NODE_ENV
    for key in NODE_ENV:
        assert hasattr(constants, key), key  # a setting this Ray still reads


def test_serve_takes_the_cluster_flags():
    from engine.cli import _from_args, build_parser
    args = build_parser().parse_args(["serve", "--ray", "--address", "auto", "--min-replicas", "1",
                                      "--max-replicas", "4", "--target-slot-usage", "0.5"])
    cluster = _from_args(ClusterConfig, args)
    assert (cluster.ray, cluster.address, cluster.min_replicas, cluster.max_replicas) == (True, "auto", 1, 4)
    assert cluster.target_slot_usage == 0.5 and not _from_args(ClusterConfig, build_parser().parse_args(["serve"])).ray


def test_serve_refuses_bad_cluster_flags_before_starting_anything(capsys):
    from engine.cli import main
    with pytest.raises(SystemExit) as e:
        main(["serve", "--ray", "--min-replicas", "2"])
    assert e.value.code == 2 and "together" in capsys.readouterr().err
