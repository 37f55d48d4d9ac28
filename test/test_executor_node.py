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
    params = {"joint_names": NAMES, "position_min": [-1.0], "position_max": [1.0],
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
                                                   node.executor_core.initialized),
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
            spin_until(ctx, [node, peer], lambda: publish() or node.executor_core.stats["seams"],
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
            assert node.status() == (DiagnosticStatus.OK, "inactive")
            assert node.trigger_configure() == OK and node.trigger_activate() == OK
            level, message = node.status()
            assert level == DiagnosticStatus.ERROR and "joint state" in message
            node.executor_core.set_state([0.0, 0.0], node._now())
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
    assert result["ticks"] > 200
    assert result["commands"] >= result["ticks"] - 5  # only the ticks before set_state
    assert result["seams"] >= 5
    for key in ("period_error_p50_ms", "period_error_p99_ms", "period_error_max_ms"):
        assert np.isfinite(result[key])
