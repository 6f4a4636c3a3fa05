"""Engine metrics, rendered in Prometheus' text format (names in the style of vLLM's)."""
from __future__ import annotations

import bisect
import threading


class Histogram:
    def __init__(self, name: str, help_: str, buckets: list[float]):
        self.name, self.help, self.buckets = name, help_, sorted(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def quantile(self, q: float) -> float:
        """Upper bucket bound holding the q-quantile (inf past the last bucket)."""
        target, seen = q * self.n, 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= target and self.n:
                return self.buckets[i] if i < len(self.buckets) else float("inf")
        return 0.0

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for bound, c in zip(self.buckets, self.counts):
            acc += c
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {acc}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.n}')
        lines += [f"{self.name}_sum {self.total}", f"{self.name}_count {self.n}"]
        return lines


_MS = [0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.15, 0.2, 0.5, 1.0]


class EngineMetrics:
    PREFIX = "lockstep:"

    def __init__(self, max_sessions: int):
        self.lock = threading.Lock()
        self.max_sessions = max_sessions
        self.counters = {"sessions_created_total": 0, "sessions_rejected_total": 0,
                         "sessions_finished_total": 0, "ticks_total": 0, "late_ticks_total": 0,
                         "tick_failures_total": 0, "input_underruns_total": 0,
                         "input_dropped_samples_total": 0, "input_lag_dropped_samples_total": 0}
        self.gauges = {"num_sessions_running": 0, "num_sessions_waiting": 0, "slots_used": 0}
        p = self.PREFIX
        self.step_duration = Histogram(p + "step_duration_seconds", "Duration of one batched step.", _MS)
        self.batch_size = Histogram(p + "step_batch_size", "Slots stepped per tick.",
                                    [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128])
        self.probe: dict[int, float] = {}  # batch size -> full-context tick seconds at start-up
        self.first_audio = Histogram(p + "time_to_first_audio_seconds",
                                     "From session creation to its first output frame.", _MS + [2.0, 5.0])

    def set_probe(self, ticks: dict[int, float], realtime_sessions: int) -> None:
        """The start-up capacity probe's results (`engine.capacity.probe_ticks`)."""
        with self.lock:
            self.probe = dict(ticks)
            self.gauges["realtime_capacity_sessions"] = realtime_sessions

    def inc(self, name: str, by: int = 1) -> None:
        with self.lock:
            self.counters[name] += by

    def render(self) -> str:
        p = self.PREFIX
        with self.lock:
            lines = []
            for name, value in self.counters.items():
                lines += [f"# TYPE {p}{name} counter", f"{p}{name} {value}"]
            gauges = {**self.gauges, "slots_total": self.max_sessions,
                      "slot_usage_perc": self.gauges["slots_used"] / self.max_sessions}
            for name, value in gauges.items():
                lines += [f"# TYPE {p}{name} gauge", f"{p}{name} {value}"]
            if self.probe:
                lines.append(f"# HELP {p}probe_tick_seconds Full-context tick measured at start-up, by batch size.")
                lines.append(f"# TYPE {p}probe_tick_seconds gauge")
                lines += [f'{p}probe_tick_seconds{{sessions="{B}"}} {t}' for B, t in sorted(self.probe.items())]
            for h in (self.step_duration, self.batch_size, self.first_audio):
                lines += h.render()
        return "\n".join(lines) + "\n"
