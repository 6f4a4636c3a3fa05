"""Autoscaling lockstep's replicas on slot usage (a Ray Serve custom autoscaling policy).

Each replica reports its sessions (running, plus callers waiting for a slot) and the sessions it
admits (`record_autoscaling_stats`); Serve averages them over its look-back window. The policy asks
for as many replicas as keep `target_slot_usage` of the slots busy, within the deployment's
bounds; Serve's upscale and downscale delays then apply. A replica chosen for removal drains:
Serve routes it nothing new and waits for its calls, up to --shutdown-timeout.
"""
from __future__ import annotations

import math


def desired_replicas(sessions: float, slots_per_replica: float, target: float, low: int, high: int) -> int:
    want = math.ceil(sessions / max(1e-9, slots_per_replica * target)) if sessions > 0 else 0
    return max(low, min(high, want))


class SlotUsagePolicy:
    def __init__(self, target_slot_usage: float = 0.75):
        if not 0 < target_slot_usage <= 1:
            raise ValueError(f"target_slot_usage must be in (0, 1], got {target_slot_usage}")
        self.target = target_slot_usage

    def __call__(self, ctx) -> tuple[int, dict]:
        metrics = ctx.aggregated_metrics or {}
        sessions, slots = metrics.get("sessions", {}), metrics.get("slots", {})
        if not slots:  # no report yet (starting, or scaled to zero): keep the current target
            low, high = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
            return max(low, min(high, ctx.target_num_replicas)), {}
        per_replica = max(slots.values())
        return desired_replicas(sum(sessions.values()), per_replica, self.target,
                                ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas), {}
