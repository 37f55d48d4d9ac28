"""RateLimiter: a reference -> commands within position, velocity and acceleration limits.

The command is a discrete double integrator, one step per control tick of length T::

    v_k = clip(v_des, limits);  q_k = q_{k-1} + T v_k

so ``v_k = (q_k - q_{k-1}) / T`` and ``a_k = (v_k - v_{k-1}) / T`` are exactly the finite
differences of consecutive commands, and each step bounds them by construction:

- ``|v_k| <= vmax``, and ``|v_k - v_{k-1}| <= amax T`` (so ``|a_k| <= amax``);
- braking: ``v_k`` never exceeds what amax can stop before a position limit, whatever the
  lengths of the ticks to come. With R the room left before the step, the command must keep
  ``v_k^2 / (2 amax) <= R - v_k T`` (after moving ``v_k T`` it can still stop, and stopping
  in ticks of any length never takes more than ``v^2 / 2 amax``), whence
  ``v_k <= sqrt(amax^2 T^2 + 2 amax R) - amax T``. The bound is invariant for any sequence of
  tick lengths (braking at amax from a state that meets it meets it again: with
  ``v' = v - amax T'``, ``v'^2 / 2 amax + v' T' = v^2 / 2 amax - amax T'^2 / 2``), so the
  final position clamp never has to act from a state that met it, the acceleration bound is
  never overruled by braking (jittered or late ticks included), and the velocity is 0 at a
  limit;
- tracking: ``v_des = v_ref + u`` with the position error ``e = q_ref - q_{k-1} - T v_ref``
  corrected deadbeat (``u = e / T``) when ``|e| < 2 alpha T^2`` and along the braking curve
  ``u = sign(e) sqrt(2 alpha |e|)`` beyond (alpha = ``TRACK_DECEL`` * amax), so a feasible
  reference is followed exactly (``q_k = q_ref``) and a large error closes without zig-zag;
- ``q_ref = None``: watchdog hold, ``v_des = 0``: decelerate at amax, then stand still.

A reference outside the position limits is tracked at the limit, without feed-forward.
"""

from __future__ import annotations

import numpy as np

TRACK_DECEL = 0.5  # fraction of amax the tracking correction may spend closing an error
TRACK_EPS = 1e-9  # rad: a command this close to the reference lands on it (``exact``)
MAX_PERIOD = 0.02  # s, longest tick the executor integrates (50 Hz, the slowest supported rate)
ZONE_PERIOD = 2 * MAX_PERIOD  # s, longest tick the braking-free fast path is valid for


class RateLimiter:
    """State (q, v, a) of the command; ``step`` advances it by one tick. Not thread-safe (the
    executor's lock guards it). ``exact`` after a step: the command landed on the reference.

    Cost: while no bound is active (steady tracking) one Python pass over the joints proves it
    and the step is the deadbeat one, a handful of numpy operations (``_fast``); otherwise the
    general step, ~20 small numpy operations, the braking terms only within stopping distance of
    a limit (``_zone``). Both compute the same command (test_control_limits checks it).
    """

    def __init__(self, position_min, position_max, velocity_max, acceleration_max):
        self.lo = np.asarray(position_min, dtype=np.float64)
        self.hi = np.asarray(position_max, dtype=np.float64)
        self.vmax = np.asarray(velocity_max, dtype=np.float64)
        self.amax = np.asarray(acceleration_max, dtype=np.float64)
        self._alpha2 = 2.0 * TRACK_DECEL * self.amax
        self._amax2 = 2.0 * self.amax
        self._lo, self._hi = self.lo.tolist(), self.hi.tolist()
        # Beyond this distance from a limit the braking bound exceeds vmax for any tick up to
        # ZONE_PERIOD (it needs vmax^2 / 2a + vmax T), and one tick (vmax T) cannot reach the
        # limit: no braking terms needed there.
        tz = ZONE_PERIOD
        zone = self.vmax**2 / (2 * self.amax) + 2.0 * self.vmax * tz
        self._lo_zone, self._hi_zone = (self.lo + zone).tolist(), (self.hi - zone).tolist()
        self._free = list(zip(self._lo_zone, self._hi_zone, self.vmax.tolist(),
                              self.amax.tolist(), self._alpha2.tolist()))
        self.exact = False
        self.reset((self.lo + self.hi) / 2)

    def reset(self, q) -> None:
        """Command := ``q`` (clamped to the limits), at rest."""
        self.q = np.minimum(np.maximum(np.asarray(q, dtype=np.float64), self.lo), self.hi)
        self.v = np.zeros_like(self.q)
        self.a = np.zeros_like(self.q)
        self.exact = False

    @staticmethod
    def _outside(x: np.ndarray, lo: list, hi: list) -> bool:
        return any(xi < a or xi > b for xi, a, b in zip(x.tolist(), lo, hi))

    name = "exact"

    def step(self, q_ref, v_ref, period: float, a_ref=None, ref_at=None) -> np.ndarray:
        """Advance one tick of ``period`` s toward ``q_ref`` (velocity ``v_ref``), or hold when
        ``q_ref`` is None (``a_ref``, ``ref_at``: not used, see jerk.JerkLimiter). Returns the
        new position; ``self.v``, ``self.a`` are its finite differences. Arrays are replaced,
        never written in place (readers may hold them)."""
        inv_t = 1.0 / period
        if q_ref is not None and period <= ZONE_PERIOD:
            v = q_ref - self.q
            v *= inv_t
            if self._deadbeat_free(v, v_ref, period):
                return self._commit(self.q + v * period, v, inv_t, True)
        return self._general(q_ref, v_ref, period, inv_t)

    def _deadbeat_free(self, v: np.ndarray, v_ref: np.ndarray, t: float) -> bool:
        """Whether the deadbeat velocity ``v`` is what ``_general`` would command: q far from
        the limits, ``|v| <= vmax``, ``|v - v_prev| <= amax t`` and the error in the deadbeat
        region, ``|v - v_ref| < 2 alpha t``, on every joint."""
        for qj, vj, vpj, vrj, (lo, hi, vm, am, al2) in zip(
                self.q.tolist(), v.tolist(), self.v.tolist(), v_ref.tolist(), self._free):
            if not (lo <= qj <= hi and -vm <= vj <= vm and abs(vj - vpj) <= am * t
                    and abs(vj - vrj) < al2 * t):
                return False
        return True

    def _general(self, q_ref, v_ref, t: float, inv_t: float) -> np.ndarray:
        q, v_prev = self.q, self.v
        if q_ref is None:
            v = np.zeros_like(q)
        else:
            if self._outside(q_ref, self._lo, self._hi):  # track at the limit, no feed-forward
                target = np.minimum(np.maximum(q_ref, self.lo), self.hi)
                v_ff = v_ref * (target == q_ref)
            else:
                target, v_ff = q_ref, v_ref
            e = target - q
            e -= t * v_ff
            mag = np.abs(e)
            u = np.minimum(mag * inv_t, np.sqrt(self._alpha2 * mag))
            v = np.copysign(u, e, out=u)
            v += v_ff
            np.minimum(v, self.vmax, out=v)
            np.maximum(v, -self.vmax, out=v)
        at = self.amax * t
        lower, upper = v_prev - at, v_prev + at
        near = t > ZONE_PERIOD or self._outside(q, self._lo_zone, self._hi_zone)
        if near:
            at2 = at * at
            brake_hi = np.sqrt(at2 + self._amax2 * np.maximum(self.hi - q, 0.0)) - at
            brake_lo = np.sqrt(at2 + self._amax2 * np.maximum(q - self.lo, 0.0)) - at
            lower = np.maximum(lower, -np.maximum(brake_lo, 0.0))
            upper = np.maximum(np.minimum(upper, np.maximum(brake_hi, 0.0)), lower)
        np.maximum(v, lower, out=v)
        np.minimum(v, upper, out=v)
        q_new = v * t
        q_new += q
        if near and self._outside(q_new, self._lo, self._hi):  # safety net, see docstring
            q_new = np.minimum(np.maximum(q_new, self.lo), self.hi)
            v = (q_new - q) * inv_t
        exact = q_ref is not None and max(map(abs, (q_new - q_ref).tolist())) <= TRACK_EPS
        return self._commit(q_new, v, inv_t, exact)

    def _commit(self, q_new, v, inv_t: float, exact: bool) -> np.ndarray:
        a = v - self.v
        a *= inv_t
        self.q, self.v, self.a, self.exact = q_new, v, a, exact
        return q_new
