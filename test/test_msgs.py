"""pi0_ros_msgs (msg/): the generated ActionChunk type and a round trip over real DDS.

rclpy present but pi0_ros_msgs missing is a failure, not a skip: the bootstrap builds msg/ into
the venv, and a skipped message test would hide a broken install path.
"""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
from ros_helpers import WAIT, NodeProcess, private_context, spin_until

pytestmark = pytest.mark.ros

TOPIC = "/pi0_ros_test/action_chunk"
FIELDS = {  # ActionChunk.msg, in order, as rosidl types
    "header": "std_msgs/Header",
    "joint_names": "sequence<string>",
    "horizon": "uint32",
    "action_dim": "uint32",
    "dt": "double",
    "actions": "sequence<float>",
    "inference_latency": "double",
    "sequence": "uint64",
    "model_name": "string",
    "input_stamps": "sequence<builtin_interfaces/Time>",
    "rtc_delay": "uint32",
}


def _action_chunk():
    try:
        from pi0_ros_msgs.msg import ActionChunk
    except ImportError as exc:
        pytest.fail(f"pi0_ros_msgs is not importable ({exc}); build msg/ into the venv: "
                    f"python3 -m pi0_ros.tools.bootstrap setup")
    return ActionChunk


def _sample(seq: int = 7):
    msg = _action_chunk()()
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1_700_000_000, 123_456_789
    msg.header.frame_id = "base"
    msg.joint_names = ["j1", "j2", "gripper"]
    msg.horizon, msg.action_dim, msg.dt = 4, 3, 0.02
    msg.actions = np.arange(12, dtype=np.float32) / 8.0  # exactly representable in float32
    msg.inference_latency = 0.0315
    msg.sequence = seq
    msg.model_name = "pi05_tiny"
    return msg


def _assert_same(got, want) -> None:
    assert got.header == want.header
    assert list(got.joint_names) == list(want.joint_names)
    assert (got.horizon, got.action_dim, got.dt) == (want.horizon, want.action_dim, want.dt)
    np.testing.assert_array_equal(np.asarray(got.actions, np.float32),
                                  np.asarray(want.actions, np.float32))
    assert got.inference_latency == want.inference_latency
    assert (got.sequence, got.model_name) == (want.sequence, want.model_name)


def test_action_chunk_fields():
    ActionChunk = _action_chunk()
    assert ActionChunk.get_fields_and_field_types() == FIELDS
    assert list(ActionChunk.get_fields_and_field_types()) == list(FIELDS)
    msg = ActionChunk()
    assert (msg.horizon, msg.action_dim, msg.sequence, len(msg.actions)) == (0, 0, 0, 0)


def test_action_chunk_serialization_round_trip():
    from rclpy.serialization import deserialize_message, serialize_message

    ActionChunk = _action_chunk()
    want = _sample()
    _assert_same(deserialize_message(serialize_message(want), ActionChunk), want)


def test_round_trip_between_two_participants(ros_domain_id):
    """Publisher and subscriber in two private contexts (two DDS participants) on a fresh
    domain: discovery and delivery over loopback with the generated typesupport."""
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    ActionChunk = _action_chunk()
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    want, got = _sample(), []
    with private_context(ros_domain_id) as pub_ctx, private_context(ros_domain_id) as sub_ctx:
        pub_node = rclpy.create_node("chunk_pub", context=pub_ctx)
        sub_node = rclpy.create_node("chunk_sub", context=sub_ctx)
        pub = pub_node.create_publisher(ActionChunk, TOPIC, qos)
        sub_node.create_subscription(ActionChunk, TOPIC, got.append, qos)
        spin_until(pub_ctx, pub_node, lambda: pub.get_subscription_count() > 0,
                   what="the subscriber to be discovered")
        pub.publish(want)
        spin_until(sub_ctx, sub_node, lambda: got, what="the ActionChunk to arrive")
        pub_node.destroy_node()
        sub_node.destroy_node()
    assert len(got) == 1
    _assert_same(got[0], want)


PUBLISHER = textwrap.dedent(f"""
    import rclpy, sys
    from rclpy.executors import ExternalShutdownException
    from pi0_ros_msgs.msg import ActionChunk
    rclpy.init()
    node = rclpy.create_node("chunk_pub_process")
    pub = node.create_publisher(ActionChunk, "{TOPIC}", 10)
    count = [0]
    def tick():
        msg = ActionChunk(horizon=2, action_dim=1, dt=0.5, actions=[1.5, -2.0],
                          sequence=count[0], model_name="child")
        pub.publish(msg)
        count[0] += 1
    node.create_timer(0.05, tick)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    print("published", count[0], flush=True)
""")


@pytest.mark.slow
def test_round_trip_from_node_subprocess(ros_domain_id, ros_context, tmp_path):
    """A fresh interpreter (nothing inherited but the environment) loads the typesupport
    libraries, publishes on the same domain, and stops cleanly on SIGINT."""
    import rclpy

    ActionChunk = _action_chunk()
    got = []
    node = rclpy.create_node("chunk_sub", context=ros_context)
    node.create_subscription(ActionChunk, TOPIC, got.append, 10)
    with NodeProcess([sys.executable, "-c", PUBLISHER], ros_domain_id,
                     tmp_path / "publisher.log") as proc:
        try:
            spin_until(ros_context, node, lambda: len(got) >= 3, timeout=3 * WAIT,
                       what="three ActionChunks from the subprocess")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- publisher output ---\n{proc.output()}") from None
        code = proc.stop()
    node.destroy_node()
    assert code == 0, proc.output()
    assert "published" in proc.output()
    assert [m.model_name for m in got[:3]] == ["child"] * 3
    assert [m.sequence for m in got[:3]] == sorted(m.sequence for m in got[:3])
    np.testing.assert_array_equal(np.asarray(got[0].actions), [1.5, -2.0])
