"""JerkLimiter: a reference -> commands within position, velocity, acceleration and jerk limits,
by ruckig's online trajectory generation (PyPI ``ruckig``, the generator MoveIt 2 uses).

Same interface as :class:`~pi0_ros.control.limits.RateLimiter` (``reset``, ``step``, ``q``,
``v``, ``a``, ``exact``), so the executor takes either; it falls back to the RateLimiter (no
jerk limit) when ruckig is not importable (:func:`make_limiter`).

The command is the state of a continuous-time trajectory whose jerk is piecewise constant: each
tick of length T starts a time-optimal ruckig trajectory from the commanded state (q, v, a) and
samples it at T. Per joint, independently (one 1-DoF generator each), so a joint that lags does
not slow the others:

- tracking: the target is the reference's state (q, v, a) at the tick's end, with the minimum
  duration T, so a reference within the limits is followed exactly (the sample at T lands on
  it). Off the reference, reaching that target takes longer than T -- by then the reference
  has moved on -- so the target is the reference's state at the earliest time tau at which
  ruckig can reach it (doubling then bisecting tau): the command intercepts the reference.
  Target v and a are clipped to what ruckig accepts as a target (``|a| <= amax``,
  ``|v| + a^2 / 2 jmax <= vmax``); a reference outside the position limits is targeted at
  the limit, at rest;
- position limits: a tracking step is taken only if the jerk-limited stop from its end state
  (ruckig's velocity interface to v = a = 0, its position extrema) stays within the limits;
  otherwise the step brakes from the current state instead. Braking from a state that passed
  the check never leaves the limits (the rest of a time-optimal stop is the time-optimal stop
  from any state on it), so the check holds at every tick, whatever the tick lengths. Far from
  the limits (beyond a conservative stopping distance) the check is skipped;
- hold (``q_ref`` None): the velocity interface to v = a = 0: decelerate within the limits.

Every command meets ``|v| <= vmax``, ``|a| <= amax`` and ``|a_k - a_{k-1}| <= jmax T`` (the
state is continuous, its jerk piecewise constant within ``jmax``), and the finite differences
of consecutive positions are averages of v, a and j, so they meet the same bounds.
"""

from __future__ import annotations

import logging

import numpy as np

from pi0_ros.control.limits import ZONE_PERIOD, RateLimiter

log = logging.getLogger(__name__)

try:  # optional at import: without it the executor falls back to the RateLimiter
    import ruckig
except ImportError:  # pragma: no cover - exercised by test_control_jerk with a blocked import
    ruckig = None

TARGET_MARGIN = 1e-9  # relative margin inside ruckig's own target-validity bounds
CLAMP_EPS = 1e-9  # rad: a stop ending this far past a limit is float rounding (clamped)
DIRECT_Q_TOL = 1e-12  # rad: a reference this close to one constant-jerk piece is taken as is
DIRECT_V_TOL = 1e-10  # rad/s (their effect on the jerk: ~1e-4 rad/s^3 at 500 Hz)
INTERCEPT_DOUBLINGS = 8  # off the reference: intercept times tried T, 2T, ... 256 T
INTERCEPT_BISECTIONS = 5  # then bisected to within 1/32 of the last doubling
INTERCEPT_SLACK = 1.0 + 1e-9  # a trajectory longer than its minimum duration by more: too late


def available() -> bool:
    return ruckig is not None


class JerkLimiter:
    """See module docstring. Not thread-safe (the executor's lock guards it)."""

    name = "ruckig"

    def __init__(self, position_min, position_max, velocity_max, acceleration_max, jerk_max):
        if ruckig is None:
            raise ImportError("ruckig is not importable (pip install ruckig)")
        self.lo = np.asarray(position_min, dtype=np.float64)
        self.hi = np.asarray(position_max, dtype=np.float64)
        self.vmax = np.asarray(velocity_max, dtype=np.float64)
        self.amax = np.asarray(acceleration_max, dtype=np.float64)
        self.jmax = np.asarray(jerk_max, dtype=np.float64)
        d = self.lo.size
        if self.jmax.shape != (d,) or not np.all(np.isfinite(self.jmax)) or np.any(self.jmax <= 0):
            raise ValueError(f"jerk_max must be {d} finite values > 0, got {self.jmax}")
        # Beyond this distance from a limit no stop can reach it (a stop from vmax, amax toward
        # the limit travels at most vmax (3 amax / jmax + 2 T) + vmax^2 / 2 amax).
        zone = self.vmax * (3.0 * self.amax / self.jmax + 2.0 * ZONE_PERIOD) \
            + self.vmax**2 / (2.0 * self.amax)
        self._zone_lo, self._zone_hi = self.lo + zone, self.hi - zone
        self._otg = ruckig.Ruckig(1)
        self._traj = ruckig.Trajectory(1)
        self._track_in, self._brake_in = [], []
        for j in range(d):
            track, brake = ruckig.InputParameter(1), ruckig.InputParameter(1)
            for inp in (track, brake):
                inp.max_velocity = [float(self.vmax[j])]
                inp.max_acceleration = [float(self.amax[j])]
                inp.max_jerk = [float(self.jmax[j])]
            track.synchronization = ruckig.Synchronization.Time
            brake.control_interface = ruckig.ControlInterface.Velocity
            brake.target_velocity, brake.target_acceleration = [0.0], [0.0]
            self._track_in.append(track)
            self._brake_in.append(brake)
        self._vcap = self.vmax * (1.0 - TARGET_MARGIN)
        self._acap = self.amax * (1.0 - TARGET_MARGIN)
        self.exact = False
        self.clamped = 0  # safety-net position clamps (never expected; counted for tests)
        self.reset((self.lo + self.hi) / 2)

    def reset(self, q) -> None:
        """Command := ``q`` (clamped to the limits), at rest."""
        self.q = np.minimum(np.maximum(np.asarray(q, dtype=np.float64), self.lo), self.hi)
        self.v = np.zeros_like(self.q)
        self.a = np.zeros_like(self.q)

    # -- one joint -----------------------------------------------------------------------------
    def _sample(self, inp, t: float):
        try:
            result = self._otg.calculate(inp, self._traj)
        except Exception as exc:  # ruckig.RuckigError: an input it cannot solve
            raise ValueError(f"ruckig: {exc}") from exc
        if result not in (ruckig.Result.Working, ruckig.Result.Finished):
            raise ValueError(f"ruckig: {result}")
        p, v, a = self._traj.at_time(t)
        return p[0], v[0], a[0]

    def _brake(self, j: int, q: float, v: float, a: float, t: float):
        """State after ``t`` s of the jerk-limited stop from (q, v, a), and the stop's
        position extrema (lo, hi)."""
        inp = self._brake_in[j]
        inp.current_position, inp.current_velocity, inp.current_acceleration = [q], [v], [a]
        sample = self._sample(inp, t)
        ext = self._traj.position_extrema[0]
        return sample, ext.min, ext.max

    def _track(self, j: int, q, v, a, qt, vt, at, t: float, ref_at=None):
        try:
            s = self._track_once(j, q, v, a, qt, vt, at, t, t)
        except ValueError:  # no trajectory to the target at all: brake (never seen in tests)
            return self._brake(j, q, v, a, t)[0]
        if ref_at is None or self._traj.duration <= t * INTERCEPT_SLACK:
            return s
        # Off the reference: the earliest time tau at which its state can be reached (ruckig
        # with minimum duration tau arrives at tau exactly), doubling then bisecting.
        lo, hi, best = t, None, s
        tau = t
        for _ in range(INTERCEPT_DOUBLINGS):
            tau *= 2.0
            ref = ref_at(tau)
            if self._reaches(j, q, v, a, ref, tau, t):
                hi, best = tau, self._last
                break
            lo = tau
        if hi is None:
            return best  # not within reach in the horizon: aim at the tick's own target
        for _ in range(INTERCEPT_BISECTIONS):
            mid = 0.5 * (lo + hi)
            if self._reaches(j, q, v, a, ref_at(mid), mid, t):
                hi, best = mid, self._last
            else:
                lo = mid
        return best

    def _reaches(self, j, q, v, a, ref, tau: float, t: float) -> bool:
        """Whether the reference state ``ref`` (3, D) can be reached exactly at ``tau``; the
        sample at ``t`` of that trajectory is left in ``self._last``."""
        try:
            self._last = self._track_once(j, q, v, a, ref[0][j], ref[1][j], ref[2][j], tau, t)
        except ValueError:
            return False
        return self._traj.duration <= tau * INTERCEPT_SLACK

    def _track_once(self, j: int, q, v, a, qt, vt, at, duration: float, t: float):
        inp = self._track_in[j]
        lo, hi = self.lo[j], self.hi[j]
        if qt <= lo or qt >= hi:  # the reference is at / beyond a limit: go there, at rest
            qt, vt, at = min(max(qt, lo), hi), 0.0, 0.0
        else:
            acap = self._acap[j]
            at = min(max(at, -acap), acap)
            vcap = self._vcap[j] - at * at / (2.0 * self.jmax[j])
            if vcap <= 0.0:
                at, vcap = 0.0, self._vcap[j]
            vt = min(max(vt, -vcap), vcap)
        inp.current_position, inp.current_velocity, inp.current_acceleration = [q], [v], [a]
        inp.target_position, inp.target_velocity, inp.target_acceleration = [qt], [vt], [at]
        inp.minimum_duration = duration
        try:
            return self._sample(inp, t)
        except ValueError:  # a target ruckig refuses: aim at rest there
            inp.target_velocity, inp.target_acceleration = [0.0], [0.0]
            return self._sample(inp, t)

    # -- one tick ------------------------------------------------------------------------------
    def _direct(self, q_ref, v_ref, a_ref, t: float) -> list[bool]:
        """Per joint: whether the reference state at the tick's end is reached from the
        commanded state by one constant-jerk piece within every limit, ends in a state from
        which the velocity limit can still be kept, and is far from the position limits.
        Then it is what ruckig would return (a feasible trajectory of duration T exists, and
        ruckig with minimum duration T lands on its target at T), so it is taken without
        ruckig: the common case while tracking (a reference piece between knots)."""
        d = self.q.size
        if q_ref is None or a_ref is None or t > ZONE_PERIOD:
            return [False] * d
        q0, v0, a0 = self.q, self.v, self.a
        jerk = (a_ref - a0) / t
        v1 = v0 + t * (a0 + 0.5 * t * jerk)
        q1 = q0 + t * (v0 + t * (0.5 * a0 + t * jerk / 6.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(jerk != 0.0, -a0 / jerk, 0.0)
        s = np.clip(s, 0.0, t)
        v_mid = v0 + s * (a0 + 0.5 * s * jerk)  # the velocity's extreme inside the tick
        ok = ((np.abs(jerk) <= self.jmax) & (np.abs(a_ref) <= self.amax)
              & (np.abs(v_ref) <= self.vmax) & (np.abs(v_mid) <= self.vmax)
              # and the end state can bring its acceleration to 0 within vmax (else the next
              # ticks could only overshoot it: ruckig never enters such a state)
              & (np.abs(v_ref + a_ref * np.abs(a_ref) / (2.0 * self.jmax)) <= self.vmax)
              & (np.abs(v1 - v_ref) <= DIRECT_V_TOL) & (np.abs(q1 - q_ref) <= DIRECT_Q_TOL)
              & (q0 >= self._zone_lo) & (q0 <= self._zone_hi)
              & (q_ref >= self._zone_lo) & (q_ref <= self._zone_hi))
        return ok.tolist()

    def step(self, q_ref, v_ref, period: float, a_ref=None, ref_at=None) -> np.ndarray:
        """Advance one tick of ``period`` s toward the reference state (``q_ref``, ``v_ref``,
        ``a_ref``), or hold when ``q_ref`` is None. ``ref_at(tau)``: the reference's (3, D)
        state ``tau`` s after the tick's start, for intercepting it when a joint is off it (a
        trajectory to the tick's own target would then arrive late, at a point the reference
        has left). Returns the new position; ``self.v``, ``self.a`` are the command's velocity
        and acceleration. Arrays are replaced."""
        direct = self._direct(q_ref, v_ref, a_ref, period)
        q0, v0, a0 = self.q.tolist(), self.v.tolist(), self.a.tolist()
        d = len(q0)
        qn, vn, an = [0.0] * d, [0.0] * d, [0.0] * d
        if q_ref is not None:
            qr, vr = q_ref.tolist(), v_ref.tolist()
            ar = a_ref.tolist() if a_ref is not None else [0.0] * d
        for j in range(d):
            if direct[j]:  # the reference itself is this tick's time-optimal-feasible piece
                qn[j], vn[j], an[j] = qr[j], vr[j], ar[j]
                continue
            q, v, a = q0[j], v0[j], a0[j]
            lo, hi = self.lo[j], self.hi[j]
            if q_ref is None:
                s = self._brake(j, q, v, a, period)[0]
            else:
                s = self._track(j, q, v, a, qr[j], vr[j], ar[j], period, ref_at)
                near = (q < self._zone_lo[j] or q > self._zone_hi[j]
                        or s[0] < self._zone_lo[j] or s[0] > self._zone_hi[j]
                        or period > ZONE_PERIOD)
                if near:
                    _, stop_lo, stop_hi = self._brake(j, *s, period)
                    if stop_lo < lo or stop_hi > hi:  # could not stop in time: brake now
                        s = self._brake(j, q, v, a, period)[0]
            p = s[0]
            if p < lo or p > hi:  # safety net (see module docstring)
                if p < lo - CLAMP_EPS or p > hi + CLAMP_EPS:  # more than rounding: never seen
                    self.clamped += 1
                p = min(max(p, lo), hi)
            qn[j], vn[j], an[j] = p, s[1], s[2]
        self.q, self.v, self.a = np.array(qn), np.array(vn), np.array(an)
        self.exact = False
        return self.q


def make_limiter(config):
    """The executor's limiter for an ``ExecutorConfig``: the :class:`JerkLimiter` when
    ``jerk_max`` is set and ``tracker`` allows it (``"auto"``: if ruckig is importable, else
    the RateLimiter with a warning; ``"ruckig"``: required), else the exact
    :class:`~pi0_ros.control.limits.RateLimiter`."""
    args = (config.position_min, config.position_max, config.velocity_max,
            config.acceleration_max)
    if config.jerk_max and config.tracker != "exact":
        if ruckig is not None:
            return JerkLimiter(*args, config.jerk_max)
        if config.tracker == "ruckig":
            raise ValueError("tracker 'ruckig': ruckig is not importable (pip install ruckig)")
        log.warning("ruckig not importable: jerk_max ignored, the exact velocity / "
                    "acceleration limiter runs instead (pip install ruckig)")
    return RateLimiter(*args)
