"""One view of lockstep's replicas on a cluster: every replica's metrics, each series labelled with
its replica, and whether the application can take calls.

The board is a Ray Serve deployment of one replica (no CPU reserved) beside the engines
(api/cluster.py). Each engine replica reports to it once a second; whichever replica the proxy
sends `/metrics`, `/healthz` or `/readyz` to answers from the board, so one scrape target (the
front) shows the whole application. A replica that has not reported for `STALE_SECONDS` is
counted gone.
"""
from __future__ import annotations

import time

STALE_SECONDS = 5.0
PREFIX = "lockstep:"


def with_label(sample: str, name: str, value: str) -> str:
    """A Prometheus sample line with one more label."""
    metric, _, rest = sample.partition(" ")
    label = f'{name}="{value}"'
    if metric.endswith("}"):
        metric = metric[:-1] + ("," if not metric.endswith("{}") else "") + label + "}"
    else:
        metric = metric + "{" + label + "}"
    return f"{metric} {rest}"


def merge(texts: dict[str, str], label: str = "replica") -> list[str]:
    """The Prometheus texts of several replicas as one: each family's HELP/TYPE once, then every
    replica's samples of it with `label` set to the replica."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    for replica, text in sorted(texts.items()):
        current = None
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    current = parts[2]
                    header, _ = families.setdefault(current, ([], []))
                    if line not in header:
                        header.append(line)
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            family = current if current is not None and name.startswith(current) else name
            families.setdefault(family, ([], []))[1].append(with_label(line, label, replica))
    lines = []
    for header, samples in families.values():
        lines += header + samples
    return lines


class Board:
    def __init__(self) -> None:
        self.replicas: dict[str, tuple[float, dict, str]] = {}  # id -> (reported at, state, metrics text)

    def report(self, replica: str, state: dict, metrics: str) -> None:
        self.replicas[replica] = (time.monotonic(), state, metrics)

    def forget(self, replica: str) -> None:
        self.replicas.pop(replica, None)

    def live(self) -> dict[str, tuple[float, dict, str]]:
        now = time.monotonic()
        for replica in [r for r, (at, _, _) in self.replicas.items() if now - at > STALE_SECONDS]:
            del self.replicas[replica]
        return self.replicas

    def health(self) -> dict:
        """Per replica: serving (not stalled), ready (serving, not draining), free admissions."""
        replicas = {r: {"serving": not s.get("stalled"), "ready": not s.get("stalled") and not s.get("draining"),
                        "free": s.get("free", 0), "sessions": s.get("sessions", 0), "slots": s.get("slots", 0)}
                    for r, (_, s, _) in sorted(self.live().items())}
        return {"replicas": replicas, "serving": sum(v["serving"] for v in replicas.values()),
                "ready": sum(v["ready"] for v in replicas.values()),
                "free": sum(v["free"] for v in replicas.values() if v["ready"])}

    def metrics(self) -> str:
        live = self.live()
        health = self.health()
        lines = merge({r: text for r, (_, _, text) in live.items()})
        lines += [f"# TYPE {PREFIX}cluster_replicas gauge", f"{PREFIX}cluster_replicas {len(live)}",
                  f"# TYPE {PREFIX}cluster_replicas_ready gauge", f"{PREFIX}cluster_replicas_ready {health['ready']}",
                  f"# TYPE {PREFIX}cluster_free_admissions gauge", f"{PREFIX}cluster_free_admissions {health['free']}"]
        return "\n".join(lines) + "\n"
