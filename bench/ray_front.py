"""A lockstep Ray Serve front for benchmarks: a one-node Ray cluster started here (its agents on
ports given up front, so a loaded machine does not time its start out), lockstep deployed on it as
`lockstep serve --ray` deploys it, served until SIGTERM / Ctrl-C, then everything stopped.

    python -m bench.ray_front --port 8999 --replicas 1 -- --model-dir CKPT --max-sessions 16 &
    python -m bench.serve --url http://127.0.0.1:8999 --callers 4 8 16
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ray_front", description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=8999)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs the Ray node offers")
    ap.add_argument("serve_args", nargs="*", help="`lockstep serve` flags (after --)")
    args = ap.parse_args(argv)

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from api.cluster import PROXY_MIDDLEWARE, deploy
    from engine.cli import build_parser, serve_config
    from engine.config import ClusterConfig, EngineConfig
    flags = build_parser().parse_args(["serve", "--port", str(args.port), *args.serve_args])
    engine_args = {f.name: getattr(flags, f.name) for f in dataclasses.fields(EngineConfig)}
    os.environ.update(PROXY_MIDDLEWARE)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=args.cpus, include_dashboard=False, metrics_agent_port=free_port(),
                         metrics_export_port=free_port(), dashboard_agent_listen_port=free_port(),
                         runtime_env_agent_port=free_port())
        ray.init(address=cluster.address, log_to_driver=False)
        deploy(engine_args, serve_config(flags),
               ClusterConfig(replicas=args.replicas, replica_cpus=max(1, args.cpus // args.replicas)))
        print(f"ray front: http://127.0.0.1:{args.port}", flush=True)
        while not stop.wait(0.5):
            pass
        serve.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
