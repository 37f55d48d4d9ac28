"""ExecutorDriver: what the executor node and the offline replay do around the core (no rclpy).

One class, so the live ``pi0_executor_node`` and ``pi0-ros-replay`` drive the executor the same
way (times in seconds on the caller's clock: monotonic in the node, bag time in the replay)::

    drv = ExecutorDriver(executor_config, control_rate=500.0, interpretation=("absolute",) * D,
                         tracking_tolerance=(0.2,) * D, feedback_timeout=0.5)
    drv.measure(names, positions, t)   # every joint state: first one initializes (by name)
    ok, reason = drv.submit(t0, dt, names, actions, now)   # one chunk, rejected with a reason
    cmd = drv.tick(now)                # Command, or None while not initialized
    drv.position, drv.counters(), drv.diagnostics()        # public state, counters, summary

Contract:

- **Initialization**: the first usable measured joint state (every configured joint present by
  name, finite, within the position limits up to ``STATE_LIMIT_TOLERANCE``) becomes the
  commanded state. A state outside the limits is *refused* (``fault`` = ``"state_outside_limits"``,
  ERROR, no command at all) rather than clamped: clamping would make the first command a step.
  Chunks before initialization are counted (``chunks_before_joint_state``) and dropped.
- **Chunks**: ``submit`` maps names and the configured interpretation onto an
  :class:`~pi0_ros.control.chunk.ActionChunk` (``state0`` = the commanded position), so a
  chunk with the wrong joints is ``dimension`` / ``joint_names``, never ``interpretation``.
  Every outcome is counted: ``chunks_accepted`` or ``rejected.<reason>``.
- **Closed loop**: every measured state is compared with the latest command. A joint further
  from it than its ``tracking_tolerance`` (0 = not checked) is a tracking fault: the commanded
  state is re-seated at the measured position, at rest (as joint_trajectory_controller holds
  "the current state" when a path tolerance is violated), the reference dropped, and the fault
  reported (ERROR) until a chunk is accepted again. No measurement for ``feedback_timeout`` s
  (0 = not checked) drops the reference too (decelerate within the limits, hold) and rejects
  chunks as ``feedback_timeout`` until a joint state arrives.
- **Enable**: ``set_enabled(False)`` pauses without a lifecycle transition: the reference is
  dropped every tick (decelerate within the limits and hold, as the watchdog does; the hold
  command keeps coming), chunks are refused as ``disabled`` (counted ``chunks_while_disabled``)
  and the diagnostics say ``paused`` until ``set_enabled(True)``.
- **Counters** (``counters()``): ``chunks_accepted``, ``rejected.<reason>``, ``hold_ticks``,
  ``track_ticks``, ``seams``, ``holds``, ``tracking_faults``, ``feedback_timeouts``,
  ``activation_refused``, ``faults`` (non-finite guard), ``clock_jumps``; the same names in the
  node's /diagnostics and in the replay report.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pi0_ros.control.chunk import INTERPRETATIONS, ChunkError, chunk_from_arrays
from pi0_ros.control.executor import Command, ExecutorConfig, StreamingExecutor

OK, WARN, ERROR = 0, 1, 2  # diagnostic levels (diagnostic_msgs/DiagnosticStatus values)


@dataclass(frozen=True)
class Diagnostics:
    """``level`` (OK / WARN / ERROR), ``message`` and string ``values`` for /diagnostics."""

    level: int
    message: str
    values: dict = field(default_factory=dict)


class ExecutorDriver:
    """See module docstring. Thread-safe: the node calls ``measure`` / ``submit`` from
    subscription callbacks while its control thread calls ``tick``."""

    def __init__(self, config: ExecutorConfig, control_rate: float, interpretation=("absolute",),
                 *, tracking_tolerance=(0.0,), feedback_timeout: float = 0.0):
        if not (math.isfinite(control_rate) and control_rate > 0):
            raise ValueError(f"control_rate must be > 0 Hz, got {control_rate}")
        d = len(config.joint_names)
        self.config = config
        self.names = tuple(config.joint_names)
        self.period = 1.0 / control_rate
        self.interpretation = _per_joint("interpretation", tuple(interpretation), d, str)
        bad = [i for i in self.interpretation if i not in INTERPRETATIONS]
        if bad:
            raise ValueError(f"interpretation: expected {INTERPRETATIONS}, got {bad}")
        self.tolerance = np.asarray(_per_joint("tracking_tolerance", tuple(tracking_tolerance),
                                               d, float))
        if not (np.all(np.isfinite(self.tolerance)) and np.all(self.tolerance >= 0)):
            raise ValueError(f"tracking_tolerance must be >= 0 rad, got {self.tolerance}")
        if not (math.isfinite(feedback_timeout) and feedback_timeout >= 0):
            raise ValueError(f"feedback_timeout must be >= 0 s, got {feedback_timeout}")
        self.feedback_timeout = float(feedback_timeout)
        self.core = StreamingExecutor(config, self.period)
        self._lock = threading.RLock()
        self._events: Counter = Counter()
        self._index: dict[tuple, list[int] | None] = {}
        self._last_measure: float | None = None
        self._measured: np.ndarray | None = None
        self._last_cmd: Command | None = None
        self._tracking_error = np.zeros(d)
        self.fault: str | None = None  # None, state_outside_limits, tracking_error, feedback_...
        self.fault_detail = ""
        self.last_rejection = ""
        self.enabled = True

    @classmethod
    def from_node_config(cls, cfg) -> ExecutorDriver:
        """From an ``ExecutorNodeConfig`` (``pi0_ros.ros.executor_params``)."""
        drv = cls(cfg.executor, cfg.control_rate, cfg.interpretation,
                  tracking_tolerance=cfg.tracking_tolerance,
                  feedback_timeout=cfg.feedback_timeout)
        drv.set_enabled(getattr(cfg, "enabled", True))
        return drv

    # -- state -------------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return self.core.initialized

    @property
    def position(self) -> np.ndarray:
        """A copy of the commanded position."""
        return self.core.position

    @property
    def measured(self) -> np.ndarray | None:
        """The latest measured position of the configured joints (a copy), or None."""
        with self._lock:
            return None if self._measured is None else self._measured.copy()

    def counters(self) -> dict[str, int]:
        """Every event count (module docstring), core counters included."""
        stats = self.core.counters()
        with self._lock:
            out = dict(self._events)
        out.update(seams=stats["seams"], holds=stats["holds"], faults=stats["faults"],
                   clock_jumps=stats["clock_jumps"],
                   rtc_delay_mismatch=stats["rtc_delay_mismatch"])
        for reason, n in stats["rejected"].items():
            out[f"rejected.{reason}"] = n
        return out

    def _map(self, names) -> list[int] | None:
        key = tuple(names)
        if key not in self._index:
            where = {n: i for i, n in enumerate(key)}
            idx = [where.get(n) for n in self.names]
            self._index[key] = None if any(i is None for i in idx) else idx
        return self._index[key]

    def set_enabled(self, enabled: bool) -> None:
        """Pause (False: drop the reference, hold, refuse chunks) or resume (True)."""
        with self._lock:
            if self.enabled and not enabled:
                self._events["pauses"] += 1
            self.enabled = bool(enabled)
            if not self.enabled:
                self.core.hold()

    # -- inputs ------------------------------------------------------------------------------
    def measure(self, names, positions, t: float) -> tuple[bool, str]:
        """One measured joint state (``names`` may hold more joints, any order) at ``t``.
        Initializes the commanded state on the first usable one; afterwards checks the
        tracking tolerance. Returns ``(usable, reason)``."""
        idx = self._map(names)
        if idx is None:
            missing = sorted(set(self.names) - set(names))
            return self._unusable("joint_state_names", f"joint state lacks {missing}")
        pos = np.asarray(positions, dtype=np.float64).reshape(-1)
        if pos.size != len(names):
            return self._unusable("joint_state_size",
                                  f"{pos.size} positions for {len(names)} names")
        q = pos[idx]
        if not (np.all(np.isfinite(q)) and math.isfinite(t)):
            return self._unusable("joint_state_non_finite", f"positions {q.tolist()} at {t!r}")
        with self._lock:
            self._measured, self._last_measure = q, t
            if self.fault == "feedback_timeout":
                self.fault, self.fault_detail = None, ""
            if not self.core.initialized:
                try:
                    self.core.set_state(q, t)
                except ValueError as exc:
                    if self.fault != "state_outside_limits":
                        self._events["activation_refused"] += 1
                    self.fault, self.fault_detail = "state_outside_limits", str(exc)
                    return False, "state_outside_limits"
                self.fault, self.fault_detail = None, ""
                self._last_cmd = None
                return True, "initialized"
            self._check_tracking(q, t)
            return True, "ok"

    def _unusable(self, reason: str, detail: str) -> tuple[bool, str]:
        with self._lock:
            self._events[f"joint_state.{reason}"] += 1
        return False, f"{reason}: {detail}"

    def _check_tracking(self, q: np.ndarray, t: float) -> None:
        cmd = self._last_cmd
        if cmd is None:
            return
        err = np.abs(q - cmd.position)
        self._tracking_error = np.maximum(self._tracking_error, err)
        over = (self.tolerance > 0) & (err > self.tolerance)
        if not over.any():
            return
        self._events["tracking_faults"] += 1
        self.fault = "tracking_error"
        self.fault_detail = ", ".join(
            f"{self.names[i]} |{q[i]:.4f} - {cmd.position[i]:.4f}| > {self.tolerance[i]:g} rad"
            for i in np.flatnonzero(over))
        try:  # hold where the arm is (joint_trajectory_controller's hold on a path violation)
            self.core.set_state(q, t)
        except ValueError:  # measured beyond a limit: hold the command where it is
            self.core.hold()
        self._last_cmd = None

    def submit(self, t0: float, dt: float, names, actions, now: float, *, sequence: int = 0,
               horizon: int | None = None, action_dim: int | None = None,
               rtc_delay: int = 0) -> tuple[bool, str]:
        """Validate, convert and submit one chunk (action k for ``t0 + k dt``) arriving at
        ``now``; ``(accepted, reason)``, counted either way. ``rtc_delay``: the ActionChunk's
        d (strategy ``rtc`` starts the chunk at action d; a mismatch is counted)."""
        with self._lock:
            if not self.enabled:
                self._events["chunks_while_disabled"] += 1
                return False, "disabled"
            if not self.core.initialized:
                self._events["chunks_before_joint_state"] += 1
                return False, "no_joint_state"
            if self._feedback_stale(now):
                return self._reject("feedback_timeout", "no joint state for "
                                    f"{now - self._last_measure:.3f} s")
        names = tuple(names)
        if names != self.names:
            reason = "dimension" if len(names) != len(self.names) else "joint_names"
            return self._reject(reason, f"chunk joints {list(names)}, expected "
                                        f"{list(self.names)}")
        try:
            chunk = chunk_from_arrays(t0, dt, names, actions, interpretation=self.interpretation,
                                      state0=self.core.position, sequence=sequence,
                                      horizon=horizon, action_dim=action_dim)
        except ChunkError as exc:
            return self._reject(exc.reason, str(exc))
        ok, reason = self.core.submit(chunk, now, rtc_delay=rtc_delay)
        with self._lock:
            if ok:
                self._events["chunks_accepted"] += 1
                if self.fault == "tracking_error":
                    self.fault, self.fault_detail = None, ""
            else:
                self.last_rejection = reason
        return ok, reason

    def _reject(self, reason: str, detail: str) -> tuple[bool, str]:
        self.core.reject(reason, detail)
        with self._lock:
            self.last_rejection = f"{reason}: {detail}"
        return False, reason

    def _feedback_stale(self, now: float) -> bool:
        return (self.feedback_timeout > 0 and self._last_measure is not None
                and now - self._last_measure > self.feedback_timeout)

    # -- control -----------------------------------------------------------------------------
    def tick(self, now: float) -> Command | None:
        """The command for ``now`` (None while not initialized); counts hold / track ticks."""
        with self._lock:
            if not self.core.initialized:
                return None
            if self._feedback_stale(now) and self.fault != "feedback_timeout":
                self._events["feedback_timeouts"] += 1
                self.fault = "feedback_timeout"
                self.fault_detail = f"no joint state since t={self._last_measure:.3f}"
                self.core.hold()
            if not self.enabled:  # also drops a chunk that raced set_enabled(False)
                self.core.hold()
            cmd = self.core.tick(now)
            self._events["hold_ticks" if cmd.holding else "track_ticks"] += 1
            self._last_cmd = cmd
            return cmd

    # -- diagnostics -------------------------------------------------------------------------
    def diagnostics(self, now: float | None = None) -> Diagnostics:
        """Level, message and values (every counter, the largest tracking error per joint since
        the last call, the feedback age at ``now``)."""
        with self._lock:
            values = {k: str(v) for k, v in sorted(self.counters().items())}
            for name, e in zip(self.names, self._tracking_error.tolist()):
                values[f"tracking_error_max.{name}"] = f"{e:.6f}"
            self._tracking_error = np.zeros_like(self._tracking_error)
            if now is not None and self._last_measure is not None:
                values["feedback_age_s"] = f"{now - self._last_measure:.4f}"
            if self.last_rejection:
                values["last_rejection"] = self.last_rejection
            fault, detail = self.fault, self.fault_detail
            holding = self._last_cmd is None or self._last_cmd.holding
            values["enabled"] = str(self.enabled).lower()
            enabled = self.enabled
        if fault == "state_outside_limits":
            return Diagnostics(ERROR, f"activation refused: {detail}", values)
        if not self.core.initialized:
            return Diagnostics(ERROR, "no usable joint state yet: not commanding", values)
        if fault == "tracking_error":
            return Diagnostics(ERROR, f"tracking error, holding: {detail}", values)
        if fault == "feedback_timeout":
            return Diagnostics(ERROR, f"feedback timeout, holding: {detail}", values)
        if values.get("faults", "0") != "0":
            return Diagnostics(ERROR, f"{values['faults']} non-finite commands suppressed",
                               values)
        if not enabled:
            return Diagnostics(OK, "paused: enabled is false, holding", values)
        if holding:
            return Diagnostics(WARN, "holding: no fresh chunk (watchdog)", values)
        return Diagnostics(OK, "tracking", values)


def _per_joint(name: str, vals: tuple, d: int, kind) -> tuple:
    if len(vals) not in (1, d):
        raise ValueError(f"{name}: expected 1 or {d} values (one per joint), got {len(vals)}")
    vals = tuple(kind(v) for v in vals)
    return vals * d if len(vals) == 1 else vals
