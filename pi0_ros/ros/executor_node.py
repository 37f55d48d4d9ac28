"""pi0_executor_node: streams policy action chunks to a robot at the control rate.

Data path::

    ActionChunk (pi0_ros_msgs) / JointTrajectory      [subscription callbacks, convert + submit]
      -> pi0_ros.control.StreamingExecutor.submit(chunk, now)   (rejected whole, with a reason)
    /joint_states -> set_state(q, now) once, the initial commanded state
    control thread (absolute-deadline sleep + spin-wait tail, ``control_rate`` Hz)
      -> executor.tick(now) -> JointState (position + velocity) command
         [+ Float64MultiArray for forward controllers] [+ short JointTrajectory segment]
    /diagnostics ~1 Hz: period error, seams, rejected chunks by reason, holds.

The control loop runs on a dedicated thread, not an rclpy timer: timers in rclpy's Python
executor cannot meet a p99 period error of 0.5 ms while inference threads hold the GIL now and
then (docs/PERFORMANCE.md). Lifecycle as in ros2/demos ``lifecycle_py/talker.py``: parameters
declared in ``__init__``, mapped onto ``ExecutorNodeConfig`` in ``config_from_node``; transitions
never let an exception escape (log, return FAILURE). Nothing non-finite is ever published.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from pi0_ros.control import (
    INTERPRETATIONS,
    ExecutorConfig,
    StreamingExecutor,
    chunk_from_arrays,
)

NODE_NAME = "pi0_executor_node"
SUCCESS = TransitionCallbackReturn.SUCCESS
FAILURE = TransitionCallbackReturn.FAILURE
SPIN_TAIL = 0.0003  # s before a deadline where the control thread stops sleeping and spins
SWITCH_INTERVAL = 0.0002  # s, Python GIL hand-over interval while the control thread runs
SEGMENT_POINTS = 5  # points of a JointTrajectory command segment
OUTPUTS = ("joint_state", "forward", "trajectory")

PARAMETERS = {  # name: (default, description); config/executor.yaml documents each one
    "joint_names": (["joint_0"], "controlled joints, order of every command"),
    "position_min": ([-3.14], "rad, per joint"),
    "position_max": ([3.14], "rad, per joint"),
    "velocity_max": ([1.0], "rad/s, per joint"),
    "acceleration_max": ([10.0], "rad/s^2, per joint"),
    "control_rate": (500.0, "Hz, 50..1000"),
    "strategy": ("replace", "replace | crossfade | temporal_ensemble"),
    "interpolation": ("cubic", "linear | cubic"),
    "interpretation": (["absolute"], "one for all joints or one per joint"),
    "crossfade_window": (0.1, "s"),
    "ensemble_decay": (0.01, "ACT-style exp(-k * index) weight"),
    "max_seam_jump": (0.5, "rad; a chunk whose seam jumps more is rejected"),
    "chunk_timeout": (0.5, "s without a fresh chunk before decelerating to hold"),
    "chunk_topic": ("/pi0_policy_node/action_chunk", "pi0_ros_msgs/ActionChunk input"),
    "trajectory_topic": ("~/trajectory_in", "trajectory_msgs/JointTrajectory input"),
    "joint_states_topic": ("/joint_states", "initial state"),
    "outputs": (["joint_state"], "any of joint_state, forward, trajectory"),
    "command_topic": ("~/joint_command", "sensor_msgs/JointState command"),
    "forward_topic": ("/forward_position_controller/commands", "Float64MultiArray"),
    "trajectory_out_topic": ("/joint_trajectory_controller/joint_trajectory", "segments"),
}


@dataclass(frozen=True)
class ExecutorNodeConfig:
    executor: ExecutorConfig
    control_rate: float
    interpretation: tuple[str, ...]
    chunk_topic: str
    trajectory_topic: str
    joint_states_topic: str
    outputs: tuple[str, ...]
    command_topic: str
    forward_topic: str
    trajectory_out_topic: str

    def __post_init__(self):
        if not 50.0 <= self.control_rate <= 1000.0:
            raise ValueError(f"control_rate {self.control_rate} not in [50, 1000] Hz")
        bad = [o for o in self.outputs if o not in OUTPUTS]
        if bad or not self.outputs:
            raise ValueError(f"outputs {self.outputs} must be a non-empty subset of {OUTPUTS}")
        bad = [i for i in self.interpretation if i not in INTERPRETATIONS]
        if bad or len(self.interpretation) != len(self.executor.joint_names):
            raise ValueError(f"interpretation {self.interpretation}: expected one of "
                             f"{INTERPRETATIONS} per joint")


def config_from_parameters(get) -> ExecutorNodeConfig:
    """The one place parameters become configuration: ``get(name)`` returns the value of a
    parameter of ``PARAMETERS`` (the node's, or a parameter file's in offline replay).
    Raises ``ValueError`` naming the parameter for a wrong count or value."""
    p = {name: get(name) for name in PARAMETERS}
    names = tuple(str(n) for n in p["joint_names"])
    d = len(names)
    if d == 0:
        raise ValueError("joint_names: expected at least one joint, got []")

    def per_joint(key):
        vals = tuple(float(v) for v in p[key])
        if len(vals) not in (1, d):
            raise ValueError(f"{key}: expected 1 or {d} values (one per joint), got {len(vals)}")
        return vals * d if len(vals) == 1 else vals

    interp = tuple(str(v) for v in p["interpretation"])
    if len(interp) not in (1, d):
        raise ValueError(f"interpretation: expected 1 or {d} values, got {len(interp)}")
    ex = ExecutorConfig(names, per_joint("position_min"), per_joint("position_max"),
                        per_joint("velocity_max"), per_joint("acceleration_max"),
                        strategy=str(p["strategy"]), interpolation=str(p["interpolation"]),
                        crossfade_window=float(p["crossfade_window"]),
                        ensemble_decay=float(p["ensemble_decay"]),
                        max_seam_jump=float(p["max_seam_jump"]),
                        chunk_timeout=float(p["chunk_timeout"]))
    return ExecutorNodeConfig(ex, float(p["control_rate"]), interp * d if len(interp) == 1
                              else interp, str(p["chunk_topic"]), str(p["trajectory_topic"]),
                              str(p["joint_states_topic"]), tuple(p["outputs"]),
                              str(p["command_topic"]), str(p["forward_topic"]),
                              str(p["trajectory_out_topic"]))


def config_from_node(node) -> ExecutorNodeConfig:
    return config_from_parameters(lambda name: node.get_parameter(name).value)


class ExecutorNode(LifecycleNode):
    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        for name, (default, doc) in PARAMETERS.items():
            self.declare_parameter(name, default, ParameterDescriptor(description=doc))
        self.config: ExecutorNodeConfig | None = None
        self.executor_core: StreamingExecutor | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pubs: dict = {}
        self._subs: list = []
        self._timer = None
        self._diag = None
        self._active = False
        self.period_errors: list[float] = []  # s, |actual - ideal| tick time, bounded
        self.missed_ticks = 0
        self.tick_errors = 0
        self.ticks_published = 0
        self._holding = True
        self.ticks = 0

    # -- lifecycle --------------------------------------------------------------------------
    def _guard(self, what, fn, state, parent):
        try:
            fn()
        except Exception as exc:  # a transition never lets an exception escape
            self.get_logger().error(f"{what} failed: {exc!r}")
            return FAILURE
        return parent(state)

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._guard("configure", self._configure, state, super().on_configure)

    def _configure(self):
        cfg = config_from_node(self)
        self.config = cfg
        self._pubs = {}
        if "joint_state" in cfg.outputs:
            self._pubs["joint_state"] = self.create_lifecycle_publisher(
                JointState, cfg.command_topic, 10)
        if "forward" in cfg.outputs:
            self._pubs["forward"] = self.create_lifecycle_publisher(
                Float64MultiArray, cfg.forward_topic, 10)
        if "trajectory" in cfg.outputs:
            self._pubs["trajectory"] = self.create_lifecycle_publisher(
                JointTrajectory, cfg.trajectory_out_topic, 10)
        if self._diag is None:
            self._diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # Subscriptions live from configure to cleanup and are gated by `_active` (as the
        # lifecycle publishers are): activate/deactivate destroy nothing, so a node spun by a
        # MultiThreadedExecutor cannot hit rclpy's destroy-while-waiting race (ros2/rclpy#1206).
        self._subs = [self.create_subscription(JointState, cfg.joint_states_topic,
                                               self._on_joint_state, 10),
                      self.create_subscription(JointTrajectory, cfg.trajectory_topic,
                                               self._on_trajectory, 10)]
        try:
            from pi0_ros_msgs.msg import ActionChunk
            self._subs.append(self.create_subscription(ActionChunk, cfg.chunk_topic,
                                                       self._on_chunk, 10))
        except ImportError as exc:
            self.get_logger().warning(f"pi0_ros_msgs unavailable, ActionChunk input off: {exc}")
        self._timer = self.create_timer(1.0, self._publish_diagnostics)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._guard("activate", self._activate, state, super().on_activate)

    def _activate(self):
        # The robot may have moved while inactive: the first /joint_states after activation
        # sets the commanded state again, and chunks wait for it.
        cfg = self.config
        self.executor_core = StreamingExecutor(cfg.executor, 1.0 / cfg.control_rate)
        self._active = True
        self.start_control_thread()

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._guard("deactivate", self._deactivate, state, super().on_deactivate)

    def _deactivate(self):
        self._active = False
        self.stop_control_thread()

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._guard("cleanup", self._cleanup, state, super().on_cleanup)

    def _cleanup(self):
        self._deactivate()
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        if self._timer is not None:
            self.destroy_timer(self._timer)
            self._timer = None
        for pub in self._pubs.values():
            self.destroy_lifecycle_publisher(pub)
        self._pubs, self.executor_core, self.config = {}, None, None

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._guard("shutdown", self._deactivate, state, super().on_shutdown)

    def stop(self) -> None:
        """Stop the control thread whatever the state (main() on exit, destroy_node)."""
        self._deactivate()

    def destroy_node(self) -> None:
        """Also stops the control thread: a destroyed node leaves no thread behind."""
        self.stop()
        super().destroy_node()

    # -- inputs ------------------------------------------------------------------------------
    def _now(self) -> float:
        return time.monotonic()

    def _ros_to_mono(self, stamp) -> float:
        """Map a ROS stamp onto the monotonic clock the control thread uses."""
        age = self.get_clock().now().nanoseconds * 1e-9 - (stamp.sec + stamp.nanosec * 1e-9)
        return self._now() - age

    def _on_joint_state(self, msg: JointState):
        core = self.executor_core
        if core is None or not self._active or core.initialized:
            return
        pos = dict(zip(msg.name, msg.position))
        try:
            q = [pos[n] for n in self.config.executor.joint_names]
            core.set_state(q, self._now())
        except (KeyError, ValueError) as exc:
            self.get_logger().warning(f"joint_states unusable: {exc!r}", throttle_duration_sec=2)

    def _submit(self, make):
        core = self.executor_core
        if core is None or not self._active:
            return
        now = self._now()
        if not core.initialized:
            self.get_logger().warning("no /joint_states yet; chunk ignored",
                                      throttle_duration_sec=2)
            return
        try:
            chunk = make()
        except ValueError as exc:  # ChunkError carries the reason (non_finite, dt, ...)
            core._reject(getattr(exc, "reason", "invalid"))
            self.get_logger().warning(f"chunk rejected: {exc}", throttle_duration_sec=2)
            return
        ok, reason = core.submit(chunk, now)
        if not ok:
            self.get_logger().warning(f"chunk rejected: {reason}", throttle_duration_sec=2)

    def _state0(self):
        return self.executor_core._q.copy()  # commanded state stands in for state at t0

    def _on_chunk(self, msg):
        cfg = self.config
        self._submit(lambda: chunk_from_arrays(
            self._ros_to_mono(msg.header.stamp), msg.dt, msg.joint_names,
            np.asarray(msg.actions, dtype=np.float64), interpretation=cfg.interpretation,
            state0=self._state0(), sequence=msg.sequence, horizon=msg.horizon,
            action_dim=msg.action_dim))

    def _on_trajectory(self, msg: JointTrajectory):
        def make():
            pts = msg.points
            if len(pts) < 1:
                raise ValueError("empty trajectory")
            tfs = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in pts]
            dt = tfs[1] - tfs[0] if len(tfs) > 1 else 1.0 / self.config.control_rate
            acts = np.array([p.positions for p in pts], dtype=np.float64)
            return chunk_from_arrays(self._ros_to_mono(msg.header.stamp) + tfs[0], dt,
                                     msg.joint_names, acts,
                                     interpretation=self.config.interpretation,
                                     state0=self._state0())
        self._submit(make)

    # -- control loop -------------------------------------------------------------------------
    def start_control_thread(self):
        self.stop_control_thread()
        self._stop.clear()
        # The default 5 ms GIL switch interval lets a busy Python thread (e.g. an inference
        # worker between torch ops) delay a tick by up to 5 ms; this is process-wide.
        sys.setswitchinterval(SWITCH_INTERVAL)
        # A full collection walks every live object (torch, rclpy, messages: ~10^5-10^6) with
        # the GIL held, stalling the control thread for milliseconds. Freezing what exists at
        # activation keeps those long-lived objects out of later collections (process-wide;
        # frozen objects are simply never collected, which is what they are anyway).
        gc.collect()
        gc.freeze()
        self._thread = threading.Thread(target=self._control_loop, name="pi0_control",
                                        daemon=True)
        self._thread.start()

    def stop_control_thread(self):
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._thread = None

    def _control_loop(self):
        period = 1.0 / self.config.control_rate
        deadline = self._now() + period
        while not self._stop.is_set():
            remaining = deadline - self._now()
            if remaining > SPIN_TAIL:
                time.sleep(remaining - SPIN_TAIL)
            while self._now() < deadline:  # spin-wait tail: sleep() wakes late by ~50-100 us
                pass
            now = self._now()
            err = now - deadline
            if err > period:  # woke too late for one or more ticks: count, don't replay
                missed = int(err // period)
                self.missed_ticks += missed
                deadline += missed * period
            self.period_errors.append(abs(err))
            if len(self.period_errors) > 200_000:
                del self.period_errors[:100_000]
            self.ticks += 1
            try:
                self._tick(now)
            except Exception as exc:  # the loop must outlive any one bad tick
                self.tick_errors += 1
                self.get_logger().error(f"control tick failed: {exc!r}",
                                        throttle_duration_sec=1.0)
            deadline += period

    def _tick(self, now: float):
        core = self.executor_core
        if core is None or not core.initialized:
            return
        cmd = core.tick(now)
        self._holding = cmd.holding
        if not (np.all(np.isfinite(cmd.position)) and np.all(np.isfinite(cmd.velocity))):
            self.get_logger().error("non-finite command suppressed", throttle_duration_sec=1)
            return
        try:
            for key, msg in command_messages(self.config, cmd,
                                             self.get_clock().now().nanoseconds).items():
                pub = self._pubs.get(key)
                if pub is not None:
                    pub.publish(msg)
            self.ticks_published += 1
        except Exception:
            if self.context.ok():
                raise
            self._stop.set()  # SIGINT / SIGTERM shut the context down: the loop ends quietly

    # -- diagnostics ---------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, str]:
        errs = np.asarray(self.period_errors[-5000:]) * 1e3
        core = self.executor_core
        stats = core.stats if core is not None else {"seams": 0, "holds": 0, "rejected": {}}
        vals = {"ticks": str(self.ticks), "missed_ticks": str(self.missed_ticks),
                "tick_errors": str(self.tick_errors),
                "period_error_p99_ms": f"{np.percentile(errs, 99):.4f}" if errs.size else "nan",
                "seams": str(stats["seams"]), "holds": str(stats["holds"])}
        for reason, n in stats["rejected"].items():
            vals[f"rejected_{reason}"] = str(n)
        return vals

    def status(self) -> tuple[bytes, str]:
        """(level, message) of the node's DiagnosticStatus."""
        core = self.executor_core
        if not self._active:
            return DiagnosticStatus.OK, "inactive"
        if core is None or not core.initialized:
            return DiagnosticStatus.ERROR, "no usable joint state yet: not commanding"
        if self.tick_errors:
            return DiagnosticStatus.ERROR, f"{self.tick_errors} control ticks failed"
        if self._holding:
            return DiagnosticStatus.WARN, "holding: no fresh chunk (watchdog)"
        return DiagnosticStatus.OK, "tracking"

    def _publish_diagnostics(self):
        if not self.context.ok():  # shutting down (SIGINT / SIGTERM)
            return
        vals = self.diagnostics()
        level, message = self.status()
        status = DiagnosticStatus(name=f"{self.get_name()}: executor", hardware_id="pi0_ros",
                                  level=level, message=message)
        status.values = [KeyValue(key=k, value=v) for k, v in vals.items()]
        arr = DiagnosticArray(status=[status])
        arr.header.stamp = self.get_clock().now().to_msg()
        self._diag.publish(arr)


def command_messages(cfg: ExecutorNodeConfig, cmd, stamp_ns: int) -> dict:
    """The messages of one control tick, keyed by output (``OUTPUTS``): JointState (position +
    velocity), Float64MultiArray (positions, for forward controllers) and a short
    JointTrajectory segment from the commanded state (for joint_trajectory_controller).
    Shared by the node and the offline replay, so both publish the same bytes."""
    names = list(cfg.executor.joint_names)
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    out = {}
    if "joint_state" in cfg.outputs:
        js = JointState(name=names, position=cmd.position.tolist(),
                        velocity=cmd.velocity.tolist())
        js.header.stamp.sec, js.header.stamp.nanosec = sec, nanosec
        out["joint_state"] = js
    if "forward" in cfg.outputs:
        out["forward"] = Float64MultiArray(data=cmd.position.tolist())
    if "trajectory" in cfg.outputs:
        traj = JointTrajectory(joint_names=names)
        traj.header.stamp.sec, traj.header.stamp.nanosec = sec, nanosec
        period = 1.0 / cfg.control_rate
        lo = np.asarray(cfg.executor.position_min)
        hi = np.asarray(cfg.executor.position_max)
        for k in range(1, SEGMENT_POINTS + 1):  # constant-velocity look-ahead, within limits
            t = k * period
            q = np.clip(cmd.position + cmd.velocity * t, lo, hi)
            pt = JointTrajectoryPoint(positions=q.tolist(), velocities=cmd.velocity.tolist())
            pt.time_from_start.nanosec = int(t * 1e9)
            traj.points.append(pt)
        out["trajectory"] = traj
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pi0_executor_node``:
    ``python -m pi0_ros.ros.executor_node [--autostart] --ros-args --params-file F``
    (``ros.runner``: --autostart, clean exit on SIGINT / SIGTERM from any state)."""
    from pi0_ros.ros.runner import run_lifecycle_node

    return run_lifecycle_node(ExecutorNode, NODE_NAME, "pi0 action chunk executor", argv)


if __name__ == "__main__":
    raise SystemExit(main())
