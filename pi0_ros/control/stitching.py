"""Stitching: the executor's un-limited reference, built once per accepted chunk (no rclpy).

A *plan* is a reference over ``[t_start, t_end]`` with ``eval(t) -> (3, D)`` rows q, v, a,
``settle(t)`` (drop parts that no longer matter after ``t``) and ``depth`` (nesting of blends).
Every plan is C1 in time by construction -- position AND velocity continuous -- so the rate
limiter after it only has to enforce limits, never to hide a seam:

- :class:`Joined` (``replace``; every new chunk in the other two strategies too): a cubic Hermite
  from the commanded state (q, v) at the seam time ``t_s`` to the chunk's own (q, v) at
  ``t_j = max(first future action, t_s + JOIN_MIN_DURATION)`` -- later (up to
  ``JOIN_MAX_DURATION``) if that join would exceed vmax / amax -- then the chunk's spline;
- :class:`Blend` (``crossfade``): ``(1 - w) old + w new`` with the min-jerk weight w over a
  window from ``t_s``; v and a carry the w' and w'' terms, and w', w'' vanish at both window
  ends, so the blend leaves ``old`` and lands on ``new`` with matching q, v (and a);
- :class:`Ensemble` (``temporal_ensemble``): ACT's exponential weights over every live chunk,
  ``w_i = exp(-decay * i)`` with i = 0 the *oldest* chunk (ACT, Zhao et al. 2023: with
  ``decay > 0`` older predictions weigh more; ``decay < 0`` favours the newest), each multiplied
  by a min-jerk ramp-in over ``ramp`` after the chunk joins and a min-jerk ramp-out over the last
  ``ramp`` before its end. Normalized: ``q = sum(rho_i q_i) / sum(rho_i)``; v and a
  differentiate the quotient (weights' derivatives included), so joining and leaving are C1.
"""

from __future__ import annotations

import math

import numpy as np

from pi0_ros.control.chunk import ChunkError
from pi0_ros.control.trajectory import ChunkTrajectory, Piecewise, hermite, min_jerk

JOIN_MIN_DURATION = 0.05  # s, shortest C1 join from the commanded state into a new chunk
JOIN_MAX_DURATION = 0.25  # s, longest join tried to stay within vmax / amax
JOIN_STRETCH = 1.25  # ratio between the join durations tried (Joined)
MIN_REMAINING = 1e-3  # s, a chunk must reach at least this far past the seam (else too_short)
WEIGHT_FLOOR = 1e-300  # ensemble weight sum below which the newest member is used alone


def excess(join: Piecewise, vmax, amax) -> float:
    """``max(|v| / vmax, |a| / amax)`` over a single-piece cubic and all joints: <= 1 means
    within the limits. Exact: a is linear, so its extremes are at the ends; v is quadratic,
    extreme at the ends or at its vertex."""
    c0, c1, c2, c3 = join._c[0]
    span = join.t_end - join.t_start
    a_peak = np.maximum(np.abs(2.0 * c2), np.abs(2.0 * c2 + 6.0 * span * c3))
    v_end = c1 + span * (2.0 * c2 + 3.0 * span * c3)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(c3 != 0.0, -c2 / (3.0 * c3), 0.0)
    s = np.clip(s, 0.0, span)
    v_peak = np.maximum(np.abs(c1), np.maximum(np.abs(v_end),
                                               np.abs(c1 + s * (2.0 * c2 + 3.0 * s * c3))))
    return float(max(np.max(v_peak / vmax), np.max(a_peak / amax)))


def within(join: Piecewise, vmax, amax) -> bool:
    """Whether a single-piece cubic keeps ``|v| <= vmax`` and ``|a| <= amax``."""
    return excess(join, vmax, amax) <= 1.0


class Joined:
    """Hermite join from state (q, v) at ``t_s`` into ``traj`` at ``t_switch``, then ``traj``.

    ``t_switch = t_s + T0``, T0 the time to the chunk's first future action but at least
    ``JOIN_MIN_DURATION``. Given ``limits=(vmax, amax)`` the join is stretched along
    ``T0 * JOIN_STRETCH^k`` (up to ``JOIN_MAX_DURATION`` and the chunk's end) to the first
    duration that stays within them, so a feasible seam is executed exactly instead of being cut
    by the rate limiter; if none does (e.g. the chunk itself is faster than vmax), the one that
    exceeds them least (:func:`excess`; the shortest among equals).
    Raises :class:`ChunkError` ``"too_short"`` if the chunk ends within ``MIN_REMAINING``.
    """

    depth = 0

    def __init__(self, traj: ChunkTrajectory, t_s: float, q, v, limits=None,
                 min_duration: float = JOIN_MIN_DURATION):
        if traj.t_end - t_s < MIN_REMAINING:
            raise ChunkError("too_short", f"chunk ends at {traj.t_end:.6f}, less than "
                                          f"{MIN_REMAINING} s after the seam at {t_s:.6f}")
        span = max(traj.t_start - t_s, min_duration)
        join = self._join(traj, t_s, q, v, span)
        if limits is not None:
            best, best_excess = join, excess(join, *limits)
            while best_excess > 1.0 and span * JOIN_STRETCH <= JOIN_MAX_DURATION \
                    and join.t_end < traj.t_end:
                span *= JOIN_STRETCH
                join = self._join(traj, t_s, q, v, span)
                e = excess(join, *limits)
                if e < best_excess:
                    best, best_excess = join, e
            join = best
        self.traj, self.t_start, self.t_switch, self.t_end = traj, t_s, join.t_end, traj.t_end
        self.join = join

    @staticmethod
    def _join(traj: ChunkTrajectory, t_s: float, q, v, span: float) -> Piecewise:
        t_j = min(t_s + span, traj.t_end)
        target = traj.eval(t_j)
        return hermite(t_s, q, v, t_j, target[0], target[1])

    def eval(self, t: float) -> np.ndarray:
        return self.join.eval(t) if t < self.t_switch else self.traj.eval(t)

    def settle(self, t: float):
        return self


class Blend:
    """Min-jerk crossfade from plan ``old`` to plan ``new`` over ``[t_s, t_s + window]``.

    ``old`` must cover the window; after it the blend is ``new``.
    """

    def __init__(self, old, new, t_s: float, window: float):
        self.old, self.new, self.t_start, self.window = old, new, t_s, window
        self.t_end = new.t_end

    @property
    def depth(self) -> int:
        return 1 + max(self.old.depth, self.new.depth)

    def eval(self, t: float) -> np.ndarray:
        s = (t - self.t_start) / self.window
        if s >= 1.0:
            return self.new.eval(t)
        o, n = self.old.eval(t), self.new.eval(t)
        w, w1, w2 = min_jerk(s)
        w1, w2 = w1 / self.window, w2 / self.window**2
        # q = o + w d  =>  q' = o' + w d' + w' d,  q'' = o'' + w d'' + 2 w' d' + w'' d
        mix = np.array(((w, 0.0, 0.0), (w1, w, 0.0), (w2, 2.0 * w1, w)))
        return o + np.dot(mix, n - o)

    def settle(self, t: float):
        if t >= self.t_start + self.window:
            return self.new.settle(t)
        self.old = self.old.settle(t)
        return self


class Handover:
    """``old`` until ``t_switch``, then ``new`` (``rtc``): ``new`` is a :class:`Joined` that
    starts at ``t_switch`` from ``old``'s q and v there, so the handover is C1."""

    def __init__(self, old, new: Joined, t_switch: float):
        self.old, self.new, self.t_switch = old, new, t_switch
        self.t_start, self.t_end = old.t_start, new.t_end

    @property
    def depth(self) -> int:
        return 1 + max(self.old.depth, self.new.depth)

    def eval(self, t: float) -> np.ndarray:
        return self.old.eval(t) if t < self.t_switch else self.new.eval(t)

    def settle(self, t: float):
        if t >= self.t_switch:
            return self.new.settle(t)
        self.old = self.old.settle(t)
        return self


class Ensemble:
    """ACT temporal ensemble of member plans (module docstring); members oldest first.

    ``add`` packs every member's pieces (its join, then its chunk's spline) into one coefficient
    array, so ``eval`` evaluates all members with one gather and one batched product. Members
    that ended weigh 0 and are dropped at the next ``add``.
    """

    depth = 0

    def __init__(self, decay: float, ramp: float):
        self.decay, self.ramp = decay, ramp
        self.members: list[tuple[Joined, int]] = []  # (plan, arrival index), oldest first
        self.t_start = self.t_end = -math.inf

    def add(self, plan: Joined, index: int) -> Ensemble:
        """Add ``plan`` (arrival ``index``; ramped in from its ``t_start``), drop ended ones."""
        self.members = [m for m in self.members if m[0].t_end >= plan.t_start] + [(plan, index)]
        self.t_start = self.members[0][0].t_start
        self.t_end = max(p.t_end for p, _ in self.members)
        blocks, self._rows, offset = [], [], 0
        i0 = self.members[0][1]
        for p, i in self.members:
            spline = p.traj.piecewise
            blocks += [p.join._k, spline._k]
            self._rows.append((p.t_start, p.t_switch, spline.t_start, spline.h, spline._last,
                               offset, offset + 1, p.t_end, math.exp(-self.decay * (i - i0))))
            offset += 1 + spline._k.shape[0]
        self._coef = np.concatenate(blocks)  # (pieces, 4, 3D), see trajectory.Piecewise
        return self

    def weights(self, t: float) -> list[tuple[float, float, float]]:
        """Per member (rho, rho', rho'') at ``t``, un-normalized; 0 for members that ended."""
        return [self._weight(t, row[0], row[7], row[8]) for row in self._rows]

    def _weight(self, t, t_in, t_end, base):
        if t > t_end:
            return 0.0, 0.0, 0.0
        r = self.ramp
        if t - t_in >= r and t_end - t >= r:
            return base, 0.0, 0.0
        wi, wi1, wi2 = min_jerk((t - t_in) / r)
        wo, wo1, wo2 = min_jerk((t_end - t) / r)
        wi1, wi2, wo1, wo2 = wi1 / r, wi2 / (r * r), -wo1 / r, wo2 / (r * r)
        return (base * wi * wo, base * (wi1 * wo + wi * wo1),
                base * (wi2 * wo + 2.0 * wi1 * wo1 + wi * wo2))

    def eval(self, t: float) -> np.ndarray:
        if len(self._rows) == 1:  # one member: its normalized weight is 1
            return self.members[0][0].eval(t)
        pieces, powers, weights, r = [], [], [], self.ramp
        for t_in, t_switch, t_spline, h, last, o_join, o_spline, t_end, base in self._rows:
            if t > t_end:
                continue
            if t - t_in >= r and t_end - t >= r:
                weights.append((base, 0.0, 0.0))
            else:
                w = self._weight(t, t_in, t_end, base)
                if w[0] == 0.0 and w[1] == 0.0:
                    continue
                weights.append(w)
            if t < t_switch:
                k, s = o_join, t - t_in
            else:
                i = int((t - t_spline) / h)
                i = 0 if i < 0 else (last if i > last else i)
                k, s = o_spline + i, t - t_spline - i * h
            pieces.append(k)
            powers.extend((1.0, s, s * s, s * s * s))
        m = len(pieces)
        s0 = sum(w[0] for w in weights)
        if s0 <= WEIGHT_FLOOR:
            live = [p for p, _ in self.members if t <= p.t_end]
            return live[-1].eval(t)
        # x (K, 3, D): every member's q, v, a (one gather, one batched product)
        x = np.matmul(np.array(powers).reshape(m, 1, 4), self._coef.take(pieces, axis=0))
        # The normalized q = N / S and its derivatives (N = sum rho x, S = sum rho) are linear
        # in the rows of x: q = N/S, v = (N' - S' q)/S, a = (N'' - S'' q - 2 S' v)/S.
        s1, s2 = sum(w[1] for w in weights) / s0, sum(w[2] for w in weights) / s0
        rq, rv, ra = [], [], []
        for w, w1, w2 in weights:
            cq, w1, w2 = w / s0, w1 / s0, w2 / s0
            cv0 = w1 - s1 * cq
            rq.extend((cq, 0.0, 0.0))
            rv.extend((cv0, cq, 0.0))
            ra.extend((w2 - s2 * cq - 2.0 * s1 * cv0, 2.0 * (w1 - s1 * cq), cq))
        return np.dot(np.array((rq, rv, ra)), x.reshape(3 * m, -1))

    def settle(self, t: float):
        return self
