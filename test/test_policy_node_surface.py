"""The policy node's ROS surface (issue 13): namespaces, strict parameters, live changes
(``ros2 param set``, ``~/enable``), a configure that keeps the node answering, errors that name the
parameter to fix, and the fault probe's inputs. In process, fake policy (test_policy_node_harness).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import rclpy
from lifecycle_msgs.srv import GetState
from rcl_interfaces.msg import Parameter as ParameterMsg
from rcl_interfaces.msg import ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.lifecycle import TransitionCallbackReturn
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from test_policy_node_harness import (
    ACTION_NAMES,
    STATE_NAMES,
    WAIT,
    FakeControl,
    Harness,
    _parameter,
    fake_factory,
    wait_for,
)

from pi0_ros.pipeline.config import PARAMETERS
from pi0_ros.ros import conversions as conv
from pi0_ros.ros.node import PolicyNode, make_executor

msgs = pytest.importorskip("pi0_ros_msgs.msg",
                           reason="pi0_ros_msgs is not built into this environment")
SetBool = pytest.importorskip("std_srvs.srv", reason="ros-std-srvs is not installed").SetBool

CAM, JOINTS = "/surface/cam", "/surface/joint_states"
RGB = np.zeros((8, 8, 3), np.uint8)
OVERRIDES = {
    "checkpoint": "/fake/ckpt",
    "prompt": "pick up the cube",
    "cameras.topics": [CAM],
    "joint_states.topic": JOINTS,
    "joint_states.names": STATE_NAMES,
    "actions.joint_names": ACTION_NAMES,
    "max_input_age": 1.0,  # s; generous: a loaded 2-core runner delays callbacks
    "max_clock_skew": 0.2,
    "sync.slop": 0.02,
    "diagnostics.period": 0.2,
    "model.warmup": 1,
}


def _publish_set(h, stamp=None, positions=(0.1, 0.2, 0.3), names=STATE_NAMES, ns=""):
    stamp = h.now_ns() if stamp is None else stamp
    image = conv.rgb_to_image(RGB, "rgb8")
    image.header.stamp = conv.ns_to_stamp(stamp)
    h.publish(Image, f"{ns}{CAM}" if not ns else f"{ns}/camera/image_raw", image)
    js = h.joint_state(stamp, positions, names)
    h.publish(JointState, JOINTS if not ns else f"{ns}/joint_states", js)
    return stamp


def _new_chunk(h, publish=None, timeout=WAIT):
    """Publish sets until a new chunk arrives; returns it."""
    n = h.n("chunks")

    def got():
        (publish or (lambda: _publish_set(h)))()
        try:
            wait_for(lambda: h.n("chunks") > n, 0.3)
            return True
        except AssertionError:
            return False

    wait_for(got, timeout, what=f"a new chunk (counts {h.node.counts()})")
    return h.last("chunks")


def _call(h, client, request):
    assert client.wait_for_service(timeout_sec=WAIT)
    future = client.call_async(request)
    done = threading.Event()
    future.add_done_callback(lambda _f: done.set())
    assert done.wait(WAIT), "no answer"
    return future.result()


@pytest.fixture(scope="module")
def h():
    harness = Harness(OVERRIDES, control=FakeControl())
    try:
        assert harness.transition("configure"), harness.node.configure_error
        assert harness.transition("activate")
        harness.wait_for_subscribers([(Image, CAM), (JointState, JOINTS)])
        yield harness
    finally:
        harness.close()


@pytest.fixture(autouse=True)
def healthy(request):
    """Module-node tests start active, enabled, with the configured prompt and no rate cap."""
    if "h" not in request.fixturenames:
        yield
        return
    h = request.getfixturevalue("h")
    h.node.set_parameters([_parameter("enabled", True), _parameter("max_rate", 0.0),
                           _parameter("prompt", OVERRIDES["prompt"])])
    yield


# -- item 1: namespaces ----------------------------------------------------------------------


def test_default_topics_are_relative():
    assert not PARAMETERS["joint_states.topic"][0].startswith("/")
    assert not any(t.startswith("/") for t in PARAMETERS["cameras.topics"][0])


def test_two_namespaced_nodes_do_not_cross_talk():
    """/robot1 and /robot2 run the same node name with default (relative) topics in one domain:
    each hears its own robot only and publishes in its own namespace."""
    overrides = {k: v for k, v in OVERRIDES.items()
                 if k not in ("cameras.topics", "joint_states.topic")}
    h = Harness(overrides, control=FakeControl(), node_name="pi0_policy_node",
                namespace="/robot1")
    control2 = FakeControl()
    node2 = PolicyNode("pi0_policy_node", namespace="/robot2", context=h.context,
                       parameter_overrides=[_parameter(k, v) for k, v in overrides.items()],
                       policy_factory=fake_factory(control2))
    executor2 = make_executor(node2, h.context)
    executor2.add_node(node2)
    spin2 = threading.Thread(target=h._spin_forever, args=(executor2,), daemon=True)
    spin2.start()
    chunks2: list = []
    h.robot.create_subscription(msgs.ActionChunk, "/robot2/pi0_policy_node/action_chunk",
                                chunks2.append, 10)
    try:
        assert h.transition("configure") and h.transition("activate")
        assert node2.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node2.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert h.node.get_fully_qualified_name() == "/robot1/pi0_policy_node"
        h.wait_for_subscribers([(Image, f"/robot{i}/camera/image_raw") for i in (1, 2)]
                               + [(JointState, f"/robot{i}/joint_states") for i in (1, 2)])
        chunk = _new_chunk(h, lambda: _publish_set(h, ns="/robot1"))
        np.testing.assert_allclose(conv.msg_to_chunk(chunk)[0], [0.1, 0.2, 0.3], atol=1e-6)
        assert not chunks2 and control2.calls == 1, "robot2's node inferred on robot1's inputs"
        assert "rejected.stamp_out_of_order" not in node2.counts()
        n1 = h.n("chunks")
        wait_for(lambda: (_publish_set(h, positions=(1.0, 2.0, 3.0), ns="/robot2") and False)
                 or chunks2, WAIT, what="a chunk from /robot2")
        np.testing.assert_allclose(conv.msg_to_chunk(chunks2[-1])[0], [1.0, 2.0, 3.0], atol=1e-6)
        assert all(conv.msg_to_chunk(c)[0][0] < 0.5 for c in h.chunks[n1 - 1:]), \
            "robot1's node published robot2's state"
    finally:
        node2.stop()
        executor2.shutdown(timeout_sec=WAIT)
        node2.destroy_node()
        h.close()


# -- item 2: undeclared parameters -----------------------------------------------------------


def test_undeclared_parameter_refuses_configure_naming_the_closest():
    h = Harness({**OVERRIDES, "sync.slope": 0.1})
    try:
        assert not h.transition("configure")
        assert h.state() == "unconfigured"
        assert "'sync.slope' (did you mean 'sync.slop'?)" in h.node.configure_error
    finally:
        h.close()


def test_undeclared_parameter_in_a_params_file_refuses_configure(tmp_path):
    from ros_helpers import fresh_domain_id

    path = tmp_path / "typo.yaml"
    path.write_text("/**:\n  ros__parameters:\n    max_input_age_s: 2.0\n"
                    "    cameras:\n      topic: [/cam]\n")
    ctx = rclpy.Context()
    rclpy.init(args=["--ros-args", "--params-file", str(path), "-p", "checkpoint:=/c",
                     "-p", "prompt:=pick", "-p", "joint_states.names:=[a]",
                     "-p", "actions.joint_names:=[a]"], context=ctx, domain_id=fresh_domain_id())
    try:
        node = PolicyNode(context=ctx, policy_factory=fake_factory(FakeControl()))
        try:
            assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
            error = node.configure_error
            assert "'max_input_age_s' (did you mean 'max_input_age'?)" in error, error
            assert "'cameras.topic' (did you mean 'cameras.topics'?)" in error, error
        finally:
            node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)


# -- item 3 + enable: live parameters --------------------------------------------------------


def test_param_set_prompt_through_the_service_applies_at_once(h):
    """What `ros2 param set /policy prompt "..."` does: the SetParameters service."""
    client = h.robot.create_client(SetParameters, "/policy/set_parameters")
    value = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value="open the drawer")
    result = _call(h, client, SetParameters.Request(
        parameters=[ParameterMsg(name="prompt", value=value)])).results[0]
    assert result.successful, result.reason
    _new_chunk(h)
    assert h.control.seen_prompts[-1] == "open the drawer"


def test_param_set_max_rate_applies(h):
    result = h.node.set_parameters([_parameter("max_rate", 4.0)])[0]
    assert result.successful, result.reason
    assert h.node.pipeline.min_period == pytest.approx(0.25)


@pytest.mark.parametrize(("name", "value", "match"), [
    ("sync.slop", 0.2, "read at configure only"),
    ("cameras.topics", ["/other"], "read at configure only"),
    ("max_rate", -1.0, "max_rate must be"),
    ("prompt", "   ", "empty prompt"),
    ("prompt", "x" * 5000, "max_prompt_length"),
])
def test_param_set_refuses_with_a_reason(h, name, value, match):
    before = h.node.get_parameter(name).value
    result = h.node.set_parameters([_parameter(name, value)])[0]
    assert not result.successful and match in result.reason, result.reason
    assert h.node.get_parameter(name).value == before


def test_enable_service_pauses_and_resumes_without_a_transition(h):
    client = h.robot.create_client(SetBool, "/policy/enable")
    response = _call(h, client, SetBool.Request(data=False))
    assert response.success, response.message
    assert h.node.get_parameter("enabled").value is False
    assert h.state() == "active"
    n, calls = h.n("chunks"), h.control.calls
    before = h.node.counts().get("rejected.disabled", 0)
    for _ in range(5):
        _publish_set(h)
    h.wait_count("rejected.disabled", before + 3)
    assert h.n("chunks") == n and h.control.calls == calls
    level, message, _ = h.node.diagnostics()
    assert "paused" in message
    response = _call(h, client, SetBool.Request(data=True))
    assert response.success and h.node.get_parameter("enabled").value is True
    _new_chunk(h)


# -- item 4: configure off the executor thread ------------------------------------------------


def test_configure_keeps_lifecycle_services_and_diagnostics_answering():
    gate = threading.Event()
    h = Harness(OVERRIDES, control=FakeControl(load_gate=gate))
    try:
        future = h.transition_async("configure")
        assert h.control.loading.wait(WAIT)
        get_state = h.robot.create_client(GetState, "/policy/get_state")
        for _ in range(3):  # answered while the model is still loading
            assert _call(h, get_state, GetState.Request()).current_state.label == "configuring"
        n = h.n("diagnostics")

        def loading_published():
            with h.lock:
                return any("loading" in s.message for d in h.diagnostics[n:] for s in d.status)

        wait_for(loading_published, WAIT, what="/diagnostics saying 'loading' during configure")
        assert not future.done()
        gate.set()
        done = threading.Event()
        future.add_done_callback(lambda _f: done.set())
        assert done.wait(WAIT) and future.result().success
        assert h.state() == "inactive"
    finally:
        gate.set()
        h.close()


# -- item 6: errors that name the parameter to fix -------------------------------------------


def test_state_dimension_mismatch_names_joint_states_names():
    h = Harness(OVERRIDES, control=FakeControl(state_dim=8))
    try:
        assert not h.transition("configure")
        error = h.node.configure_error
        assert "joint_states.names has 3 names" in error and "8 dims" in error, error
    finally:
        h.close()


# -- item 14: the fault probe's inputs --------------------------------------------------------


def test_duplicate_joint_names_are_rejected(h):
    before = h.node.counts().get("rejected.duplicate_joint", 0)
    _publish_set(h, positions=(0.1, 0.2, 0.3, 0.4), names=[*STATE_NAMES, "j1"])
    h.wait_count("rejected.duplicate_joint", before + 1)
    assert "j1" in h.node.last_rejection


def test_absurd_state_is_rejected_naming_the_joint(h):
    before = h.node.counts().get("rejected.absurd_state", 0)
    _publish_set(h, positions=(0.1, 1e6, 0.3))
    h.wait_count("rejected.absurd_state", before + 1)
    assert "j2=1e+06" in h.node.last_rejection


def test_huge_image_header_is_refused_before_decoding(h):
    before = h.node.counts().get("rejected.image_too_large", 0)
    image = conv.rgb_to_image(RGB, "rgb8")
    image.width = image.height = 9000  # the header lies: refused before the data is read
    image.header.stamp = conv.ns_to_stamp(h.now_ns())
    h.publish(Image, CAM, image)
    h.wait_count("rejected.image_too_large", before + 1)
    assert "9000x9000" in h.node.last_rejection


def test_huge_prompt_on_the_topic_is_refused_and_logged_sanitized(h):
    before = h.node.counts().get("rejected.prompt_too_long", 0)
    h.publisher(String, "/policy/prompt").publish(String(data="\x1b[31mred\n" + "x" * 1_000_000))
    h.wait_count("rejected.prompt_too_long", before + 1)
    assert h.node.pipeline.prompt == OVERRIDES["prompt"]
    text = h.node.last_rejection
    assert len(text) < 1000 and "\x1b" not in text and "\n" not in text, text[:200]


def test_clock_going_backwards_recovers_without_a_transition():
    """Sim time (a looping bag, a simulator reset): the clock jumps back; chunks resume."""
    h = Harness({**OVERRIDES, "use_sim_time": True})
    clock_pub = h.publisher(Clock, "/clock")

    def at(ns):
        clock_pub.publish(Clock(clock=conv.ns_to_stamp(ns)))
        wait_for(lambda: h.node.get_clock().now().nanoseconds == ns, WAIT, what="sim time")
        return ns

    try:
        h.wait_for_subscribers([(Clock, "/clock")])
        at(1000 * 10**9)
        assert h.transition("configure") and h.transition("activate")
        h.wait_for_subscribers([(Image, CAM), (JointState, JOINTS)])
        t = [1000 * 10**9]

        def step():
            t[0] += 50_000_000
            _publish_set(h, at(t[0]))

        _new_chunk(h, step)
        t[0] = 10 * 10**9  # the bag starts over
        _new_chunk(h, step)
        assert h.node.counts().get("clock_jumps_back", 0) >= 1
    finally:
        h.close()
