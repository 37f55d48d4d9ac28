"""Loopback tests of pi0_executor_node: real rclpy + Fast DDS on a private context/domain."""

import math

import numpy as np
import pytest
from ros_helpers import fresh_domain_id, private_context, spin_until

rclpy = pytest.importorskip("rclpy")
from sensor_msgs.msg import JointState  # noqa: E402
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint  # noqa: E402

from pi0_ros.ros.executor_node import SUCCESS as OK  # noqa: E402
from pi0_ros.ros.executor_node import ExecutorNode  # noqa: E402

pytestmark = pytest.mark.ros
NAMES = ["j0", "j1"]
VMAX, AMAX = 1.0, 10.0


def _node(ctx, **over):
    params = {"joint_names": NAMES, "position_min": [-1.0], "position_max": [1.0],  # noqa: E501
              "velocity_max": [VMAX], "acceleration_max": [AMAX], "control_rate": 200.0,
              "chunk_timeout": 0.3, "outputs": ["joint_state", "forward", "trajectory"]}
    params.update(over)
    from rclpy.parameter import Parameter

    node = ExecutorNode(context=ctx, parameter_overrides=[Parameter(k, value=v)
                                                          for k, v in params.items()])
    return node


def _run(use_chunk):
    with private_context(fresh_domain_id()) as ctx:
        node = _node(ctx)
        peer = rclpy.create_node("fake_policy", context=ctx)
        cmds = []
        peer.create_subscription(JointState, "/pi0_executor_node/joint_command",
                                 lambda m: cmds.append(np.array(m.position)), 100)
        js_pub = peer.create_publisher(JointState, "/joint_states", 10)
        if use_chunk:
            try:
                from pi0_ros_msgs.msg import ActionChunk
            except ImportError as exc:
                pytest.skip(f"pi0_ros_msgs not importable: {exc}")
            chunk_pub = peer.create_publisher(ActionChunk, "/pi0_policy_node/action_chunk", 10)
        else:
            traj_pub = peer.create_publisher(JointTrajectory, "/pi0_executor_node/trajectory_in",
                                             10)
        try:
            assert node.trigger_configure() == OK
            assert node.trigger_activate() == OK
            js = JointState(name=NAMES, position=[0.1, -0.1])
            spin_until(ctx, [node, peer], lambda: (js_pub.publish(js) or
                                                   node.driver.initialized),
                       what="initial state")
            stamp = node.get_clock().now().to_msg()
            targets = 0.1 + 0.2 * np.sin(np.arange(20) * 0.1)[:, None] * np.ones((1, 2))
            if use_chunk:
                msg = ActionChunk(joint_names=NAMES, horizon=20, action_dim=2, dt=0.05,
                                  actions=targets.astype(np.float32).ravel().tolist())
                msg.header.stamp = stamp
                publish = lambda: chunk_pub.publish(msg)  # noqa: E731
            else:
                msg = JointTrajectory(joint_names=NAMES)
                msg.header.stamp = stamp
                for k, row in enumerate(targets):
                    pt = JointTrajectoryPoint(positions=row.tolist())
                    pt.time_from_start.nanosec = int(k * 0.05e9)
                    msg.points.append(pt)
                publish = lambda: traj_pub.publish(msg)  # noqa: E731
            spin_until(ctx, [node, peer], lambda: publish() or node.driver.counters()["seams"],
                       what="chunk accepted")
            spin_until(ctx, [node, peer], lambda: len(cmds) > 150, what="commands")
            assert node.trigger_deactivate() == OK
            assert node.trigger_cleanup() == OK
        finally:
            node.stop_control_thread()
            node.destroy_node()
            peer.destroy_node()
        q = np.array(cmds)
        assert np.all(np.isfinite(q)) and np.all(np.abs(q) <= 1.0)
        assert np.max(np.abs(q - 0.1)) > 0.02  # it moved along the chunk
        return node


def test_loopback_joint_trajectory():
    _run(use_chunk=False)


def test_loopback_action_chunk():
    node = _run(use_chunk=True)
    diag = node.diagnostics()
    assert int(diag["ticks"]) > 0 and not math.isnan(float(diag["period_error_p99_ms"]))
    assert diag["tick_errors"] == "0"


def test_diagnostic_status_levels():
    from diagnostic_msgs.msg import DiagnosticStatus

    with private_context(fresh_domain_id()) as ctx:
        node = _node(ctx)
        try:
            assert node.status()[:2] == (DiagnosticStatus.OK, "inactive")
            assert node.trigger_configure() == OK and node.trigger_activate() == OK
            level, message, _ = node.status()
            assert level == DiagnosticStatus.ERROR and "joint state" in message
            node.driver.measure(NAMES, [0.0, 0.0], node._now())
            spin_until(ctx, node, lambda: node.ticks > 5, what="ticks")
            assert node.status()[0] == DiagnosticStatus.WARN  # no chunk: holding
        finally:
            node.destroy_node()


def test_bad_config_fails_configure():
    with private_context(fresh_domain_id()) as ctx:
        node = _node(ctx, strategy="bogus")
        try:
            assert node.trigger_configure() != OK
        finally:
            node.destroy_node()


def test_jitter_bench_ticks_the_core_and_publishes():
    """pi0-ros-bench --executor measures the loop doing real work: chunks stitched, commands
    published on (nearly) every tick, not an idle loop waiting for a joint state."""
    from pi0_ros.tools import bench_executor

    result = bench_executor.run(rate=200.0, duration=1.5, load=False)
    assert result["bare"]["ticks"] > 200 and "executor_minus_bare" in result
    assert result["ticks"] > 200
    assert result["commands"] >= result["ticks"] - 5  # only the ticks before set_state
    assert result["seams"] >= 5
    for key in ("period_error_p50_ms", "period_error_p99_ms", "period_error_max_ms"):
        assert np.isfinite(result[key])


# -- ros2_control outputs ---------------------------------------------------------------------
FLOAT_EPS = float(np.finfo(np.float32).eps)  # JTC's "zero velocity" bound on the last point


def _duration(d):
    return d.sec + d.nanosec * 1e-9


def jtc_rejection(msg, joints, now_s, allow_nonzero_velocity_at_trajectory_end=False):
    """joint_trajectory_controller's acceptance rules for a JointTrajectory on its topic
    (ros2_controllers ``validate_trajectory_msg``, as documented there): joint names non-empty,
    all of the controller's joints (no partial goals by default); at least one point; the last
    point's velocities |v| <= float epsilon unless allow_nonzero_velocity_at_trajectory_end;
    a non-zero header stamp must not end in the past; time_from_start strictly increasing;
    every point's positions one per joint, velocities / accelerations empty or one per joint,
    no effort. Returns the reason, or None when accepted."""
    if not msg.joint_names:
        return "empty joint names"
    if sorted(msg.joint_names) != sorted(joints):
        return "joint names do not match the controller's joints"
    if not msg.points:
        return "empty trajectory"
    if not allow_nonzero_velocity_at_trajectory_end and any(
            abs(v) > FLOAT_EPS for v in msg.points[-1].velocities):
        return "velocity of the last point is not zero"
    stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
    if stamp != 0.0 and stamp + _duration(msg.points[-1].time_from_start) < now_s:
        return "ends in the past"
    prev = -1.0
    for i, pt in enumerate(msg.points):
        t = _duration(pt.time_from_start)
        if i > 0 and t <= prev:
            return "time_from_start not strictly increasing"
        prev = t
        n = len(msg.joint_names)
        if len(pt.positions) != n:
            return "positions size"
        if len(pt.velocities) not in (0, n) or len(pt.accelerations) not in (0, n):
            return "velocities / accelerations size"
        if len(pt.effort):
            return "effort given"
        if not all(math.isfinite(x) for x in (*pt.positions, *pt.velocities)):
            return "non-finite value"
    return None


def forward_rejection(msg, joints):
    """forward_command_controller (JointGroupPositionController): ``data`` must hold one value
    per configured joint, in order; otherwise the command is ignored."""
    if len(msg.data) != len(joints):
        return "command size does not match number of interfaces"
    if not all(math.isfinite(x) for x in msg.data):
        return "non-finite command"
    return None


def _outputs_config(**over):
    from pi0_ros.ros.executor_params import PARAMETERS, config_from_parameters

    values = {name: default for name, (default, _) in PARAMETERS.items()}
    values.update(joint_names=NAMES, position_min=[-1.0], position_max=[1.0],
                  velocity_max=[VMAX], acceleration_max=[AMAX],
                  outputs=["joint_state", "forward", "trajectory"], **over)
    return config_from_parameters(values.__getitem__)


def test_every_command_is_accepted_by_jtc_and_forward_controllers():
    """Commands of a real executor run (tracking, seams, holds, at the limits): every
    JointTrajectory passes JTC's rules with its default allow_nonzero_velocity_at_trajectory_end
    = false, and every Float64MultiArray forward_command_controller's."""
    from pi0_ros.control import ExecutorDriver
    from pi0_ros.ros.executor_params import command_messages

    cfg = _outputs_config()
    drv = ExecutorDriver.from_node_config(cfg)
    drv.measure(NAMES, [0.0, 0.0], 0.0)
    rng = np.random.default_rng(0)
    stamp0 = 1_700_000_000.0
    moving = 0
    for k in range(1, 1500):
        t = k * 0.002
        if k % 100 == 1:
            drv.submit(t, 0.05, NAMES, np.clip(drv.position + np.cumsum(
                rng.normal(0, 0.1, (20, 2)), axis=0), -1.2, 1.2), t)
        cmd = drv.tick(t)
        drv.measure(NAMES, cmd.position, t)
        msgs = command_messages(cfg, cmd, int((stamp0 + t) * 1e9))
        now = stamp0 + t + 0.01  # the controller receives it 10 ms later
        assert jtc_rejection(msgs["trajectory"], NAMES, now) is None
        assert forward_rejection(msgs["forward"], NAMES) is None
        moving += bool(np.any(np.abs(cmd.velocity) > 0.1))
        last = msgs["trajectory"].points[-1]
        assert np.all(np.abs(np.array(last.positions)) <= 1.0)
    assert moving > 500  # the check ran on moving commands, not only on holds


def test_trajectory_without_the_stop_point_needs_the_jtc_option():
    """trajectory_end_at_rest: false streams constant-velocity segments: JTC accepts them only
    with allow_nonzero_velocity_at_trajectory_end: true (docs/EXECUTOR.md)."""
    from pi0_ros.control import Command
    from pi0_ros.ros.executor_params import command_messages

    cfg = _outputs_config(trajectory_end_at_rest=False)
    v = np.array([0.5, -0.5])
    cmd = Command(np.zeros(2), v, np.zeros(2), False)
    msg = command_messages(cfg, cmd, 0)["trajectory"]
    assert jtc_rejection(msg, NAMES, 0.0) == "velocity of the last point is not zero"
    assert jtc_rejection(msg, NAMES, 0.0, allow_nonzero_velocity_at_trajectory_end=True) is None


def test_stop_point_decelerates_within_the_acceleration_limit():
    from pi0_ros.ros.executor_params import trajectory_points

    cfg = _outputs_config()
    v = np.array([VMAX, -0.3])
    pts = trajectory_points(cfg, np.zeros(2), v)
    (t1, q1, v1), (t2, q2, v2) = pts[-2], pts[-1]
    assert np.all(v2 == 0.0) and np.all(np.abs(v1 - v2) / (t2 - t1) <= AMAX * (1 + 1e-12))
    np.testing.assert_allclose(q2 - q1, (v1 + v2) / 2 * (t2 - t1))  # linear deceleration


# -- shutdown with a frozen sim clock ---------------------------------------------------------
SHUTDOWN_LIMIT = 2.0  # s from SIGINT / SIGTERM to exit (issue 14)
SHUTDOWN_RUNS = 20


@pytest.mark.slow
def test_shutdown_with_a_frozen_sim_clock(tmp_path):
    """``use_sim_time`` with /clock published once and then stopped (a bag that ended): one
    SIGINT or SIGTERM ends the node within SHUTDOWN_LIMIT, SHUTDOWN_RUNS times in a row, from
    unconfigured, active without a joint state, and active commanding."""
    import signal
    import subprocess
    import time

    from rosgraph_msgs.msg import Clock
    from ros_helpers import NodeProcess, python_node

    params = tmp_path / "executor.yaml"
    params.write_text("/**:\n  ros__parameters:\n    use_sim_time: true\n"
                      f"    joint_names: {NAMES}\n    position_min: [-1.0]\n"
                      "    position_max: [1.0]\n    control_rate: 200.0\n")
    domain = fresh_domain_id()
    elapsed = []
    with private_context(domain) as ctx:
        peer = rclpy.create_node("frozen_clock", context=ctx)
        clock_pub = peer.create_publisher(Clock, "/clock", 10)
        js_pub = peer.create_publisher(JointState, "/joint_states", 10)
        cmds = []
        peer.create_subscription(JointState, "/shutdown_probe/joint_command",
                                 lambda m: cmds.append(1), 10)
        frozen = Clock()
        frozen.clock.sec = 100
        try:
            for run in range(SHUTDOWN_RUNS):
                state = ("unconfigured", "active", "commanding")[run % 3]
                args = [] if state == "unconfigured" else ["--autostart"]
                name = f"pi0_executor_node_{run}"  # a new name: never the last run's node
                cmd = python_node("pi0_ros.ros.executor_node", *args, "--ros-args",
                                  "-r", f"__node:={name}", "-p",
                                  "command_topic:=/shutdown_probe/joint_command",
                                  "--params-file", str(params))
                proc = NodeProcess(cmd, domain, tmp_path / f"run{run}.log").start()
                try:
                    spin_until(ctx, peer, lambda name=name: name in peer.get_node_names(),
                               timeout=30.0, what="node up")
                    for _ in range(3):  # the sim clock moves once, then never again
                        clock_pub.publish(frozen)
                    if state == "commanding":
                        cmds.clear()
                        spin_until(ctx, peer, lambda: js_pub.publish(JointState(
                            name=NAMES, position=[0.0, 0.0])) or len(cmds) > 5,
                            timeout=30.0, what="commands")
                    sig = signal.SIGINT if run % 2 == 0 else signal.SIGTERM
                    t0 = time.monotonic()
                    proc.proc.send_signal(sig)
                    try:
                        rc = proc.proc.wait(SHUTDOWN_LIMIT)
                    except subprocess.TimeoutExpired:
                        raise AssertionError(f"run {run} ({state}, {sig.name}): still running "
                                             f"{SHUTDOWN_LIMIT} s after the signal:\n"
                                             f"{proc.output()[-2000:]}") from None
                    elapsed.append(time.monotonic() - t0)
                    assert rc == 0, f"run {run}: exit code {rc}\n{proc.output()[-2000:]}"
                finally:
                    proc.stop()
        finally:
            peer.destroy_node()
    assert len(elapsed) == SHUTDOWN_RUNS and max(elapsed) < SHUTDOWN_LIMIT


def test_command_stamps_are_the_tick_times():
    """Fault probe: stamps taken at publish time made velocities computed from stamps exceed
    the limit (1.9x). Ticks here take a random 0-3 ms before publishing (a loaded machine); the
    stamps are still the ticks' times, so |dq| <= vmax * d(stamp) between consecutive
    commands, with 0.5 ms for the two clock reads of one tick."""
    import time

    with private_context(fresh_domain_id()) as ctx:
        node = _node(ctx, chunk_timeout=2.0, jerk_max=[0.0])
        peer = rclpy.create_node("stamp_probe", context=ctx)
        got = []
        peer.create_subscription(
            JointState, "/pi0_executor_node/joint_command",
            lambda m: got.append((m.header.stamp.sec + m.header.stamp.nanosec * 1e-9,
                                  np.array(m.position), np.array(m.velocity))), 1000)
        js_pub = peer.create_publisher(JointState, "/joint_states", 10)
        traj_pub = peer.create_publisher(JointTrajectory, "/pi0_executor_node/trajectory_in", 10)
        try:
            assert node.trigger_configure() == OK and node.trigger_activate() == OK
            js = JointState(name=NAMES, position=[-0.9, 0.9])
            spin_until(ctx, [node, peer], lambda: js_pub.publish(js) or node.driver.initialized,
                       what="initial state")
            rng, tick = np.random.default_rng(0), node.driver.tick
            node.driver.tick = lambda now: (time.sleep(rng.uniform(0.0, 0.003)), tick(now))[1]
            msg = JointTrajectory(joint_names=NAMES)
            msg.header.stamp = node.get_clock().now().to_msg()
            for k in range(40):  # 2 rad/s ramps: the command runs at vmax
                x = min(-0.9 + 0.1 * k, 0.9)
                pt = JointTrajectoryPoint(positions=[x, -x])
                pt.time_from_start.nanosec = int(k * 0.05e9)
                msg.points.append(pt)
            spin_until(ctx, [node, peer], lambda: js_pub.publish(js) or traj_pub.publish(msg)
                       or node.driver.counters()["seams"], what="chunk accepted")
            got.clear()
            last = [0.0]

            def state_at_100hz():  # a robot's rate, not a flood that starves the control thread
                if time.monotonic() - last[0] >= 0.01:
                    last[0] = time.monotonic()
                    js_pub.publish(js)

            spin_until(ctx, [node, peer], lambda: state_at_100hz() or len(got) > 150,
                       what="commands")
        finally:
            node.stop_control_thread()
            node.destroy_node()
            peer.destroy_node()
    fast = 0
    for (s0, q0, _), (s1, q1, v1) in zip(got, got[1:]):
        if s1 - s0 > 0.004 * 1.5:  # a missed tick or a lost message between: skip the pair
            continue
        fast += bool(np.max(np.abs(v1)) > 0.9 * VMAX)
        assert np.max(np.abs(q1 - q0)) <= VMAX * (s1 - s0 + 0.0005), (s1 - s0, q1 - q0)
    assert fast > 50  # pairs checked while moving at (nearly) the velocity limit


def test_a_refused_realtime_request_is_logged_and_reported(capfd):
    with private_context(fresh_domain_id()) as ctx:
        node = _node(ctx, cpu_affinity=[4095], realtime_priority=0)
        try:
            assert node.trigger_configure() == OK and node.trigger_activate() == OK
            spin_until(ctx, node, lambda: node.ticks > 3, what="ticks")
            assert node.realtime.startswith("refused: CPU affinity [4095] refused by the OS")
            assert node.status()[2]["realtime"] == node.realtime
        finally:
            node.destroy_node()
    assert "CPU affinity [4095] refused by the OS" in capfd.readouterr().err


def test_tracking_fault_and_feedback_timeout_show_on_diagnostics():
    """The closed loop on the node: a joint state far from the command -> ERROR naming the
    joint; joint states stopping -> ERROR feedback timeout (the published DiagnosticStatus)."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus

    with private_context(fresh_domain_id()) as ctx:
        node = _node(ctx, tracking_tolerance=[0.1], feedback_timeout=0.2)
        peer = rclpy.create_node("diag_probe", context=ctx)
        diags = []
        peer.create_subscription(DiagnosticArray, "/diagnostics",
                                 lambda m: diags.extend(m.status), 10)
        js_pub = peer.create_publisher(JointState, "/joint_states", 10)
        try:
            assert node.trigger_configure() == OK and node.trigger_activate() == OK
            spin_until(ctx, [node, peer], lambda: js_pub.publish(JointState(
                name=NAMES, position=[0.0, 0.0])) or node.driver.initialized, what="init")
            spin_until(ctx, [node, peer], lambda: node.ticks > 3, what="ticks")
            spin_until(ctx, [node, peer], lambda: js_pub.publish(JointState(
                name=NAMES, position=[0.0, 0.5])) or node.driver.fault == "tracking_error",
                what="tracking fault")
            level, message, values = node.status()
            assert level == DiagnosticStatus.ERROR and "j1" in message
            assert values["tracking_faults"] == "1"
            spin_until(ctx, [node, peer], lambda: node.driver.fault == "feedback_timeout",
                       what="feedback timeout")
            diags.clear()
            spin_until(ctx, [node, peer], lambda: diags, timeout=3.0, what="/diagnostics")
            assert diags[-1].level == DiagnosticStatus.ERROR
            assert "feedback timeout" in diags[-1].message
        finally:
            node.destroy_node()
            peer.destroy_node()
