"""ActionChunk: a policy's future actions for one observation, in robot space (no rclpy).

Contract: action k is meant for time ``t_k = t0 + k * dt`` (seconds, the executor's clock;
``t0`` is the observation time). ``interpretation`` says what the values mean, one name for all
joints or one per joint (e.g. arm ``"delta"``, gripper ``"absolute"``):

- ``"absolute"``: joint positions (default);
- ``"delta"``: offsets from the joint state at observation time: ``p_k = state0 + a_k``;
- ``"velocity"``: joint velocities integrated from ``state0`` at ``t0`` with the rectangle
  (zero-order-hold) rule -- velocity ``a_k`` is held over ``[t_k, t_k + dt)``, as a velocity
  controller executes it: ``p_0 = state0``, ``p_k = state0 + dt * sum_{i<k} a_i``. The last
  action only moves the joint after ``t_end``, which the executor never executes.

``to_positions()`` turns any chunk into absolute positions ``(H, D)``; the executor only ever
samples absolute positions. A chunk is validated whole in ``__post_init__`` and raises
:class:`ChunkError` (a ``ValueError``) whose ``reason`` is the executor's rejection key:
``non_finite`` (NaN/Inf in actions, state0 or t0), ``dimension`` (shape), ``dt`` (outside
``[DT_MIN, DT_MAX]``: a dt of 1e-200 would make the spline's derivatives overflow),
``joint_names`` (duplicates), ``interpretation`` (unknown name, or state0 missing for delta /
velocity), ``horizon``. The arrays are copied and made read-only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

INTERPRETATIONS = ("absolute", "delta", "velocity")
DT_MIN, DT_MAX = 1e-4, 10.0  # s, accepted spacing of a chunk's actions (10 kHz .. 0.1 Hz)


class ChunkError(ValueError):
    """A chunk that cannot be executed; ``reason`` is the key counted in ``stats["rejected"]``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _frozen(a) -> np.ndarray:
    out = np.array(a, dtype=np.float64)  # a copy: the caller's array is never frozen
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class ActionChunk:
    """One chunk. ``actions`` (H, D) float64; ``interpretation`` a name or one name per joint."""

    t0: float
    dt: float
    joint_names: tuple[str, ...]
    actions: np.ndarray  # (H, D)
    interpretation: str | tuple[str, ...] = "absolute"
    state0: np.ndarray | None = None  # (D,) joint state at t0; needed for delta / velocity
    sequence: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        actions = _frozen(self.actions)
        object.__setattr__(self, "actions", actions)
        object.__setattr__(self, "joint_names", tuple(self.joint_names))
        if actions.ndim != 2 or actions.shape[0] < 1:
            raise ChunkError("dimension", f"actions must be (H>=1, D), got shape {actions.shape}")
        d = actions.shape[1]
        if d != len(self.joint_names):
            raise ChunkError("dimension",
                             f"actions dim {d} != len(joint_names) {len(self.joint_names)}")
        if len(set(self.joint_names)) != d:
            raise ChunkError("joint_names", f"duplicate joint names {self.joint_names}")
        if not np.all(np.isfinite(actions)):
            raise ChunkError("non_finite", "actions contain NaN/Inf")
        if not (np.isfinite(self.dt) and DT_MIN <= self.dt <= DT_MAX):
            raise ChunkError("dt", f"dt must be in [{DT_MIN:g}, {DT_MAX:g}] s, got {self.dt}")
        if not np.isfinite(self.t0):
            raise ChunkError("non_finite", f"t0 must be finite, got {self.t0}")
        interp = self.interpretation
        interp = (interp,) * d if isinstance(interp, str) else tuple(interp)
        object.__setattr__(self, "interpretation", interp)
        if len(interp) != d or any(i not in INTERPRETATIONS for i in interp):
            raise ChunkError("interpretation",
                             f"interpretation {interp} must be one of {INTERPRETATIONS} per joint")
        if self.state0 is not None:
            s0 = _frozen(np.reshape(self.state0, -1))
            if s0.shape != (d,):
                raise ChunkError("dimension", f"state0 must have shape ({d},), got {s0.shape}")
            if not np.all(np.isfinite(s0)):
                raise ChunkError("non_finite", "state0 contains NaN/Inf")
            object.__setattr__(self, "state0", s0)
        elif any(i != "absolute" for i in interp):
            raise ChunkError("interpretation", f"state0 required for interpretation {interp}")

    @property
    def horizon(self) -> int:
        return self.actions.shape[0]

    @property
    def times(self) -> np.ndarray:
        """(H,) absolute times of the actions."""
        return self.t0 + self.dt * np.arange(self.horizon)

    @property
    def t_end(self) -> float:
        return self.t0 + self.dt * (self.horizon - 1)

    def to_positions(self) -> np.ndarray:
        """(H, D) absolute joint positions, per-joint interpretation applied (module docstring)."""
        pos = self.actions.copy()
        kinds = np.asarray(self.interpretation)
        delta, vel = kinds == "delta", kinds == "velocity"
        if delta.any():
            pos[:, delta] += self.state0[delta]
        if vel.any():
            pos[0, vel] = 0.0
            pos[1:, vel] = self.dt * np.cumsum(self.actions[:-1, vel], axis=0)
            pos[:, vel] += self.state0[vel]
        return pos


def chunk_from_arrays(t0: float, dt: float, joint_names, actions, *, interpretation="absolute",
                      state0=None, sequence: int = 0, horizon: int | None = None,
                      action_dim: int | None = None) -> ActionChunk:
    """Build an ``ActionChunk`` from plain arrays; ``actions`` may be flat row-major (H*D,).

    Used by the ROS node (ActionChunk / JointTrajectory messages) and by offline replay.
    Raises :class:`ChunkError` (a ``ValueError``) naming the value on any inconsistency.
    """
    names = tuple(joint_names)
    acts = np.asarray(actions, dtype=np.float64)
    if acts.ndim == 1:
        d = action_dim if action_dim else len(names)
        if d <= 0 or acts.size % d:
            raise ChunkError("dimension",
                             f"{acts.size} action values do not fill rows of action_dim {d}")
        acts = acts.reshape(-1, d)
    if horizon is not None and acts.shape[0] != horizon:
        raise ChunkError("horizon", f"horizon {horizon} != number of action rows {acts.shape[0]}")
    return ActionChunk(float(t0), float(dt), names, acts, interpretation, state0, sequence)
