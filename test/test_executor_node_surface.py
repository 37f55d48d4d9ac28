"""The executor node's ROS surface (issue 13): strict parameters (an undeclared name refuses
configure, naming the closest declared one), live changes (``enabled`` only) and the ``~/enable``
service (hold when disabled), relative default topics and namespaced config sections (two
executors under /robot1 and /robot2 in one domain do not cross-talk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ros_helpers import fresh_domain_id, private_context, spin_until

rclpy = pytest.importorskip("rclpy")
from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402

from pi0_ros.control import ExecutorDriver  # noqa: E402
from pi0_ros.ros.executor_node import SUCCESS as OK  # noqa: E402
from pi0_ros.ros.executor_node import ExecutorNode  # noqa: E402
from pi0_ros.ros.executor_params import PARAMETERS, config_from_parameters  # noqa: E402

pytestmark = pytest.mark.ros
ROOT = Path(__file__).resolve().parents[1]
NAMES = ["j0", "j1"]
AMAX = 10.0
BASE = {"joint_names": NAMES, "position_min": [-2.0], "position_max": [2.0],
        "velocity_max": [1.0], "acceleration_max": [AMAX], "control_rate": 200.0,
        "chunk_timeout": 5.0, "feedback_timeout": 0.0}  # the tests publish joint states once


def _node(ctx, name="pi0_executor_node", namespace=None, cli_args=None, **over):
    params = dict(BASE, **over)
    kwargs = {"namespace": namespace} if namespace else {}
    return ExecutorNode(name, context=ctx, cli_args=cli_args,
                        parameter_overrides=[Parameter(k, value=v) for k, v in params.items()],
                        **kwargs)


def _chunk_msg(stamp, q0, slope=0.8, horizon=20, dt=0.05):
    from pi0_ros_msgs.msg import ActionChunk

    acts = q0 + slope * dt * np.arange(1, horizon + 1)[:, None] * np.ones((1, len(NAMES)))
    msg = ActionChunk(joint_names=NAMES, horizon=horizon, action_dim=len(NAMES), dt=dt,
                      actions=acts.astype(np.float32).ravel().tolist())
    msg.header.stamp = stamp
    return msg


# -- item 1: strict parameters --------------------------------------------------------------


def test_undeclared_parameter_refuses_configure_naming_the_closest():
    """The issue's safety case: `velocity_limits` (for velocity_max) must not fall back to the
    1 rad/s default for every joint, silently."""
    with private_context(fresh_domain_id()) as ctx:
        node = _node(ctx, velocity_limits=[0.5, 0.2])
        try:
            assert node.trigger_configure() != OK
            assert "'velocity_limits'" in node.configure_error
            assert "did you mean 'velocity_max'" in node.configure_error
            assert node.driver is None and node.config is None
        finally:
            node.destroy_node()


def test_undeclared_parameter_in_a_namespaced_params_file_section(tmp_path):
    params = tmp_path / "exec.yaml"
    params.write_text("/**/pi0_executor_node:\n  ros__parameters:\n"
                      "    joint_names: [a, b]\n    chunk_timout: 0.2\n")
    with private_context(fresh_domain_id()) as ctx:
        node = ExecutorNode(context=ctx, namespace="/robot1",
                            cli_args=["--ros-args", "--params-file", str(params)])
        try:
            assert list(node.get_parameter("joint_names").value) == ["a", "b"]
            assert node.trigger_configure() != OK
            assert "'chunk_timout' (did you mean 'chunk_timeout'?)" in node.configure_error
            assert "/robot1/pi0_executor_node" in node.configure_error
        finally:
            node.destroy_node()


# -- item 2: live parameters and ~/enable ---------------------------------------------------


def test_only_live_parameters_change_while_configured():
    with private_context(fresh_domain_id()) as ctx:
        node = _node(ctx)
        try:
            # before configure every declared parameter may still be set (read at configure)
            assert node.set_parameters([Parameter("control_rate", value=250.0)])[0].successful
            assert node.trigger_configure() == OK and node.trigger_activate() == OK
            assert node.config.control_rate == 250.0
            for name, value in (("control_rate", 100.0), ("velocity_max", [5.0]),
                                ("chunk_topic", "/elsewhere")):
                result = node.set_parameters([Parameter(name, value=value)])[0]
                assert not result.successful, name
                assert f"{name} is read at configure only" in result.reason
                assert "live: enabled" in result.reason
            assert node.get_parameter("control_rate").value == 250.0
            bad = node.set_parameters([Parameter("enabled", value=1)])[0]
            assert not bad.successful  # (rclpy's own type check: the declared type is bool)
            assert node.set_parameters([Parameter("enabled", value=False)])[0].successful
            assert node.driver.enabled is False
            assert node.set_parameters([Parameter("enabled", value=True)])[0].successful
            assert node.driver.enabled is True
        finally:
            node.destroy_node()


def _driver(**over):
    values = {name: default for name, (default, _) in PARAMETERS.items()}
    values.update(BASE, jerk_max=[0.0], tracker="exact", **over)
    return ExecutorDriver.from_node_config(config_from_parameters(values.__getitem__))


def test_disabled_driver_decelerates_within_the_limits_holds_and_refuses_chunks():
    drv = _driver()
    period = drv.period
    assert drv.measure(NAMES, [0.0, 0.0], 0.0)[0]
    acts = 0.04 * np.arange(1, 21)[:, None] * np.ones((1, 2))  # 0.8 rad/s ramp
    assert drv.submit(0.0, 0.05, NAMES, acts, 0.0)[0]
    t, cmds = 0.0, []
    for _ in range(int(0.3 / period)):
        t += period
        cmds.append(drv.tick(t))
    assert abs(cmds[-1].velocity[0]) > 0.5 and not cmds[-1].holding  # moving along the chunk
    drv.set_enabled(False)
    assert drv.submit(t, 0.05, NAMES, acts + cmds[-1].position[0], t) == (False, "disabled")
    assert drv.counters()["chunks_while_disabled"] == 1
    held = []
    for _ in range(int(0.5 / period)):
        t += period
        held.append(drv.tick(t))
    assert all(c is not None and c.holding for c in held)  # a command every tick: the hold
    v = np.array([cmds[-1].velocity] + [c.velocity for c in held])
    assert np.all(np.abs(np.diff(v, axis=0)) <= AMAX * period * (1 + 1e-6) + 1e-9)
    assert np.all(np.abs(v[-20:]) == 0.0)  # at rest
    q = np.array([c.position for c in held])
    assert np.all(q[-20:] == q[-1])
    diag = drv.diagnostics(t)
    assert diag.level == 0 and "paused" in diag.message and diag.values["enabled"] == "false"
    drv.set_enabled(True)
    assert drv.submit(t, 0.05, NAMES, q[-1] + acts, t)[0]
    assert drv.diagnostics(t).values["enabled"] == "true"


def test_enable_service_pauses_the_running_node():
    msgs = pytest.importorskip("pi0_ros_msgs.msg")
    SetBool = pytest.importorskip("std_srvs.srv").SetBool
    with private_context(fresh_domain_id()) as ctx:
        node = _node(ctx, namespace="/arm")
        peer = rclpy.create_node("peer", context=ctx)
        cmds: list = []
        peer.create_subscription(JointState, "/arm/pi0_executor_node/joint_command",
                                 cmds.append, 100)
        js_pub = peer.create_publisher(JointState, "/arm/joint_states", 10)
        chunk_pub = peer.create_publisher(msgs.ActionChunk,
                                          "/arm/pi0_policy_node/action_chunk", 10)
        client = peer.create_client(SetBool, "/arm/pi0_executor_node/enable")
        nodes = [node, peer]
        try:
            assert node.trigger_configure() == OK and node.trigger_activate() == OK
            js = JointState(name=NAMES, position=[0.0, 0.0])
            spin_until(ctx, nodes, lambda: js_pub.publish(js) or node.driver.initialized,
                       what="initial state")
            # a 3 s chunk from 0 to 1.5 rad: disabled at once, the arm stops far short of it
            spin_until(ctx, nodes, lambda: chunk_pub.publish(_chunk_msg(
                node.get_clock().now().to_msg(), 0.0, slope=0.5, horizon=60)) or
                node.driver.counters().get("chunks_accepted"), what="chunk accepted")
            assert client.wait_for_service(timeout_sec=10.0)
            future = client.call_async(SetBool.Request(data=False))
            spin_until(ctx, nodes, future.done, what="~/enable answer")
            assert future.result().success and future.result().message == "paused"
            assert node.get_parameter("enabled").value is False
            before = node.driver.counters().get("chunks_while_disabled", 0)
            spin_until(ctx, nodes, lambda: chunk_pub.publish(_chunk_msg(
                node.get_clock().now().to_msg(), node.driver.position[0])) or
                node.driver.counters().get("chunks_while_disabled", 0) > before,
                what="chunk ignored while disabled")
            n = len(cmds)
            spin_until(ctx, nodes, lambda: len(cmds) > n + 40 and not np.any(
                cmds[-1].velocity), what="hold commands at rest")
            assert cmds[-1].position[0] < 1.0  # stopped, not following the chunk to 1.5 rad
            q = np.array([m.position for m in cmds[-20:]])
            assert np.all(q == q[-1]) and node.driver.counters()["hold_ticks"] > 0
            level, message, values = node.status()
            assert level == DiagnosticStatus.OK and "paused" in message
            assert values["enabled"] == "false"
            future = client.call_async(SetBool.Request(data=True))
            spin_until(ctx, nodes, future.done, what="~/enable answer")
            assert future.result().success and node.driver.enabled
        finally:
            node.destroy_node()
            peer.destroy_node()


# -- item 3: namespaces ---------------------------------------------------------------------


def test_default_topics_are_relative():
    for name in ("chunk_topic", "joint_states_topic", "forward_topic", "trajectory_out_topic"):
        assert not PARAMETERS[name][0].startswith("/"), name
    assert PARAMETERS["chunk_topic"][0] == "pi0_policy_node/action_chunk"


@pytest.mark.parametrize("path", ["config/executor.yaml", "config/droid_policy.yaml",
                                  "config/aloha_policy.yaml"])
def test_config_sections_reach_a_namespaced_executor(path):
    import yaml

    section = next(v for k, v in yaml.safe_load((ROOT / path).read_text()).items()
                   if str(k).endswith("pi0_executor_node"))["ros__parameters"]
    with private_context(fresh_domain_id()) as ctx:
        node = ExecutorNode(context=ctx, namespace="/robot1",
                            cli_args=["--ros-args", "--params-file", str(ROOT / path)])
        try:
            assert list(node.get_parameter("joint_names").value) == section["joint_names"]
            assert node.get_parameter("control_rate").value == section["control_rate"]
            assert node.trigger_configure() == OK, node.configure_error
        finally:
            node.destroy_node()


def test_two_namespaced_executors_do_not_cross_talk():
    msgs = pytest.importorskip("pi0_ros_msgs.msg")
    with private_context(fresh_domain_id()) as ctx:
        robots = {"/robot1": 0.3, "/robot2": -0.4}
        nodes = {ns: _node(ctx, namespace=ns, **{k: v for k, v in BASE.items()})
                 for ns in robots}
        peer = rclpy.create_node("peer", context=ctx)
        cmds: dict = {ns: [] for ns in robots}
        js_pubs, chunk_pubs = {}, {}
        for ns in robots:
            peer.create_subscription(JointState, f"{ns}/pi0_executor_node/joint_command",
                                     cmds[ns].append, 100)
            js_pubs[ns] = peer.create_publisher(JointState, f"{ns}/joint_states", 10)
            chunk_pubs[ns] = peer.create_publisher(msgs.ActionChunk,
                                                   f"{ns}/pi0_policy_node/action_chunk", 10)
        everyone = [*nodes.values(), peer]
        try:
            for node in nodes.values():
                assert node.trigger_configure() == OK and node.trigger_activate() == OK

            def publish_states():
                for ns, q in robots.items():
                    js_pubs[ns].publish(JointState(name=NAMES, position=[q, q]))
                return all(n.driver.initialized for n in nodes.values())

            spin_until(ctx, everyone, publish_states, what="both initialized")
            for ns, q in robots.items():  # each commanded state is its own robot's
                np.testing.assert_allclose(nodes[ns].driver.position, [q, q])
            # a chunk for robot1 only: robot1 follows it, robot2 never sees it
            n1 = nodes["/robot1"]
            spin_until(ctx, everyone, lambda: chunk_pubs["/robot1"].publish(_chunk_msg(
                n1.get_clock().now().to_msg(), robots["/robot1"])) or
                n1.driver.counters().get("chunks_accepted"), what="robot1 chunk accepted")
            spin_until(ctx, everyone, lambda: all(len(c) > 20 for c in cmds.values()),
                       what="commands of both")
            c2 = nodes["/robot2"].driver.counters()
            assert not c2.get("chunks_accepted") and not any(
                k.startswith("rejected.") and v for k, v in c2.items())
            assert not c2.get("chunks_before_joint_state")
            q2 = np.array([m.position for m in cmds["/robot2"]])
            np.testing.assert_allclose(q2, robots["/robot2"])
            q1 = np.array([m.position for m in cmds["/robot1"]])
            assert q1.max() > robots["/robot1"] + 1e-3  # robot1 moved along its chunk
            assert np.all(np.abs(q1 - robots["/robot2"]) > 0.5)
        finally:
            for node in nodes.values():
                node.destroy_node()
            peer.destroy_node()



@pytest.mark.parametrize("node_ns", ["/", "/robot1", "/a/b"])
def test_replay_resolves_topics_as_the_live_node(node_ns):
    """tools/replay_executor.py's ``_resolve`` (the replay's topics) = rclpy's resolution."""
    from pi0_ros.tools.replay_executor import _resolve

    with private_context(fresh_domain_id()) as ctx:
        node = rclpy.create_node("pi0_executor_node", namespace=node_ns, context=ctx)
        try:
            fqn = node.get_fully_qualified_name()
            for topic in ("joint_states", "pi0_policy_node/action_chunk", "~/joint_command",
                          "/forward_position_controller/commands",
                          PARAMETERS["trajectory_out_topic"][0]):
                assert _resolve(topic, fqn) == node.resolve_topic_name(topic), topic
        finally:
            node.destroy_node()
