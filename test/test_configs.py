"""Every shipped parameter file (config/*.yaml) configures its node: through the one mapping
function without rclpy, and as a real ``--params-file`` of an rclpy node (rcl's YAML parser, the
node's declarations). config/pi0_ros.rviz is a well-formed rviz2 file showing the node's topics."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from pi0_ros.tools import replay

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config"
POLICY_NODE = "pi0_policy_node"
EXECUTOR_NODE = "pi0_executor_node"
ROBOT_CONFIGS = {"aloha_policy.yaml": (3, 14), "droid_policy.yaml": (2, 8)}  # cameras, dims


def _sections(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict) and doc, f"{path.name}: not a ros-args parameter file"
    for key, section in doc.items():
        assert "ros__parameters" in section, f"{path.name}: section {key} lacks ros__parameters"
    return doc


def _nodes(path: Path) -> set[str]:
    return {str(k).rstrip("/").split("/")[-1] for k in _sections(path)}


def _policy_files() -> list[Path]:
    return sorted(p for p in CONFIG.glob("*.yaml")
                  if _nodes(p) & {POLICY_NODE, "**"} and p.name != "executor.yaml")


def _executor_files() -> list[Path]:
    return sorted(p for p in CONFIG.glob("*.yaml")
                  if EXECUTOR_NODE in _nodes(p) or p.name == "executor.yaml")


def test_every_yaml_is_a_parameter_file():
    files = sorted(CONFIG.glob("*.yaml"))
    assert {p.name for p in files} >= set(ROBOT_CONFIGS)
    for path in files:
        _sections(path)


@pytest.mark.parametrize("path", _policy_files(), ids=lambda p: p.name)
def test_policy_file_maps_onto_node_config(path):
    params = replay.node_parameters(path, POLICY_NODE)
    from pi0_ros.ros.params import PARAMETERS

    unknown = set(params) - set(PARAMETERS) - {"use_sim_time"}
    assert not unknown, f"{path.name}: parameters the node does not declare: {sorted(unknown)}"
    params.setdefault("checkpoint", "/some/checkpoint")
    if not params["checkpoint"]:
        params["checkpoint"] = "/some/checkpoint"
    config = replay.policy_config(params)  # raises on an invalid value
    if path.name in ROBOT_CONFIGS:
        cams, dims = ROBOT_CONFIGS[path.name]
        assert len(config.cameras) == cams
        assert len(config.state_joint_names) == len(config.action_joint_names) == dims
        assert all(c.slot for c in config.cameras)


def test_aloha_layout():
    config = replay.policy_config({**replay.node_parameters(CONFIG / "aloha_policy.yaml",
                                                            POLICY_NODE), "checkpoint": "/c"})
    assert [c.slot for c in config.cameras] == ["base_0_rgb", "left_wrist_0_rgb",
                                               "right_wrist_0_rgb"]
    assert [c.topic.split("/")[1] for c in config.cameras] == ["cam_high", "cam_left_wrist",
                                                              "cam_right_wrist"]


class FakePolicy:
    """Stands in for the checkpoint: the right action width, no weights."""

    model_name = "fake"
    noise_shape = None
    state_dim = None
    rtc = None

    def prompt_fit(self, prompt, state):
        return None

    def __init__(self, config, slots):
        self.dims = len(config.action_joint_names)
        self.camera_slots = tuple(s or f"slot{i}" for i, s in enumerate(slots))

    def status(self):
        return {}

    def prepare_image(self, rgb, name):
        return rgb

    def infer(self, obs, noise=None):
        return {"actions": np.zeros((10, self.dims), np.float32)}

    def close(self):
        pass


def _has_msgs() -> bool:
    try:
        importlib.import_module("pi0_ros_msgs.msg")
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("configure", (
    False,
    pytest.param(True, marks=pytest.mark.skipif(
        not _has_msgs(), reason="configure creates the ActionChunk publisher: pi0_ros_msgs is "
        "not built into this environment")),
), ids=("parameters", "configure"))
@pytest.mark.parametrize("ns", ("", "/robot1"), ids=("root", "namespaced"))
@pytest.mark.parametrize("path", _policy_files(), ids=lambda p: p.name)
def test_policy_file_loads_into_the_rclpy_node(path, ns, configure):
    """rcl parses the file as --params-file; the node's declared parameters read it back into
    the same NodeConfig, also when the node runs in a namespace (launch namespace:=, issue 13:
    a section keyed by the bare node name does not reach /robot1/pi0_policy_node); configure
    succeeds (fake policy)."""
    import rclpy
    from ros_helpers import fresh_domain_id

    from pi0_ros.ros.node import PolicyNode
    from pi0_ros.ros.params import config_from_parameters, get_param

    ctx = rclpy.Context()
    remap = ["-r", f"__ns:={ns}"] if ns else []
    rclpy.init(args=["--ros-args", "--params-file", str(path), "-p", "checkpoint:=/some/ckpt",
                     *remap], context=ctx, domain_id=fresh_domain_id())
    try:
        node = PolicyNode(context=ctx, policy_factory=FakePolicy)
        assert node.get_namespace() == (ns or "/")
        try:
            config = config_from_parameters(lambda name: get_param(node, name))
            expected = replay.policy_config({**replay.node_parameters(path, POLICY_NODE),
                                             "checkpoint": "/some/ckpt"})
            assert config == expected
            if configure:
                from rclpy.lifecycle import TransitionCallbackReturn

                assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        finally:
            node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)


@pytest.mark.parametrize("path", _executor_files(), ids=lambda p: p.name)
def test_executor_file_maps_onto_executor_config(path):
    from pi0_ros.ros.executor_node import PARAMETERS, config_from_parameters

    params = replay.node_parameters(path, EXECUTOR_NODE)
    unknown = set(params) - set(PARAMETERS) - {"use_sim_time"}
    assert not unknown, f"{path.name}: parameters the node does not declare: {sorted(unknown)}"
    config = config_from_parameters(lambda name: params.get(name, PARAMETERS[name][0]))
    if path.name in ROBOT_CONFIGS:  # the executor commands the joints the policy's chunks name
        policy = replay.policy_config({**replay.node_parameters(path, POLICY_NODE),
                                       "checkpoint": "/c"})
        assert config.executor.joint_names == tuple(policy.action_joint_names)
        lo, hi = np.asarray(config.executor.position_min), np.asarray(config.executor.position_max)
        assert np.all(lo < hi)


@pytest.mark.parametrize("path", _executor_files(), ids=lambda p: p.name)
def test_executor_file_loads_into_the_rclpy_node_and_configures(path):
    """rcl parses the file as --params-file of pi0_executor_node; configure succeeds with the
    same configuration the mapping gives without rclpy."""
    import rclpy
    from ros_helpers import fresh_domain_id

    from pi0_ros.ros.executor_node import (
        PARAMETERS,
        SUCCESS,
        ExecutorNode,
        config_from_node,
        config_from_parameters,
    )

    ctx = rclpy.Context()
    rclpy.init(args=["--ros-args", "--params-file", str(path)], context=ctx,
               domain_id=fresh_domain_id())
    try:
        node = ExecutorNode(context=ctx)
        try:
            params = replay.node_parameters(path, EXECUTOR_NODE)
            expected = config_from_parameters(lambda n: params.get(n, PARAMETERS[n][0]))
            assert config_from_node(node) == expected
            assert node.trigger_configure() == SUCCESS
            assert node.trigger_cleanup() == SUCCESS
        finally:
            node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)


def _displays(tree):
    for display in tree:
        yield display
        yield from _displays(display.get("Displays", []))


def test_rviz_config_shows_the_node_topics():
    doc = yaml.safe_load((CONFIG / "pi0_ros.rviz").read_text())
    assert {"Panels", "Visualization Manager", "Window Geometry"} <= set(doc)
    manager = doc["Visualization Manager"]
    displays = list(_displays(manager["Displays"]))
    by_class: dict[str, list] = {}
    for d in displays:
        assert d["Class"].startswith(("rviz_default_plugins/", "rviz_common/")), d["Class"]
        by_class.setdefault(d["Class"].split("/")[1], []).append(d)
    markers = by_class["MarkerArray"]
    assert [m["Topic"]["Value"] for m in markers] == [f"/{POLICY_NODE}/markers"]
    robots = by_class["RobotModel"]
    assert sorted(r.get("TF Prefix", "") for r in robots) == ["", "planned"]
    ghost = next(r for r in robots if r.get("TF Prefix") == "planned")
    assert ghost["Alpha"] < 1
    topics = {d["Topic"]["Value"] for d in by_class["Image"]}
    droid = replay.node_parameters(CONFIG / "droid_policy.yaml", POLICY_NODE)["cameras.topics"]
    aloha = replay.node_parameters(CONFIG / "aloha_policy.yaml", POLICY_NODE)["cameras.topics"]
    assert set(droid) | set(aloha) <= topics
    assert manager["Global Options"]["Fixed Frame"]
