"""Starting lockstep on Ray: the environment each Ray node wants (NODE_ENV), deploying the
application (api/cluster.py's `build`), and `lockstep serve --ray` (`serve_on_ray`), which joins or
starts a Ray cluster, deploys, and serves until SIGTERM or Ctrl-C."""
from __future__ import annotations

import os
import signal
import threading

from ray import serve

from api.cluster import APP_NAME, build
from engine.config import ClusterConfig, ServeConfig

# The environment every Ray node that runs lockstep is started with (deploy/ray-node.env holds the
# same, for `ray start`): lockstep's proxy middleware, and the Serve settings that take a frame
# through the proxy and the replica with the fewest hops: the replica's ASGI app on its main event
# loop, the proxy's router on the proxy's loop, the proxy's calls to replicas over Serve's gRPC data
# plane instead of Ray object references. Measured in bench/RESULTS.md: at 16 callers on one
# replica they cut what Ray adds to first audio by about two thirds.
NODE_ENV = {
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "api.cluster_proxy:proxy_middlewares",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_PROXY_USE_GRPC": "1",
}


def deploy(engine_args: dict, serve_cfg: ServeConfig, cluster: ClusterConfig) -> None:
    """Starts Serve (its proxies on --host/--port) if it is not running, and deploys lockstep;
    returns once every replica is up. The proxies run api/cluster_proxy.py's middleware (and Serve
    the latency settings) when their node was started with NODE_ENV in its environment."""
    serve.start(http_options={"host": serve_cfg.host, "port": serve_cfg.port})
    serve.run(build(engine_args, serve_cfg, cluster), name=APP_NAME, route_prefix="/", blocking=False)


def serve_on_ray(engine_args: dict, serve_cfg: ServeConfig, cluster: ClusterConfig) -> None:
    """`lockstep serve --ray`: joins (or starts) a Ray cluster, deploys, serves until SIGTERM or
    Ctrl-C, then removes the application (each replica drains its calls, up to --shutdown-timeout);
    a second signal stops at once."""
    import ray
    cluster = cluster.validate()
    signals: list[int] = []
    stop = threading.Event()

    def on_signal(sig, frame) -> None:
        signals.append(sig)
        stop.set()
        if len(signals) > 1:
            raise SystemExit(1)

    for key, value in NODE_ENV.items():  # a Ray started here passes them to its proxies; the user's own win
        os.environ.setdefault(key, value)
    ray.init(address=cluster.address, runtime_env={"env_vars": {key: os.environ[key] for key in NODE_ENV}})
    try:
        deploy(engine_args, serve_cfg, cluster)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        replicas = serve.status().applications[APP_NAME].deployments["LockstepReplica"].replica_states
        print(f"lockstep: serving http://{serve_cfg.host}:{serve_cfg.port} through Ray Serve "
              f"({replicas}; ws /api/chat, /v1/chat, v1 sessions, /metrics for every replica)", flush=True)
        while not stop.wait(0.5):
            pass
        print("lockstep: draining (each replica keeps its calls up to --shutdown-timeout)", flush=True)
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()
