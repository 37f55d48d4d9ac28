"""Time-parametrized joint trajectories: a chunk's spline, C1 joins, min-jerk weights (no rclpy).

:class:`ChunkTrajectory` is a chunk's future actions as a function of time::

    traj = ChunkTrajectory(chunk, start=now, interpolation="cubic")
    q, v, a = traj.sample(t)   # (D,) position, velocity, acceleration; t_start <= t <= t_end

Contract:

- knots are the actions with ``t_k >= start`` (within ``TIME_EPS``); earlier actions are dropped
  before fitting, so they influence nothing (latency compensation: past actions never replay);
- ``"cubic"``: the natural cubic spline through the knots (second derivative zero at both ends),
  C2 inside the chunk; ``"linear"``: straight segments, C0 (velocity steps at knots);
- defined on ``[t_start, t_end]`` (first kept action to the last action) and never extrapolated:
  ``sample`` raises ``ValueError`` outside;
- the coefficients are solved once, at construction; evaluating is one
  ``[1, s, s^2, s^3] @ (4, 3D)`` product (q, v and a at once, see :class:`Piecewise`).

Every piece is a cubic in power basis, so joins (:func:`hermite`) and chunk splines evaluate the
same way (:class:`Piecewise`).
"""

from __future__ import annotations

import functools

import numpy as np

from pi0_ros.control.chunk import ActionChunk, ChunkError

TIME_EPS = 1e-9  # s: an action stamped at most this long before `start` still counts as future
INTERPOLATIONS = ("linear", "cubic")


class Piecewise:
    """Cubic pieces of equal length ``h`` from ``t_start``; piece i is
    ``c[i, 0] + c[i, 1] s + c[i, 2] s^2 + c[i, 3] s^3`` with ``s = t - t_start - i h``.

    ``eval(t)`` -> (3, D) rows q, v, a. No range check (callers own the domain); a ``t`` outside
    ``[t_start, t_end]`` would extend the first / last piece. Stored as ``k`` (n, 4, 3D): per
    power of s, the coefficients of q, q' and q'' side by side, so one ``[1, s, s^2, s^3] @ k[i]``
    gives all three.
    """

    __slots__ = ("t_start", "t_end", "h", "_c", "_k", "_last", "_d")

    def __init__(self, t_start: float, h: float, coeffs: np.ndarray, t_end: float | None = None):
        self.t_start, self.h = float(t_start), float(h)
        n, _, d = coeffs.shape
        self._c, self._last, self._d = coeffs, n - 1, d  # (n, 4, D) power basis
        self.t_end = self.t_start + h * n if t_end is None else float(t_end)
        c0, c1, c2, c3 = coeffs.transpose(1, 0, 2)
        z = np.zeros_like(c0)
        k = np.stack([np.stack(row, axis=1) for row in
                      ((c0, c1, 2 * c2), (c1, 2 * c2, 6 * c3), (c2, 3 * c3, z), (c3, z, z))],
                     axis=1)  # (n, 4 powers, 3 rows, D)
        self._k = k.reshape(n, 4, 3 * d)

    def eval(self, t: float) -> np.ndarray:
        i = int((t - self.t_start) / self.h)
        i = 0 if i < 0 else (self._last if i > self._last else i)
        s = t - self.t_start - i * self.h
        s2 = s * s
        return np.dot(np.array((1.0, s, s2, s2 * s)), self._k[i]).reshape(3, self._d)


@functools.lru_cache(maxsize=128)
def _natural_inverse(n: int) -> np.ndarray:
    """Inverse of tridiag(1, 4, 1) of size n: the natural spline system on uniform knots."""
    a = 4.0 * np.eye(n) + np.eye(n, k=1) + np.eye(n, k=-1)
    inv = np.linalg.inv(a)
    inv.setflags(write=False)
    return inv


def spline_coefficients(pos: np.ndarray, h: float, cubic: bool) -> np.ndarray:
    """(max(n-1, 1), 4, D) power-basis coefficients through ``pos`` (n, D) at spacing ``h``.

    Natural cubic: second derivatives m solve ``m[i-1] + 4 m[i] + m[i+1] =
    6 (p[i+1] - 2 p[i] + p[i-1]) / h^2`` with ``m[0] = m[-1] = 0``. One knot: a constant.
    """
    n, d = pos.shape
    if n == 1:
        c = np.zeros((1, 4, d))
        c[0, 0] = pos[0]
        return c
    slope = np.diff(pos, axis=0) / h  # (n-1, D)
    m = np.zeros((n, d))
    if cubic and n >= 3:
        m[1:-1] = _natural_inverse(n - 2) @ (6.0 / h * np.diff(slope, axis=0))
    c = np.empty((n - 1, 4, d))
    c[:, 0] = pos[:-1]
    c[:, 1] = slope - h * (2.0 * m[:-1] + m[1:]) / 6.0
    c[:, 2] = m[:-1] / 2.0
    c[:, 3] = (m[1:] - m[:-1]) / (6.0 * h)
    return c


class ChunkTrajectory:
    """A chunk's future actions as positions over time (module docstring for the contract).

    Attributes: ``t_start`` (time of the first kept action), ``t_end`` (last action), ``first``
    (index of the first kept action), ``knots`` (kept times), ``positions`` (kept absolute
    positions, (n, D)). Raises :class:`ChunkError` ``"all_past"`` when no action is at or after
    ``start``.
    """

    def __init__(self, chunk: ActionChunk, start: float = -np.inf, interpolation: str = "cubic"):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {interpolation!r} not in {INTERPOLATIONS}")
        times = chunk.times
        keep = times >= start - TIME_EPS
        if not keep.any():
            raise ChunkError("all_past", f"every action is before t={start:.6f} "
                                         f"(last at {chunk.t_end:.6f})")
        self.first = int(np.argmax(keep))
        self.knots = times[self.first:]
        self.positions = chunk.to_positions()[self.first:]
        self.t_start, self.t_end = float(self.knots[0]), float(self.knots[-1])
        self.interpolation = interpolation
        coeffs = spline_coefficients(self.positions, chunk.dt, interpolation == "cubic")
        self.piecewise = Piecewise(self.t_start, chunk.dt, coeffs, self.t_end)

    def eval(self, t: float) -> np.ndarray:
        """(3, D) rows q, v, a at ``t``; unchecked (see ``sample``)."""
        return self.piecewise.eval(t)

    def sample(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(q, v, a), each (D,), at ``t`` in ``[t_start, t_end]``; ``ValueError`` outside."""
        if not self.t_start - TIME_EPS <= t <= self.t_end + TIME_EPS:
            raise ValueError(f"t={t:.6f} outside the chunk [{self.t_start:.6f}, "
                             f"{self.t_end:.6f}]: a chunk is never extrapolated")
        q, v, a = self.piecewise.eval(min(max(t, self.t_start), self.t_end))
        return q, v, a


def hermite(t0: float, q0, v0, t1: float, q1, v1) -> Piecewise:
    """The cubic from state (q0, v0) at t0 to (q1, v1) at t1 (C1 at both ends), ``t1 > t0``."""
    span = t1 - t0
    d = (np.asarray(q1) - q0) / span
    c = np.stack([q0, v0, (3.0 * d - 2.0 * v0 - v1) / span, (v0 + v1 - 2.0 * d) / span**2])
    return Piecewise(t0, span, c[None])


def min_jerk(s: float) -> tuple[float, float, float]:
    """Min-jerk weight w = 10s^3 - 15s^4 + 6s^5 on s clipped to [0, 1], with dw/ds, d2w/ds2.

    w(0) = 0, w(1) = 1 and both derivatives vanish at both ends, so a blend or a weight ramp
    built on it is C2 where it starts and where it ends.
    """
    if s <= 0.0:
        return 0.0, 0.0, 0.0
    if s >= 1.0:
        return 1.0, 0.0, 0.0
    r = 1.0 - s
    return s**3 * (10.0 - 15.0 * s + 6.0 * s * s), 30.0 * s * s * r * r, 60.0 * s * r * (1 - 2 * s)
