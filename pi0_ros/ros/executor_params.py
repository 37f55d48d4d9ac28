"""pi0_executor_node's parameters, their one mapping onto ``ExecutorNodeConfig``, and the command
messages of one tick. Importable without rclpy: message packages are imported inside
:func:`command_messages` only, so the offline replay reads the same table and builds the same
messages as the live node (docs/EXECUTOR.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pi0_ros import paramcheck
from pi0_ros.control import INTERPRETATIONS, ExecutorConfig
from pi0_ros.paramcheck import ROS_PARAMETERS  # noqa: F401  (re-exported for the node)

OUTPUTS = ("joint_state", "forward", "trajectory")

PARAMETERS = {  # name: (default, description); config/executor.yaml documents each one
    "joint_names": (["joint_0"], "controlled joints, order of every command"),
    "position_min": ([-3.14], "rad, per joint"),
    "position_max": ([3.14], "rad, per joint"),
    "velocity_max": ([1.0], "rad/s, per joint"),
    "acceleration_max": ([10.0], "rad/s^2, per joint"),
    "jerk_max": ([500.0], "rad/s^3, per joint; [0.0] = no jerk limit (exact limiter)"),
    "tracker": ("auto", "auto (ruckig if importable) | ruckig | exact"),
    "control_rate": (500.0, "Hz, 50..1000"),
    "strategy": ("replace", "replace | crossfade | temporal_ensemble | rtc (paired with the "
                            "policy's rtc.enabled: each chunk starts at its rtc_delay action)"),
    "interpolation": ("cubic", "linear | cubic"),
    "interpretation": (["absolute"], "one for all joints or one per joint"),
    "crossfade_window": (0.1, "s"),
    "ensemble_decay": (0.01, "ACT-style exp(-k * index) weight"),
    "max_seam_jump": (0.5, "rad; a chunk whose seam jumps more is rejected"),
    "chunk_timeout": (0.5, "s without a fresh chunk before decelerating to hold"),
    "max_future_stamp": (0.5, "s; a chunk stamped further ahead of now is rejected"),
    "tracking_tolerance": ([0.0], "rad per joint, |measured - command| that holds; 0 = off"),
    "feedback_timeout": (0.5, "s without /joint_states before holding; 0 = off"),
    "chunk_topic": ("pi0_policy_node/action_chunk", "pi0_ros_msgs/ActionChunk input (relative: "
                    "the policy node of the same namespace)"),
    "trajectory_topic": ("~/trajectory_in", "trajectory_msgs/JointTrajectory input"),
    "joint_states_topic": ("joint_states", "measured state (initial state, closed loop)"),
    "outputs": (["joint_state"], "any of joint_state, forward, trajectory"),
    "command_topic": ("~/joint_command", "sensor_msgs/JointState command"),
    "forward_topic": ("forward_position_controller/commands", "Float64MultiArray"),
    "trajectory_out_topic": ("joint_trajectory_controller/joint_trajectory", "segments"),
    "realtime_priority": (0, "SCHED_FIFO priority 1..99 of the control thread; 0 = don't ask"),
    "cpu_affinity": ([-1], "CPUs of the control thread; [-1] = don't set"),
    "gc_freeze": (True, "gc.freeze() at activation: long-lived objects out of collections"),
    "trajectory_horizon": (0.05, "s of constant-velocity points in each JointTrajectory"),
    "trajectory_end_at_rest": (True, "end each JointTrajectory with a stop (v = 0) point, as "
                               "joint_trajectory_controller requires unless "
                               "allow_nonzero_velocity_at_trajectory_end"),
    "enabled": (True, "false = paused: decelerate and hold, refuse chunks (live: `ros2 param "
                "set`, or the ~/enable std_srvs/SetBool service)"),
}
# Parameters a running node accepts (`ros2 param set`); every other one is read at configure.
LIVE_PARAMETERS = ("enabled",)


def undeclared(names) -> list[str]:
    """The names (sorted) that are neither in ``PARAMETERS`` nor rclpy's own parameters."""
    return paramcheck.undeclared(names, PARAMETERS)


def unknown_parameters_message(unknown) -> str:
    """``undeclared parameter(s): 'velocity_limits' (did you mean 'velocity_max'?)``."""
    return paramcheck.unknown_parameters_message(unknown, PARAMETERS)


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
    tracking_tolerance: tuple[float, ...] = (0.0,)
    feedback_timeout: float = 0.5
    trajectory_horizon: float = 0.05
    trajectory_end_at_rest: bool = True
    realtime_priority: int = 0
    cpu_affinity: tuple[int, ...] = ()
    gc_freeze: bool = True
    enabled: bool = True

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
        tol = self.tracking_tolerance
        if len(tol) != len(self.executor.joint_names) or not all(
                np.isfinite(x) and x >= 0 for x in tol):
            raise ValueError(f"tracking_tolerance {tol}: expected one value >= 0 per joint")
        if not 0 <= self.realtime_priority <= 99:
            raise ValueError(f"realtime_priority {self.realtime_priority}: expected 0..99")
        if any(c < 0 for c in self.cpu_affinity):
            raise ValueError(f"cpu_affinity {self.cpu_affinity}: expected CPU numbers >= 0")
        if not (np.isfinite(self.trajectory_horizon) and 0 < self.trajectory_horizon <= 10):
            raise ValueError(f"trajectory_horizon {self.trajectory_horizon}: expected (0, 10] s")
        if not (np.isfinite(self.feedback_timeout) and self.feedback_timeout >= 0):
            raise ValueError(f"feedback_timeout {self.feedback_timeout}: expected >= 0 s")


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
    jerk = per_joint("jerk_max")
    jerk = () if all(j == 0.0 for j in jerk) else jerk
    ex = ExecutorConfig(names, per_joint("position_min"), per_joint("position_max"),
                        per_joint("velocity_max"), per_joint("acceleration_max"),
                        strategy=str(p["strategy"]), interpolation=str(p["interpolation"]),
                        crossfade_window=float(p["crossfade_window"]),
                        ensemble_decay=float(p["ensemble_decay"]),
                        max_seam_jump=float(p["max_seam_jump"]),
                        chunk_timeout=float(p["chunk_timeout"]),
                        max_future_stamp=float(p["max_future_stamp"]),
                        jerk_max=jerk, tracker=str(p["tracker"]))
    return ExecutorNodeConfig(ex, float(p["control_rate"]), interp * d if len(interp) == 1
                              else interp, str(p["chunk_topic"]), str(p["trajectory_topic"]),
                              str(p["joint_states_topic"]), tuple(p["outputs"]),
                              str(p["command_topic"]), str(p["forward_topic"]),
                              str(p["trajectory_out_topic"]),
                              tracking_tolerance=per_joint("tracking_tolerance"),
                              feedback_timeout=float(p["feedback_timeout"]),
                              trajectory_horizon=float(p["trajectory_horizon"]),
                              trajectory_end_at_rest=bool(p["trajectory_end_at_rest"]),
                              realtime_priority=int(p["realtime_priority"]),
                              cpu_affinity=tuple(int(c) for c in p["cpu_affinity"]
                                                 if int(c) != -1),
                              gc_freeze=bool(p["gc_freeze"]), enabled=bool(p["enabled"]))


SEGMENT_POINTS = 5  # constant-velocity points of a JointTrajectory command, over the horizon


def trajectory_points(cfg: ExecutorNodeConfig, position, velocity):
    """``[(time_from_start, positions, velocities)]`` of one tick's JointTrajectory: the
    commanded state extrapolated at constant velocity over ``trajectory_horizon`` in
    ``SEGMENT_POINTS`` points (clipped to the position limits), then -- with
    ``trajectory_end_at_rest`` -- a stop point: every joint decelerates linearly to v = 0 within
    its acceleration limit over a common time T >= max |v| / amax (one spacing at least), at
    ``q + v T / 2``. joint_trajectory_controller replaces the trajectory with every message; if
    messages stop, the arm comes to rest instead of running on, and JTC's check that the last
    point has zero velocity passes without ``allow_nonzero_velocity_at_trajectory_end``."""
    lo = np.asarray(cfg.executor.position_min)
    hi = np.asarray(cfg.executor.position_max)
    amax = np.asarray(cfg.executor.acceleration_max)
    q, v = np.asarray(position, dtype=np.float64), np.asarray(velocity, dtype=np.float64)
    spacing = cfg.trajectory_horizon / SEGMENT_POINTS
    out = []
    for k in range(1, SEGMENT_POINTS + 1):
        t = k * spacing
        out.append((t, np.clip(q + v * t, lo, hi), v))
    if cfg.trajectory_end_at_rest:
        t_end = SEGMENT_POINTS * spacing
        stop = max(float(np.max(np.abs(v) / amax)), spacing)
        out.append((t_end + stop, np.clip(q + v * t_end + v * stop / 2.0, lo, hi),
                    np.zeros_like(v)))
    return out


def command_messages(cfg: ExecutorNodeConfig, cmd, stamp_ns: int) -> dict:
    """The messages of one control tick, keyed by output (``OUTPUTS``), stamped ``stamp_ns``
    (the tick's time): JointState (position + velocity), Float64MultiArray (positions in
    ``joint_names`` order, for forward_command_controller) and a JointTrajectory
    (:func:`trajectory_points`, for joint_trajectory_controller). Shared by the node and the
    offline replay, so both publish the same bytes."""
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

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
        for t, q, v in trajectory_points(cfg, cmd.position, cmd.velocity):
            pt = JointTrajectoryPoint(positions=q.tolist(), velocities=v.tolist())
            pt.time_from_start.sec, pt.time_from_start.nanosec = divmod(
                int(round(t * 1e9)), 1_000_000_000)
            traj.points.append(pt)
        out["trajectory"] = traj
    return out
