"""The engine loop: admits sessions, ticks the scheduler and runner every 80 ms, delivers frames.

`tick()` is one frame for every active session; `run_realtime` calls it on a deadline-driven
cadence (engine/cadence.py), `run_offline` as fast as possible for `lockstep generate` and the
benchmarks.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Callable

import numpy as np
import torch

from engine.cadence import Cadence, stall_reason
from engine.config import SAMPLE_RATE, SamplingConfig
from engine.metrics import EngineMetrics
from engine.runner import ModelRunner
from engine.scheduler import Plan, Scheduler
from engine.session import FrameOutput, Session

log = logging.getLogger("lockstep")


def describe_sampling(cfg: SamplingConfig) -> str:
    seed = "random seed" if cfg.seed is None else f"seed {cfg.seed}"
    if cfg.greedy:
        return f"greedy, {seed}"
    return (f"audio temperature {cfg.temperature} top-k {cfg.top_k}, text temperature {cfg.text_temperature} "
            f"top-k {cfg.text_top_k}, {seed}")


class EngineLoop:
    def __init__(self, runner: ModelRunner, max_buffer_frames: int = 250, idle_timeout: float | None = None,
                 max_waiting: int | None = 0, max_input_lag: float | None = None, session_prefix: str = ""):
        """`max_waiting`: sessions admitted beyond the slots, queued until one frees (None: no
        limit, for offline runs; 0 when serving, so an admitted caller always gets a slot).
        `max_input_lag`: the input lag, in seconds, real-time sessions are held under.
        `session_prefix`: starts every session id (a cluster replica's id, so a router can tell
        where a session lives from its id alone)."""
        self.runner = runner
        self.session_prefix = session_prefix
        self.max_sessions = runner.max_sessions
        self.max_admitted = None if max_waiting is None else runner.max_sessions + max_waiting
        self.sched = Scheduler(runner.max_sessions)
        self.sessions: dict[str, Session] = {}
        self.metrics = EngineMetrics(runner.max_sessions)
        runner.kv.reset()  # a new loop's scheduler starts with every slot free: so does the pool
        self.metrics.gauges.update(runner.kv.gauges())
        self.max_buffer_frames = max_buffer_frames
        self.idle_timeout = idle_timeout
        self.max_lag = None if max_input_lag is None else int(max_input_lag * SAMPLE_RATE)
        self.draining = False
        self.last_step: tuple[float, int] = (0.0, 0)  # seconds and sessions of the latest step
        self.heartbeat: float | None = None  # when the real-time loop last passed its top
        self.failed_ticks = 0  # consecutive ticks that raised, and the latest one's error
        self.last_error: str | None = None
        self._cond = threading.Condition()
        # Called (on whichever thread frees it) when an admission frees or draining starts, for
        # callers that wait for one without a thread of their own (the API's event loop).
        self.on_admission_change: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- API side -------------------------------------------------------------------------------
    def create_session(self, sampling: SamplingConfig, sink: Callable[[FrameOutput | str], None],
                       end_on_input_end: bool = False, wait: float = 0.0,
                       count_rejection: bool = True, realtime: bool = False) -> Session | None:
        """Admits a session if a slot is (or within `wait` seconds becomes) free, and the KV pool can
        promise it its minimum; None otherwise (counted as a rejection unless `count_rejection` is
        False: the caller will try again). A `realtime` session's input lag is held under the loop's
        `max_input_lag`."""
        sampling.validate()
        deadline = time.monotonic() + wait
        with self._cond:
            while not self.draining and self._full():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self.draining or self._full():
                if count_rejection:
                    self.metrics.inc("sessions_rejected_total")
                return None
            session = Session(sampling, self.runner.frame_size, self.max_buffer_frames, end_on_input_end, sink,
                              max_lag=self.max_lag if realtime else None,
                              sid=self.session_prefix + secrets.token_urlsafe(18) if self.session_prefix else None)
            if self.max_admitted is not None and not self.runner.kv.admit(session.id):
                if count_rejection:  # the engine thread took the pages meanwhile
                    self.metrics.inc("sessions_rejected_total")
                return None
            self.sessions[session.id] = session
            self.sched.submit(session.id)
            self.metrics.inc("sessions_created_total")
            return session

    def limit_admission(self, sessions: int) -> None:
        """Admits at most `sessions` at once (plus the waiting room), fewer than the slots."""
        if self.max_admitted is None:
            raise ValueError("an offline loop (max_waiting=None) admits every session")
        if not 1 <= sessions <= self.max_sessions:
            raise ValueError(f"an admission limit must be in 1..{self.max_sessions}, got {sessions}")
        self.max_admitted = sessions + self.max_admitted - self.max_sessions
        with self.metrics.lock:
            self.metrics.gauges["admission_limit_sessions"] = sessions

    def _full(self) -> bool:
        return self.max_admitted is not None and (len(self.sessions) >= self.max_admitted
                                                  or not self.runner.kv.can_admit())

    def admissions_free(self) -> int:
        """How many more sessions would be admitted now."""
        if self.draining:
            return 0
        slots = self.max_sessions if self.max_admitted is None else max(0, self.max_admitted - len(self.sessions))
        return min(slots, self.runner.kv.admittable())

    def end_session(self, sid: str, reason: str) -> None:
        """Ends a session; it leaves the batch at the next tick. Unknown or ended ids are ignored."""
        with self._cond:
            session = self.sessions.get(sid)
            if session is not None and session.end_reason is None:
                self._end_locked(session, reason)

    def status(self, sid: str) -> dict | None:
        """Where a live session stands, or None once it has ended: `waiting` (for its first full
        input frame or a free slot), `running` in a slot, or `ending` (it leaves at the next tick)."""
        with self._cond:
            session = self.sessions.get(sid)
            if session is None:
                return None
            slot = self.sched.slot_of.get(sid)
        return {**self._status(session, slot), "kv_window_seconds": self._window(slot)}

    def statuses(self) -> list[dict]:
        """`status` of every live session, with its id, oldest first."""
        with self._cond:
            live = [(s, self.sched.slot_of.get(s.id)) for s in self.sessions.values()]
        return [{"id": s.id, **self._status(s, slot), "kv_window_seconds": self._window(slot)} for s, slot in live]

    def _window(self, slot: int | None) -> float | None:
        """The attention window a running session has now, in seconds (its context while whole)."""
        return None if slot is None else self.runner.kv.window_seconds(slot)

    @staticmethod
    def _status(session: Session, slot: int | None) -> dict:
        state = "ending" if session.end_reason else "waiting" if slot is None else "running"
        return {"state": state, "slot": slot, "frames_out": session.frames_out, "underruns": session.underruns,
                "buffered_seconds": session.buffered_samples() / SAMPLE_RATE,
                "dropped_samples": session.dropped_samples, "lag_dropped_samples": session.lag_dropped_samples,
                "realtime": session.realtime, "input_ended": session.input_ended,
                "age_seconds": time.monotonic() - session.created}

    def _end_locked(self, session: Session, reason: str) -> None:
        session.end_reason = reason
        self.sched.finish(session.id)
        if session.id not in self.sched.slot_of:  # never joined: nothing to step, end it now
            self._retire(session)

    def _admission_changed(self) -> None:
        self._cond.notify_all()
        for notify in self.on_admission_change:
            notify()

    def _retire(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self.runner.kv.release(session.id)  # its pages, or the promise it was admitted with
        self.metrics.inc("sessions_finished_total")
        self.metrics.inc("input_underruns_total", session.underruns)
        self.metrics.inc("input_dropped_samples_total", session.dropped_samples)
        self.metrics.inc("input_lag_dropped_samples_total", session.lag_dropped_samples)
        self._admission_changed()
        first = "" if session.first_audio_at is None else \
            f", first audio after {(session.first_audio_at - session.created) * 1e3:.0f} ms"
        log.info("session %s ended (%s): %d frame(s) out in %.1f s, %d underrun(s)%s", session.id,
                 session.end_reason or "ended", session.frames_out, time.monotonic() - session.created,
                 session.underruns, first)
        self._deliver(session, session.end_reason or "ended")

    def _deliver(self, session: Session, event: FrameOutput | str) -> bool:
        """Hands `event` to the session's sink; a sink that raises ends its own session only (the
        caller's side is broken, not the engine), never the tick its neighbours share."""
        try:
            session.sink(event)
            return True
        except Exception:
            log.exception("session %s: delivering its output failed; ending it", session.id)
            if isinstance(event, FrameOutput):
                self.end_session(session.id, "sink_error")
            return False

    # ---- engine side ----------------------------------------------------------------------------
    def tick(self) -> Plan:
        with self._cond:
            self._expire()
            # Offline loops promise a session its KV minimum as it joins; serving ones did at admission.
            plan = self.sched.tick(has_input=lambda sid: self.sessions[sid].has_frame() and self.runner.kv.admit(sid))
            for sid, _ in plan.leaves:
                self._retire(self.sessions[sid])
            stepping = [(self.sessions[sid], slot) for sid, slot in plan.step]
            m = self.metrics
            m.gauges.update(num_sessions_running=len(stepping), slots_used=len(stepping),
                            num_sessions_waiting=len(self.sched.waiting), **self.runner.kv.gauges())
        failed = set()
        for sid, slot in plan.joins:
            try:
                self.runner.join(slot, self.sessions[sid].sampling, owner=sid)
            except Exception:  # this session's settings, not the engine: it alone ends
                log.exception("session %s: joining slot %d failed; ending it", sid, slot)
                failed.add(sid)
                self.end_session(sid, "join_failed")
                continue
            log.info("session %s joined slot %d (%s)", sid, slot, describe_sampling(self.sessions[sid].sampling))
        if failed:
            plan.step = [(sid, slot) for sid, slot in plan.step if sid not in failed]
            stepping = [(session, slot) for session, slot in stepping if session.id not in failed]
        if not stepping:
            return plan
        frames = []
        for session, _ in stepping:
            frame, exhausted = session.pop_frame()
            frames.append(frame)
            if exhausted and session.end_on_input_end:
                self.end_session(session.id, "input_end")
        start = time.perf_counter()
        out = self.runner.step(plan.slots, torch.from_numpy(np.stack(frames)))
        self.last_step = (time.perf_counter() - start, len(stepping))
        self.metrics.step_duration.observe(self.last_step[0])
        self.metrics.batch_size.observe(len(stepping))
        now = time.monotonic()
        for row, (session, slot) in enumerate(stepping):
            if not out.ready[row]:
                continue
            if session.first_audio_at is None:
                session.first_audio_at = now
                self.metrics.first_audio.observe(now - session.created)
            token = out.text_tokens[row]
            if self._deliver(session, FrameOutput(session.frames_out, token, self.runner.tokenizer.piece(token),
                                                  out.audio_tokens[row], out.pcm[slot].numpy())):
                session.frames_out += 1
        with self._cond:
            self.metrics.counters["ticks_total"] += 1
        return plan

    def _expire(self) -> None:
        """Ends the sessions that would otherwise hold their admission for good."""
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if session.end_reason is not None:
                continue
            if session.input_ended and session.id not in self.sched.slot_of and not session.has_frame():
                # Its input ended before a whole frame came: it would never join, nor time out.
                self._end_locked(session, "input_end")
            elif self.idle_timeout is not None and not session.input_ended \
                    and now - session.last_activity > self.idle_timeout:
                self._end_locked(session, "idle_timeout")

    def run_offline(self, on_tick: Callable[[Plan], None] | None = None) -> None:
        while self.sessions:
            plan = self.tick()
            if on_tick is not None:
                on_tick(plan)

    def run_realtime(self, wait: Callable[[float], None] | None = None,
                     after_tick: Callable[[], None] | None = None) -> None:
        """Ticks on a deadline-driven cadence until `stop()`. `wait(seconds)` is called on every
        pass, 0 when the loop is behind, so that what it serves (the API processes' messages) is
        served whatever the ticks cost; `after_tick()` after each tick (to deliver its frames)."""
        wait = wait or (lambda seconds: self._stop.wait(seconds) if seconds > 0 else None)
        cadence = Cadence(lambda: self.metrics.inc("late_ticks_total"), lambda: self.last_step)
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            wait(cadence.until_due())
            if cadence.until_due() > 0 or self._stop.is_set():
                continue
            self._guarded_tick()
            if after_tick is not None:
                after_tick()
            cadence.ticked()

    def _guarded_tick(self) -> None:
        try:
            if self.tick().step:  # only a tick that stepped sessions shows the engine works
                self.failed_ticks = 0
        except Exception as e:
            # A bug must not stop the cadence for everyone: end the sessions of the failed tick
            # (their slot state is suspect) and keep serving the rest.
            log.exception("tick failed; ending the sessions it was stepping")
            self.failed_ticks += 1
            self.last_error = f"{type(e).__name__}: {e}"
            self.metrics.inc("tick_failures_total")
            with self._cond:
                stepping = list(self.sched.slot_of)
            for sid in stepping:
                self.end_session(sid, "engine_error")

    def start(self) -> None:
        """Ticks on a thread of this process (tests, benchmarks); `lockstep serve` ticks on its
        engine process's main thread instead."""
        self._thread = threading.Thread(target=self.run_realtime, name="lockstep-engine", daemon=True)
        self._thread.start()

    def stalled(self) -> str | None:
        """Why the real-time loop is not serving, or None while it is, or before it was started."""
        if self._thread is None:
            return None
        if not self._thread.is_alive():
            return "the engine thread has ended"
        return stall_reason(time.monotonic() - (self.heartbeat or time.monotonic()), self.failed_ticks,
                            self.last_error)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def drain(self) -> None:
        """Refuse new sessions from now on; running ones go on."""
        with self._cond:
            self.draining = True
            self._admission_changed()
