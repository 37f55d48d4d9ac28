"""Streaming chunk executor: interpolation, stitching, limits, watchdog (no rclpy; one lock).

API (times in seconds on the caller's clock; docs/EXECUTOR.md)::

    ex = StreamingExecutor(ExecutorConfig(...), default_period); ex.set_state(q, t)
    accepted, reason = ex.submit(chunk_from_arrays(t0, dt, names, actions), now)
    cmd = ex.tick(now)  # Command(position, velocity, acceleration, holding); cmd.status

Contract:

- ``submit(chunk, now) -> (accepted, reason)``. A chunk is rejected whole, counted in
  ``stats["rejected"][reason]`` and logged as a warning, for: ``dimension`` (joint count),
  ``joint_names`` (names / order differ from the config), ``non_finite``, ``dt`` (not > 0),
  ``stale`` (``t0`` not newer than the last accepted chunk's), ``all_past`` (no action at or
  after ``now``), ``too_short`` (ends within 1 ms of the seam), ``seam_jump`` (the chunk's
  first future action is further than ``max_seam_jump`` from where the current reference --
  or, without one, the command -- is at that time). Actions with ``t0 + k dt < now`` are
  dropped before fitting: never executed, no influence
  (:class:`~pi0_ros.control.trajectory.ChunkTrajectory`).
- The seam is the time ``t_s`` of the last command. The new reference is built there from the
  *commanded state* (q, v) -- v is the reference's velocity while the command follows it
  exactly, else the command's finite-difference velocity -- by the configured strategy
  (:mod:`pi0_ros.control.stitching`): ``replace``, ``crossfade`` (over ``crossfade_window``),
  ``temporal_ensemble`` (ACT weights ``exp(-ensemble_decay * i)``, i = 0 oldest, ramped in and
  out over ``crossfade_window``). Each keeps the reference's q and v continuous at the seam.
- ``step(now, period)`` / ``tick(now)`` sample the reference at ``now`` and pass it through the
  :class:`~pi0_ros.control.limits.RateLimiter`: positions within limits (braking to v = 0 at a
  limit), ``|v| <= vmax`` and ``|a| <= amax`` between consecutive commands at any rate.
- Watchdog: when the reference ends (a chunk is never extrapolated) or no chunk was accepted for
  ``chunk_timeout`` s, the reference is dropped and the command decelerates within amax and
  holds (``holding=True``; each hold counted once in ``stats["holds"]``); the next fresh chunk
  resumes from the commanded state through a C1 join.
- Work at submit: validation, the spline solve, the join. Work per tick: one reference sample
  (one per live chunk for the ensemble) and the limiter, a few dozen small numpy operations.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

import numpy as np

from pi0_ros.control.chunk import DT_MAX, DT_MIN, ActionChunk, ChunkError, chunk_from_arrays
from pi0_ros.control.jerk import make_limiter
from pi0_ros.control.limits import MAX_PERIOD
from pi0_ros.control.stitching import Blend, Ensemble, Handover, Joined
from pi0_ros.control.trajectory import INTERPOLATIONS, ChunkTrajectory

log = logging.getLogger(__name__)
STRATEGIES = ("replace", "crossfade", "temporal_ensemble", "rtc")
TRACKERS = ("auto", "ruckig", "exact")  # see jerk.make_limiter
STALE_STATE = 0.1  # s without a tick after which submit takes the command as standing at `now`
CROSSFADE_MAX_DEPTH = 4  # nested crossfades (chunks faster than the window) before a plain join
MIN_BLEND_WINDOW = 1e-3  # s, shorter crossfade windows (old reference about to end) just join
STATE_LIMIT_TOLERANCE = 1e-3  # rad: a measured state this far outside a limit is clamped
ACTION_LIMIT_MARGIN = 1.0  # rad: an action further outside a position limit rejects the chunk
MIN_TICK = 1e-6  # s: a tick closer than this to the previous one repeats its command
CLOCK_JUMP = 1.0  # s: a tick this far before the previous one is a clock jump back (re-base)


@dataclass(frozen=True)
class ExecutorConfig:
    joint_names: tuple[str, ...]
    position_min: tuple[float, ...]
    position_max: tuple[float, ...]
    velocity_max: tuple[float, ...]
    acceleration_max: tuple[float, ...]
    strategy: str = "replace"
    interpolation: str = "cubic"
    crossfade_window: float = 0.1  # s; also the ensemble's ramp-in / ramp-out
    ensemble_decay: float = 0.01  # ACT weight exp(-decay * i), i = 0 the oldest live chunk
    max_seam_jump: float = 0.5  # rad
    chunk_timeout: float = 0.5  # s
    max_future_stamp: float = 0.5  # s: a chunk stamped further ahead of `now` is rejected
    jerk_max: tuple[float, ...] = ()  # rad/s^3 per joint; () = no jerk limit
    tracker: str = "auto"  # auto | ruckig | exact (jerk.make_limiter)

    def __post_init__(self):
        object.__setattr__(self, "joint_names", tuple(self.joint_names))
        d = len(self.joint_names)
        for name in ("position_min", "position_max", "velocity_max", "acceleration_max"):
            vals = tuple(float(x) for x in getattr(self, name))
            object.__setattr__(self, name, vals)
            if len(vals) != d:
                raise ValueError(f"{name} has {len(vals)} values, expected {d}")
            if not all(math.isfinite(x) for x in vals):
                raise ValueError(f"{name} {vals} must be finite")
        jerk = tuple(float(x) for x in self.jerk_max)
        object.__setattr__(self, "jerk_max", jerk)
        if jerk and (len(jerk) != d or not all(math.isfinite(x) and x > 0 for x in jerk)):
            raise ValueError(f"jerk_max {jerk}: expected {d} finite values > 0 (or none)")
        if self.tracker not in TRACKERS:
            raise ValueError(f"tracker {self.tracker!r} not in {TRACKERS}")
        if np.any(np.asarray(self.position_min) > np.asarray(self.position_max)):
            raise ValueError(f"position_min {self.position_min} > position_max")
        if min(self.velocity_max) <= 0 or min(self.acceleration_max) <= 0:
            raise ValueError("velocity_max and acceleration_max must be > 0")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} not in {STRATEGIES}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} not in {INTERPOLATIONS}")
        for name in ("crossfade_window", "chunk_timeout", "max_seam_jump", "max_future_stamp"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not math.isfinite(self.ensemble_decay):
            raise ValueError(f"ensemble_decay must be finite, got {self.ensemble_decay}")


@dataclass(frozen=True)
class Command:
    """One tick's command. ``position`` is what to send; ``velocity`` / ``acceleration`` are the
    reference's where the command follows it exactly and they are within the limits, else the
    finite differences of consecutive commands."""

    position: np.ndarray
    velocity: np.ndarray
    acceleration: np.ndarray
    holding: bool

    @property
    def status(self) -> str:
        """``"hold"`` (watchdog: decelerating / holding) or ``"track"`` (following a chunk)."""
        return "hold" if self.holding else "track"


class ChunkExecutor:
    """See module docstring. Thread-safe: one (re-entrant) lock guards all state."""

    def __init__(self, config: ExecutorConfig, initial_position, now: float):
        self.cfg = config
        self._lock = threading.RLock()
        self._names = tuple(config.joint_names)
        self._limiter = make_limiter(config)  # ruckig JerkLimiter or the exact RateLimiter
        self.tracker = self._limiter.name
        self._vmax, self._amax = self._limiter.vmax, self._limiter.amax
        self._vmax_l, self._amax_l = self._vmax.tolist(), self._amax.tolist()
        self._timeout = float(config.chunk_timeout)
        self.stats = {"seams": 0, "holds": 0, "faults": 0, "clock_jumps": 0,
                      "rtc_delay_mismatch": 0, "rejected": {}}
        self._last_t0 = -math.inf  # stamp of the last accepted chunk
        self._index = 0  # accepted chunks, the ensemble's arrival order
        self._reset(initial_position, now)

    def _reset(self, q, t: float) -> None:
        self._plan = None  # (set first: a reset from a fault must never keep the old plan)
        self._limiter.reset(q)
        self._t = t  # time of the commanded state (last tick)
        self._v = np.zeros_like(self._limiter.q)  # commanded-state velocity (see submit)
        self._plan = None
        self._arrival = -math.inf  # `now` of the last accepted chunk, for the timeout
        self._holding = True

    @property
    def position(self) -> np.ndarray:
        """A copy of the commanded position (the driver's ``state0`` for delta chunks)."""
        with self._lock:
            return self._limiter.q.copy()

    def counters(self) -> dict:
        """Copy of ``stats``: ``seams``, ``holds``, ``faults``, ``rejected`` (by reason)."""
        with self._lock:
            return {**self.stats, "rejected": dict(self.stats["rejected"])}

    def hold(self) -> None:
        """Drop the reference: from the next tick the command decelerates within the limits and
        holds (as the watchdog does), until a chunk is accepted."""
        with self._lock:
            self._plan, self._arrival = None, -math.inf

    def reject(self, reason: str, detail: str = ""):
        """Count a chunk rejected for ``reason`` (also by callers that fail to build one);
        returns ``(False, reason)``."""
        with self._lock:
            self.stats["rejected"][reason] = self.stats["rejected"].get(reason, 0) + 1
        log.warning("chunk rejected: %s%s", reason, f" ({detail})" if detail else "")
        return False, reason

    def _check(self, chunk: ActionChunk) -> str | None:
        """Reason to reject ``chunk`` for its contents, or None (no lock: config is immutable).
        Repeats ActionChunk's own checks: the arrays may have been built by other code."""
        acts = chunk.actions
        if acts.ndim != 2 or acts.shape[1] != len(self._names) or acts.shape[0] < 1:
            return "dimension"
        if chunk.joint_names != self._names:
            return "joint_names"
        if not (np.all(np.isfinite(acts)) and math.isfinite(chunk.t0)
                and (chunk.state0 is None or np.all(np.isfinite(chunk.state0)))):
            return "non_finite"
        if not (math.isfinite(chunk.dt) and DT_MIN <= chunk.dt <= DT_MAX):
            return "dt"
        return None

    def _out_of_range(self, traj: ChunkTrajectory) -> bool:
        """Whether an action is more than ``ACTION_LIMIT_MARGIN`` outside a position limit (a
        garbage chunk: its spline could reach magnitudes whose derivatives overflow)."""
        pos = traj.positions
        lim = self._limiter
        return bool(np.any(pos < lim.lo - ACTION_LIMIT_MARGIN)
                    or np.any(pos > lim.hi + ACTION_LIMIT_MARGIN))

    def submit(self, chunk: ActionChunk, now: float, rtc_delay: int = 0):
        """Stitch ``chunk`` (arrived at ``now``) into the reference; ``(accepted, reason)``.

        ``rtc_delay`` (strategy ``rtc``; 0 = none): the chunk was computed with real-time
        chunking assuming its first d actions are executed from the current reference, so it
        starts exactly at action d (``t0 + d dt``, :class:`Handover`). When the executor cannot
        (the chunk arrived after that time, or the reference ends before it) it joins at the
        seam like ``replace`` and counts ``rtc_delay_mismatch`` (the real start index logged)."""
        reason = self._check(chunk)
        if reason is None and not math.isfinite(now):
            reason = "non_finite"
        if reason is None and chunk.t0 > now + self.cfg.max_future_stamp:
            reason = "future_stamp"  # never accepted, so it can never make later chunks stale
        if reason is not None:
            return self.reject(reason, f"t0={chunk.t0!r} dt={chunk.dt!r} now={now!r}")
        detail = ""
        try:  # the spline solve, outside the lock: a tick never waits for it
            traj, past = ChunkTrajectory(chunk, now, self.cfg.interpolation), None
        except ChunkError as exc:
            traj, past = None, exc.reason
            if past == "all_past":
                detail = (f"arrived {now - chunk.t0:.3f} s after its observation, past its last "
                          f"action at +{chunk.t_end - chunk.t0:.3f} s: inference latency "
                          "exceeded the chunk horizon")
        if past is None and self._out_of_range(traj):
            past = "out_of_range"
        with self._lock:
            if self._last_t0 > now + self.cfg.max_future_stamp:
                # The clock went back (a looping bag, a reset sim): the last stamp is from a
                # future that will not come; stamps are ordered again from here.
                self._last_t0 = -math.inf
                self.stats["clock_jumps"] += 1
            if chunk.t0 <= self._last_t0:
                return self.reject("stale")
            if past is not None:
                return self.reject(past, detail)
            if now - self._t > STALE_STATE:  # ticks not running: the state stands at `now`
                self._plan, self._t = None, now
            t_s, q, v = self._t, self._limiter.q, self._v
            try:
                new = Joined(traj, t_s, q, v, (self._vmax, self._amax))
            except ChunkError as exc:
                return self.reject(exc.reason)
            old = self._plan
            t_first = max(traj.t_start, t_s)  # the chunk's first future action
            handover = None
            if self.cfg.strategy == "rtc" and rtc_delay > 0:
                handover = self._rtc_handover(chunk, traj, old, t_s, int(rtc_delay))
                if handover is not None:
                    t_first = handover.t_switch
            ahead = old.eval(t_first)[0] if old is not None and t_first <= old.t_end else q
            if np.max(np.abs(traj.eval(t_first)[0] - ahead)) > self.cfg.max_seam_jump:
                return self.reject("seam_jump")
            if self.cfg.strategy == "rtc" and rtc_delay > 0 and handover is None:
                start = max(0, math.ceil((t_s - chunk.t0) / chunk.dt - 1e-9))
                self.stats["rtc_delay_mismatch"] += 1
                log.warning("rtc: chunk starts at action %d, not at the delay d=%d its prefix "
                            "assumed (arrived %.1f ms after its observation; %s)", start,
                            rtc_delay, (now - chunk.t0) * 1e3,
                            "no reference to continue" if old is None else
                            "the reference ends before action d" if t_s <= chunk.t0 +
                            rtc_delay * chunk.dt else "action d's time had passed")
            self._plan = handover or self._stitch(old, new, t_s)
            self._last_t0, self._arrival = chunk.t0, now
            self._index += 1
            self.stats["seams"] += 1
            return True, "ok"

    def _rtc_handover(self, chunk: ActionChunk, traj: ChunkTrajectory, old, t_s: float,
                      d: int):
        """``old`` until action d's time, then a C1 join from it into the chunk; None when the
        reference cannot be continued up to that time (then: a delay mismatch)."""
        t_d = chunk.t0 + d * chunk.dt
        if old is None or not t_s <= t_d <= old.t_end or traj.t_end - t_d < 1e-3:
            return None
        ref = old.eval(t_d)
        try:
            new = Joined(traj, t_d, ref[0], ref[1], (self._vmax, self._amax))
        except ChunkError:
            return None
        return Handover(old, new, t_d)

    def _stitch(self, old, new: Joined, t_s: float):
        cfg = self.cfg
        if cfg.strategy == "temporal_ensemble":
            if not isinstance(old, Ensemble):
                old = Ensemble(cfg.ensemble_decay, cfg.crossfade_window)
            return old.add(new, self._index)
        if cfg.strategy == "replace" or old is None:
            return new
        window = min(cfg.crossfade_window, old.t_end - t_s, new.t_end - t_s)
        if window < MIN_BLEND_WINDOW:
            return new
        if old.depth >= CROSSFADE_MAX_DEPTH:  # bound the tick cost: C1 join from the reference
            ref = old.eval(t_s)
            return Joined(new.traj, t_s, ref[0], ref[1], (self._vmax, self._amax))
        return Blend(old, new, t_s, window)

    def reference(self, t: float) -> np.ndarray | None:
        """(3, D) rows q, v, a of the current (un-limited) reference at ``t``, or None where it
        is not defined. For tests, plots and diagnostics; the tick uses the same plan."""
        with self._lock:
            plan = self._plan
            if plan is None or not plan.t_start <= t <= plan.t_end:
                return None
            return plan.eval(t)

    def step(self, now: float, period: float) -> Command:
        """Advance the command to ``now``, ``period`` s after the previous one."""
        with self._lock:
            plan, lim = self._plan, self._limiter
            q_prev = lim.q  # finite by induction: the fallback if this step is not
            if plan is not None and (now > plan.t_end or now < plan.t_start
                                     or now - self._arrival > self._timeout):
                plan = self._plan = None  # watchdog: chunk ran out / none fresh / clock jump
            if plan is None:
                if not self._holding:
                    self.stats["holds"] += 1
                self._holding = True
                q = lim.step(None, None, period)
                self._v, acc = lim.v, lim.a
            else:
                self._holding = False
                q_ref, v_ref, a_ref = plan.eval(now)
                t_prev, t_end = now - period, plan.t_end
                q = lim.step(q_ref, v_ref, period, a_ref,
                             lambda tau: plan.eval(min(t_prev + tau, t_end)))
                if lim.exact and self._feasible(v_ref, a_ref):  # report the reference's v, a
                    self._v, acc = v_ref, a_ref
                else:  # the limiter's finite differences
                    self._v, acc = lim.v, lim.a
                self._plan = plan.settle(now)
            if not (np.all(np.isfinite(q)) and np.all(np.isfinite(self._v))
                    and np.all(np.isfinite(acc))):
                return self._fault(now, q_prev)
            self._t = now
            return Command(q.copy(), self._v.copy(), acc.copy(), self._holding)

    def _fault(self, now: float, q: np.ndarray) -> Command:
        """Last line of defence (never reached by any known input): a non-finite command is
        replaced by holding the last finite commanded position, and counted in ``faults``."""
        log.error("non-finite command: holding %s", q.tolist())
        self.stats["faults"] += 1
        self._reset(q, now)
        return Command(q.copy(), np.zeros_like(q), np.zeros_like(q), True)

    def _feasible(self, v: np.ndarray, a: np.ndarray) -> bool:
        return all(-vm <= vj <= vm and -am <= aj <= am
                   for vj, aj, vm, am in zip(v.tolist(), a.tolist(), self._vmax_l, self._amax_l))


class StreamingExecutor(ChunkExecutor):
    """Injected-time facade for the ROS node and offline replay (bag time).

    ``ex = StreamingExecutor(config, default_period)``; ``ex.set_state(q, t)``;
    ``ex.submit(chunk, now)`` -> ``(accepted, reason)``; ``ex.tick(now)`` -> ``Command``.
    ``tick`` integrates the time since the previous tick (or ``set_state``), at most
    ``MAX_PERIOD``: after a gap the command moves as after one slow tick, never further;
    ``default_period`` before any ``set_state``; a tick that does not advance time by at least
    ``MIN_TICK`` repeats the last command; a tick more than ``CLOCK_JUMP`` before the previous
    one (the clock went back) drops the reference and decelerates to a hold from there.
    """

    def __init__(self, config: ExecutorConfig, default_period: float = 0.002):
        if not default_period > 0:
            raise ValueError(f"default_period must be > 0, got {default_period}")
        lo = np.asarray(config.position_min, dtype=np.float64)
        hi = np.asarray(config.position_max, dtype=np.float64)
        super().__init__(config, (lo + hi) / 2, now=0.0)
        self._default_period = default_period
        self._last_tick: float | None = None
        self._last_cmd: Command | None = None
        self.initialized = False

    def set_state(self, q, t: float) -> None:
        """Commanded state := measured positions ``q`` (at rest) at time ``t``; the reference is
        dropped (the executor holds until the next chunk). A position more than
        ``STATE_LIMIT_TOLERANCE`` outside its limits raises ``ValueError`` naming the joint: the
        first command would otherwise be a step to the limit (within the tolerance: clamped)."""
        q = np.asarray(q, dtype=np.float64).reshape(-1)
        shape = self._limiter.q.shape
        if q.shape != shape or not np.all(np.isfinite(q)) or not math.isfinite(t):
            raise ValueError(f"state must be finite of shape {shape} at a finite time, "
                             f"got {q} at t={t!r}")
        lim = self._limiter
        bad = [i for i, (x, lo, hi) in enumerate(zip(q.tolist(), lim.lo.tolist(), lim.hi.tolist()))
               if not lo - STATE_LIMIT_TOLERANCE <= x <= hi + STATE_LIMIT_TOLERANCE]
        if bad:
            raise ValueError("measured state outside the position limits: " + ", ".join(
                f"{self._names[i]}={q[i]:.6g} not in [{lim.lo[i]:.6g}, {lim.hi[i]:.6g}]"
                for i in bad))
        with self._lock:
            self._reset(q, t)
            self._last_tick, self._last_cmd = t, None
            self.initialized = True

    def submit_arrays(self, t0, dt, joint_names, actions, now: float, **kwargs):
        """``chunk_from_arrays`` + ``submit``: an invalid chunk is rejected with its reason."""
        try:
            chunk = chunk_from_arrays(t0, dt, joint_names, actions, **kwargs)
        except ChunkError as exc:
            return self.reject(exc.reason, str(exc))
        return self.submit(chunk, now)

    def tick(self, now: float) -> Command:
        if not math.isfinite(now):
            raise ValueError(f"tick time must be finite, got {now!r}")
        with self._lock:
            last = self._last_tick
            if last is not None and now < last - CLOCK_JUMP:  # clock jumped back: re-base
                self.stats["clock_jumps"] += 1
                log.warning("clock jumped back %.3f s: holding, re-based", last - now)
                self._plan, self._arrival, self._t = None, -math.inf, now  # decelerate, hold
                last = self._last_tick = now - self._default_period  # one period tick
            if last is not None and now < last + MIN_TICK:  # (1 / period must stay finite)
                if self._last_cmd is None:  # right after set_state: at rest
                    q = self._limiter.q
                    self._last_cmd = Command(q.copy(), np.zeros_like(q), np.zeros_like(q), True)
                return self._last_cmd
            period = self._default_period if last is None else min(now - last, MAX_PERIOD)
            self._last_tick = now
            self._last_cmd = self.step(now, period)
            return self._last_cmd
