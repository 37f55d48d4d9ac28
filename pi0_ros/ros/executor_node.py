"""pi0_executor_node: streams policy action chunks to a robot at the control rate.

Data path::

    ActionChunk (pi0_ros_msgs) / JointTrajectory      [subscription callbacks]
      -> pi0_ros.control.ExecutorDriver.submit(...)   (converted, rejected whole with a reason)
    /joint_states -> ExecutorDriver.measure(...) every message: the first usable one
                     initializes the commanded state, later ones check the tracking tolerance
    control thread (absolute-deadline sleep + spin-wait tail, ``control_rate`` Hz)
      -> driver.tick(now) -> JointState (position + velocity) command, stamped with the tick
         [+ Float64MultiArray for forward controllers] [+ JointTrajectory for JTC]
    /diagnostics ~1 Hz: the driver's summary (the replay's too) + the loop's timing.

The parameter table, its mapping onto ``ExecutorNodeConfig`` and the message builder live in
``ros/executor_params.py`` (no rclpy at import), shared with the offline replay.

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

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.clock import Clock, ClockType
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray
from trajectory_msgs.msg import JointTrajectory

from pi0_ros.control import ExecutorDriver
from pi0_ros.control.loop import DeadlineLoop, request_realtime
from pi0_ros.paramcheck import live_change_refusal
from pi0_ros.ros.executor_params import (  # noqa: F401  (re-exported: the node's public table)
    LIVE_PARAMETERS,
    OUTPUTS,
    PARAMETERS,
    ROS_PARAMETERS,
    ExecutorNodeConfig,
    command_messages,
    config_from_parameters,
    undeclared,
    unknown_parameters_message,
)

try:  # ros-std-srvs (bootstrap's ROS list); without it `enabled` is the parameter alone
    from std_srvs.srv import SetBool
except ImportError:  # pragma: no cover - depends on the install
    SetBool = None

NODE_NAME = "pi0_executor_node"
SUCCESS = TransitionCallbackReturn.SUCCESS
FAILURE = TransitionCallbackReturn.FAILURE
SWITCH_INTERVAL = 0.0002  # s, Python GIL hand-over interval while the control thread runs


def config_from_node(node) -> ExecutorNodeConfig:
    return config_from_parameters(lambda name: node.get_parameter(name).value)


class ExecutorNode(LifecycleNode):
    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        for name, (default, doc) in PARAMETERS.items():
            self.declare_parameter(name, default, ParameterDescriptor(description=doc))
        self.config: ExecutorNodeConfig | None = None
        self.driver: ExecutorDriver | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._frozen = False  # gc.freeze() done by the control loop's start
        self._pubs: dict = {}
        self._subs: list = []
        self._timer = None
        self._diag = None
        self._active = False
        self.loop: DeadlineLoop | None = None  # timing: ticks, missed ticks, period errors
        self.realtime = "not started"
        self.ticks_published = 0
        self._holding = True
        self.configure_error = ""  # why the last configure failed ("" after a success)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._enable_srv = None
        if SetBool is not None:
            self._enable_srv = self.create_service(SetBool, "~/enable", self._on_enable)

    # -- lifecycle --------------------------------------------------------------------------
    def _guard(self, what, fn, state, parent):
        try:
            fn()
        except Exception as exc:  # a transition never lets an exception escape
            text = str(exc) if isinstance(exc, ValueError) else repr(exc)
            if what == "configure":
                self.configure_error = text
            self.get_logger().error(f"{what} failed: {text}")
            return FAILURE
        return parent(state)

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.configure_error = ""
        return self._guard("configure", self._configure, state, super().on_configure)

    def _configure(self):
        unknown = undeclared(self._parameter_overrides)
        if unknown:  # a typo'd limit must never fall back to a default (velocity_limits...)
            raise ValueError(
                f"{unknown_parameters_message(unknown)} in the parameters of "
                f"{self.get_fully_qualified_name()} (`ros2 param list` shows the declared ones)")
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
        # On the steady clock: /diagnostics keeps coming while a sim /clock is stopped.
        self._timer = self.create_timer(1.0, self._publish_diagnostics,
                                        clock=Clock(clock_type=ClockType.STEADY_TIME))

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._guard("activate", self._activate, state, super().on_activate)

    def _activate(self):
        # The robot may have moved while inactive: the first /joint_states after activation
        # sets the commanded state again, and chunks wait for it.
        cfg = self.config
        self.driver = ExecutorDriver.from_node_config(cfg)
        # `enabled` may have changed since configure (live parameter, ~/enable)
        self.driver.set_enabled(bool(self.get_parameter("enabled").value))
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
        self._pubs, self.driver, self.config = {}, None, None

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
        drv = self.driver
        if drv is None or not self._active:
            return
        was = drv.initialized
        ok, reason = drv.measure(msg.name, msg.position, self._now())
        if not ok and reason == "state_outside_limits":
            self.get_logger().error(f"not commanding: {drv.fault_detail}",
                                    throttle_duration_sec=2)
        elif not ok:
            self.get_logger().warning(f"joint_states unusable: {reason}", throttle_duration_sec=2)
        elif not was:
            self.get_logger().info(f"commanded state initialized at {drv.position.tolist()}")
        if drv.fault == "tracking_error":
            self.get_logger().error(drv.fault_detail, throttle_duration_sec=1)

    def _submit(self, t0, dt, names, actions, now, **kwargs):
        drv = self.driver
        if drv is None or not self._active:
            return
        ok, reason = drv.submit(t0, dt, names, actions, now, **kwargs)
        if reason == "disabled":
            self.get_logger().info("paused (enabled=false): chunk ignored, holding",
                                   throttle_duration_sec=5)
        elif reason == "no_joint_state":
            self.get_logger().warning("no usable /joint_states yet; chunk ignored",
                                      throttle_duration_sec=2)
        elif not ok:
            self.get_logger().warning(f"chunk rejected: {drv.last_rejection}",
                                      throttle_duration_sec=2)

    def _on_chunk(self, msg):
        now = self._now()
        self._submit(self._ros_to_mono(msg.header.stamp), msg.dt, msg.joint_names,
                     np.asarray(msg.actions, dtype=np.float64), now, sequence=msg.sequence,
                     horizon=msg.horizon, action_dim=msg.action_dim, rtc_delay=msg.rtc_delay)

    def _on_trajectory(self, msg: JointTrajectory):
        now = self._now()
        pts = msg.points
        if len(pts) < 1:
            if self.driver is not None:
                self.driver.core.reject("dimension", "empty JointTrajectory")
            return
        tfs = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in pts]
        dt = tfs[1] - tfs[0] if len(tfs) > 1 else 1.0 / self.config.control_rate
        if len({len(p.positions) for p in pts}) != 1:
            if self.driver is not None:
                self.driver.core.reject("dimension", "JointTrajectory points differ in size")
            return
        acts = np.array([p.positions for p in pts], dtype=np.float64)
        self._submit(self._ros_to_mono(msg.header.stamp) + tfs[0], dt, msg.joint_names, acts,
                     now)

    # -- live control: `ros2 param set` and ~/enable -----------------------------------------
    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Accept a change of a LIVE_PARAMETERS entry (applied at once); refuse any other while
        configured (read at configure only: a limit or a topic changed under a moving arm
        would not take effect, or would take effect mid-motion), with the reason."""
        configured = self.config is not None  # set from configure to cleanup
        refusal = live_change_refusal(params, LIVE_PARAMETERS, configured, _check_live)
        if refusal is not None:
            return SetParametersResult(successful=False, reason=refusal)
        for p in params:
            if p.name == "enabled":
                self.set_enabled(bool(p.value))
        return SetParametersResult(successful=True)

    def set_enabled(self, enabled: bool) -> None:
        """Resume (True) or pause (False: decelerate within the limits and hold, keep publishing
        the hold command, ignore chunks) without a lifecycle transition."""
        drv = self.driver
        if drv is not None:
            drv.set_enabled(enabled)
        self.get_logger().info("enabled: following chunks" if enabled else
                               "paused (enabled=false): holding, chunks ignored until enabled")

    def _on_enable(self, request, response):
        """std_srvs/SetBool ~/enable: the ``enabled`` parameter, so both views agree."""
        result = self.set_parameters([Parameter("enabled", value=bool(request.data))])[0]
        response.success = result.successful
        response.message = ("enabled" if request.data else "paused") if result.successful \
            else result.reason
        return response

    # -- control loop -------------------------------------------------------------------------
    def start_control_thread(self):
        self.stop_control_thread()
        self._stop.clear()
        cfg = self.config
        # The default 5 ms GIL switch interval lets a busy Python thread (e.g. an inference
        # worker between torch ops) delay a tick by up to 5 ms; this is process-wide.
        sys.setswitchinterval(SWITCH_INTERVAL)
        if cfg.gc_freeze:
            # A full collection walks every live object (torch, rclpy, messages: 10^5-10^6)
            # with the GIL held, stalling the control thread for milliseconds. Freezing what
            # exists at activation keeps those long-lived objects out of later collections
            # (process-wide; frozen objects are simply never collected).
            gc.collect()
            gc.freeze()
            self._frozen = True
        self.loop = DeadlineLoop(1.0 / cfg.control_rate, self._loop_tick,
                                 clock=self._now, on_error=self._tick_failed)
        self._thread = threading.Thread(target=self._control_thread, name="pi0_control",
                                        daemon=True)
        self._thread.start()

    def _control_thread(self):
        cfg = self.config
        granted, refused = request_realtime(cfg.realtime_priority, cfg.cpu_affinity)
        self.realtime = "; ".join(granted) or "SCHED_OTHER (not requested)"
        for text in granted:
            self.get_logger().info(f"control thread: {text}")
        for text in refused:
            self.realtime = f"refused: {text}"
            self.get_logger().error(f"control thread: {text}")
        self.loop.run(self._stop)

    def stop_control_thread(self):
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._thread = None
        if self._frozen:  # collectable again once the loop has stopped
            gc.unfreeze()
            self._frozen = False

    def _tick_failed(self, exc: BaseException):
        self.get_logger().error(f"control tick failed: {exc!r}", throttle_duration_sec=1.0)

    def _loop_tick(self, now: float):
        # The node clock (sim time or not) read at the tick's instant: the command's stamp.
        self._tick(now, self.get_clock().now().nanoseconds)

    @property
    def ticks(self) -> int:
        return self.loop.ticks if self.loop is not None else 0

    @property
    def missed_ticks(self) -> int:
        return self.loop.missed_ticks if self.loop is not None else 0

    @property
    def tick_errors(self) -> int:
        return self.loop.tick_errors if self.loop is not None else 0

    @property
    def period_errors(self) -> list[float]:
        return self.loop.period_errors if self.loop is not None else []

    def _tick(self, now: float, stamp_ns: int):
        """One control tick at monotonic ``now``; ``stamp_ns`` is the node clock read at the
        same instant, so every command is stamped with the time it was computed for."""
        drv = self.driver
        if drv is None:
            return
        cmd = drv.tick(now)
        if cmd is None:
            return
        self._holding = cmd.holding
        try:
            for key, msg in command_messages(self.config, cmd, stamp_ns).items():
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
        vals = {"ticks": str(self.ticks), "missed_ticks": str(self.missed_ticks),
                "tick_errors": str(self.tick_errors),
                "period_error_p99_ms": f"{np.percentile(errs, 99):.4f}" if errs.size else "nan",
                "realtime": self.realtime}
        return vals

    def status(self) -> tuple[bytes, str, dict[str, str]]:
        """(level, message, values) of the node's DiagnosticStatus: the driver's summary (the
        same as the replay's) plus the control loop's timing."""
        vals = self.diagnostics()
        drv = self.driver
        if not self._active or drv is None:
            return DiagnosticStatus.OK, "inactive", vals
        summary = drv.diagnostics(self._now())
        vals.update(summary.values)
        if self.tick_errors:
            return DiagnosticStatus.ERROR, f"{self.tick_errors} control ticks failed", vals
        return bytes([summary.level]), summary.message, vals

    def _publish_diagnostics(self):
        if not self.context.ok():  # shutting down (SIGINT / SIGTERM)
            return
        level, message, vals = self.status()
        status = DiagnosticStatus(name=f"{self.get_name()}: executor", hardware_id="pi0_ros",
                                  level=level, message=message)
        status.values = [KeyValue(key=k, value=v) for k, v in vals.items()]
        arr = DiagnosticArray(status=[status])
        arr.header.stamp = self.get_clock().now().to_msg()
        self._diag.publish(arr)


def _check_live(p: Parameter) -> None:
    """The one live parameter's value check (``enabled``: a bool)."""
    if p.name == "enabled" and not isinstance(p.value, bool):
        raise ValueError(f"enabled must be a bool, got {p.value!r}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pi0_executor_node``:
    ``python -m pi0_ros.ros.executor_node [--autostart] --ros-args --params-file F``
    (``ros.runner``: --autostart, clean exit on SIGINT / SIGTERM from any state)."""
    from pi0_ros.ros.runner import run_lifecycle_node

    return run_lifecycle_node(ExecutorNode, NODE_NAME, "pi0 action chunk executor", argv)


if __name__ == "__main__":
    raise SystemExit(main())
