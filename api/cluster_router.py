"""Where Ray Serve's proxy sends each request of lockstep on a cluster (api/cluster.py).

A custom Ray Serve request router (Ray's RequestRouter, an alpha API), run by every proxy:
- a request about a REST session (`/v1/sessions/SID...`) goes to the replica named in its id
  (each replica starts its session ids with its own replica id), whatever the replica count; when
  that replica is gone, to any replica, which answers 410;
- a request that opens a session (POST /v1/sessions, POST /v1/chat, ws /api/chat) goes to the
  replica with the most free admissions, by the load each replica reports (slots used, callers
  waiting: `record_routing_stats`) plus what this router sent it that the report does not hold yet
  (each report names the requests its replica has placed lately). While no replica
  has a free slot the request is held here, up to --admission-wait; then it goes to the least
  loaded replica, which answers 503 + Retry-After unless a slot frees there within its own short
  wait (two report periods: what covers a report gone stale);
- anything else (health, metrics, listing) goes to the least loaded replica.
"""
from __future__ import annotations

import pickle
import random
import time
from typing import Any

from ray.serve import context as serve_context
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

SID_SEP = "."  # a session id is "<replica id>.<random part>"


def session_in_path(path: str) -> str | None:
    """The session id a `/v1/sessions/SID[/...]` path names, else None."""
    parts = path.split("/", 4)
    if len(parts) >= 4 and parts[1] == "v1" and parts[2] == "sessions" and parts[3]:
        return parts[3]
    return None


def owner_of(sid: str) -> str | None:
    """The replica id a session id starts with (None for an id no replica made)."""
    owner, sep, rest = sid.partition(SID_SEP)
    return owner if sep and owner and rest else None


def opens_session(scope: dict) -> bool:
    path = route_path(scope)
    if scope.get("type") == "websocket":
        return path == "/api/chat"
    return scope.get("method") == "POST" and path in ("/v1/sessions", "/v1/chat")


def route_path(scope: dict) -> str:
    """The path below the application's route prefix."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def request_scope(pending: PendingRequest | None) -> dict | None:
    """The ASGI scope of an HTTP request from the proxy (its argument is the pickled request)."""
    if pending is None or not pending.args:
        return None
    arg = pending.args[0]
    if isinstance(arg, bytes):
        try:
            arg = pickle.loads(arg)
        except Exception:  # not a proxied HTTP request: route it by load
            return None
    scope = getattr(arg, "asgi_scope", None)
    return scope if isinstance(scope, dict) else None


REPORT_SLACK = 0.1  # what delivering a replica's report may add to its age, in seconds


class Placements:
    """A replica's side of the count: the proxy requests whose "open" it has answered lately
    (admitted, queued or refused), named in its load reports so that each router stops counting
    what it sent there as soon as a report holds it. A name stays a few report periods, so that
    every router sees at least one report with it."""

    def __init__(self, stats_period: float, clock=time.monotonic):
        self.seconds, self.clock = max(2.0, 4 * stats_period), clock
        self.when: dict[str, float] = {}

    def note(self) -> None:
        """Called in the request's own context. Serve's id of it (the one the router keys by) is a
        private field of Serve's request context, read defensively: without it the router falls
        back to counting a new session until a report a window younger than it."""
        request_id = getattr(serve_context._get_serve_request_context(), "_internal_request_id", "")
        if request_id:
            self.when[request_id] = self.clock()

    def names(self) -> list[str]:
        now = self.clock()
        self.when = {k: t for k, t in self.when.items() if now - t < self.seconds}
        return list(self.when)


def usage(stats: dict[str, Any], sent: int) -> tuple[int, float]:
    """(free admissions, fraction busy) of a replica from its report and what was sent since."""
    slots = max(1, int(stats.get("slots", 1)))
    busy = int(stats.get("sessions", 0)) + int(stats.get("waiting", 0)) + sent
    return int(stats.get("free", 1)) - sent, busy / slots


class LockstepRouter(RequestRouter):
    def initialize_state(self, admission_wait: float = 2.0, stats_period: float = 0.25, **kwargs) -> None:
        self.admission_wait = float(admission_wait)
        # A report describes its replica up to a period (plus delivery) before this router first sees
        # it: a session sent within that window may be missing from it, so it is still counted.
        self.window = float(stats_period) + REPORT_SLACK
        self.sent: dict[ReplicaID, dict[Any, float]] = {}  # replica -> {request: when this router sent it}
        self.seen: dict[ReplicaID, tuple[int, float]] = {}  # replica -> (its latest report's seq, first seen)
        self.clock = time.monotonic

    def _sent_since_report(self, replica: RunningReplica, asking: Any = None) -> int:
        """What this router sent `replica` that its latest report does not count yet, less the
        request `asking` (Ray may ask again for a request already chosen once). A request the report
        names as placed is in its counts (or has come and gone); one it does not name is dropped
        only once a report a window younger than it is seen: it never reached the replica, or it
        failed before asking for a slot."""
        stats = replica.routing_stats or {}
        rid, seq = replica.replica_id, stats.get("seq", 0)
        if self.seen.get(rid, (None,))[0] != seq:
            self.seen[rid] = (seq, self.clock())
        since, placed = self.seen[rid][1] - self.window, set(stats.get("placed", ()))
        self.sent[rid] = {k: t for k, t in self.sent.get(rid, {}).items() if t > since and k not in placed}
        return len(self.sent[rid]) - (asking in self.sent[rid])

    def _count(self, pending: PendingRequest, replica_id: ReplicaID) -> None:
        """A new session goes to this replica: counted at once, so a request routed beside it
        (before Ray confirms the first) sees it, and moved if Ray sends it elsewhere after all."""
        key = pending.metadata.internal_request_id  # the proxy's own id: unique, unlike the client's
        for sent in self.sent.values():
            sent.pop(key, None)
        self.sent.setdefault(replica_id, {})[key] = self.clock()

    def _standing(self, replica: RunningReplica, asking: Any) -> tuple[bool, bool, float, float]:
        """Its sort key: serving replicas first (not draining, not stalled), then those with a free
        admission, then the least busy; ties in random order, so equal replicas share the load."""
        stats = replica.routing_stats or {}
        free, busy = usage(stats, self._sent_since_report(replica, asking))
        return (bool(stats.get("draining") or stats.get("stalled")), free <= 0, busy, random.random())

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        scope = request_scope(pending_request)
        asking = pending_request.metadata.internal_request_id if pending_request is not None else None
        standing = {r.replica_id: self._standing(r, asking) for r in candidate_replicas}
        if scope is not None:
            sid = session_in_path(route_path(scope))
            owner = owner_of(sid) if sid else None
            if owner is not None:
                mine = [r for r in candidate_replicas if r.replica_id.unique_id == owner]
                if mine:
                    return [mine]
            elif opens_session(scope) and all(down or full for down, full, *_ in standing.values()):
                if time.time() - pending_request.created_at < self.admission_wait:
                    # Held: Ray calls again after a backoff (its max_backoff_s), with fresher reports.
                    pending_request.routing_context.should_backoff = True
                    return []
        # One replica per rank: Ray's own queue-length choice within a rank never overrides ours.
        ranked = sorted(candidate_replicas, key=lambda r: standing[r.replica_id])
        if ranked and scope is not None and opens_session(scope):
            self._count(pending_request, ranked[0].replica_id)
        return [[r] for r in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        scope = request_scope(pending_request)
        if scope is not None and opens_session(scope):
            self._count(pending_request, replica_id)
