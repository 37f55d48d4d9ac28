"""pi0-ros-replay: deterministic offline replay of the synthetic demo bag, --compare pass / fail,
parameter-file handling, errors, and the live player (subprocess, private ROS domain)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from pi0_ros.tools import make_demo, replay

ROOT = Path(__file__).resolve().parents[1]
BAG_SECONDS = 3.0  # short synthetic bag: ~15 inferences at the 5 Hz cap
PERTURBATION = 0.05  # added to action_out_proj.bias of the perturbed checkpoint
ATOL = 1e-4  # --compare tolerance for the perturbed-checkpoint failure case
LIVE_TIMEOUT = 60.0  # s for the live player subprocess (interpreter + DDS on a loaded runner)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return make_demo.make_demo(out, make_demo.DemoSpec(duration=BAG_SECONDS))


@pytest.fixture(scope="module")
def golden(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("golden")
    return replay.run_offline(demo["bag"], demo["params"], out, seed=7)


def _npz(path):
    with np.load(path) as data:
        return data["stamps"], data["actions"]


def test_action_chunk_definition_matches_interface():
    from rosbags.typesys import get_types_from_msg

    text = (ROOT / "msg" / "msg" / "ActionChunk.msg").read_text()
    ours = get_types_from_msg(replay.ACTION_CHUNK_MSG, replay.ACTION_CHUNK_TYPE)
    theirs = get_types_from_msg(text, replay.ACTION_CHUNK_TYPE)
    assert ours == theirs


def test_replay_writes_bag_report_and_plots(demo, golden):
    res = golden.result
    assert len(res.chunks) >= 10  # 3 s at the 5 Hz cap
    assert res.counts["rate_limited"] > 0
    assert len(res.commands) > 100
    stamps, actions = _npz(golden.chunks_file)
    assert actions.shape == (len(res.chunks), make_demo.DemoSpec.action_horizon, 8)
    bag_stamps, bag_chunks = replay.read_action_chunks(golden.bag)
    np.testing.assert_array_equal(bag_stamps, stamps)
    np.testing.assert_array_equal(np.stack(bag_chunks), actions)
    report = golden.report.read_text()
    for text in ("Latency", "p99", "Seams", "rate_limited", "panda_joint1", "plots/"):
        assert text in report
    assert len(golden.plots) == 8
    for png in golden.plots:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    from rosbags.rosbag2 import Reader

    with Reader(golden.bag) as reader:
        topics = {c.topic: c.msgtype for c in reader.connections}
    assert topics["/pi0_policy_node/action_chunk"] == replay.ACTION_CHUNK_TYPE
    assert topics["/pi0_policy_node/trajectory"] == "trajectory_msgs/msg/JointTrajectory"
    assert topics["/diagnostics"] == "diagnostic_msgs/msg/DiagnosticArray"
    assert topics["/pi0_executor_node/joint_command"] == "sensor_msgs/msg/JointState"


def test_replay_drives_the_streaming_executor_within_its_limits(demo, golden):
    """The commands come from pi0_ros.control configured by the file's executor section (the
    demo's Panda limits), at its control rate, and respect those limits."""
    res = golden.result
    assert res.executor_name.startswith("pi0_ros.control.StreamingExecutor")
    assert res.executor_events["chunks_accepted"] >= len(res.chunks) - 2
    spec = make_demo.executor_parameters()
    times = np.asarray(res.command_times, np.int64)
    period = np.diff(times) / 1e9
    np.testing.assert_allclose(period, 1.0 / spec["control_rate"], rtol=1e-6)
    q = np.asarray(res.commands)
    assert np.all(q >= np.asarray(spec["position_min"]) - 1e-9)
    assert np.all(q <= np.asarray(spec["position_max"]) + 1e-9)
    v = np.diff(q, axis=0) / period[:, None]
    assert np.all(np.abs(v) <= np.asarray(spec["velocity_max"]) * (1 + 1e-6) + 1e-9)


def test_two_runs_identical_actions_and_compare_passes(demo, golden, tmp_path):
    rc = replay.main([str(demo["bag"]), "--config", str(demo["params"]), "--output",
                      str(tmp_path), "--seed", "7", "--compare", str(golden.bag), "--atol", "0",
                      "--no-plots", "--quiet"])
    assert rc == 0
    _, a = _npz(golden.chunks_file)
    _, b = _npz(tmp_path / "chunks.npz")
    assert a.tobytes() == b.tobytes()


def test_other_seed_differs(demo, golden, tmp_path):
    out = replay.run_offline(demo["bag"], demo["params"], tmp_path, seed=8, plots=False,
                             compare=golden.bag, atol=0.0)
    assert not out.comparison.ok and "differ" in out.comparison.message


def test_perturbed_checkpoint_fails_compare(demo, golden, tmp_path, capsys):
    ckpt = tmp_path / "perturbed"
    shutil.copytree(demo["checkpoint"], ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["action_out_proj.bias"] = tensors["action_out_proj.bias"] + np.float32(PERTURBATION)
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    rc = replay.main([str(demo["bag"]), "--config", str(demo["params"]), "--checkpoint",
                      str(ckpt), "--output", str(tmp_path / "out"), "--seed", "7", "--compare",
                      str(golden.bag), "--atol", str(ATOL), "--no-plots", "--quiet"])
    assert rc == 1
    assert "FAIL" in capsys.readouterr().out
    assert "FAIL" in (tmp_path / "out" / "report.md").read_text()


def test_mcap_bag_gives_the_same_actions(demo, golden, tmp_path):
    spec = make_demo.DemoSpec(duration=BAG_SECONDS)
    make_demo.make_bag(tmp_path / "bag_mcap", spec, storage="mcap")
    out = replay.run_offline(tmp_path / "bag_mcap", demo["params"], tmp_path / "out", seed=7,
                             plots=False, storage="mcap", compare=golden.bag, atol=0.0)
    assert out.comparison.ok, out.comparison.message


def test_shipped_droid_config_replays_the_demo_bag(demo, tmp_path):
    out = replay.run_offline(demo["bag"], ROOT / "config" / "droid_policy.yaml", tmp_path,
                             checkpoint=str(demo["checkpoint"]), plots=False, duration=1.0)
    assert len(out.result.chunks) >= 3


def test_compare_actions_cases():
    s = np.array([1, 2], np.int64)
    a = [np.zeros((4, 2), np.float32), np.ones((4, 2), np.float32)]
    assert replay.compare_actions(s, a, s, a, 0.0).ok
    b = [a[0], a[1] + np.float32(1e-3)]
    assert replay.compare_actions(s, b, s, a, 1e-2).ok
    assert not replay.compare_actions(s, b, s, a, 1e-4).ok
    assert "count" in replay.compare_actions(s[:1], a[:1], s, a, 0).message
    assert "stamp" in replay.compare_actions(s + 1, a, s, a, 0).message
    assert "shape" in replay.compare_actions(s, [a[0][:3], a[1]], s, a, 0).message


def test_node_parameters_sections_and_nesting(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(
        "/**:\n  ros__parameters:\n    max_rate: 3.0\n    sync: {slop: 0.01}\n"
        "/ns/pi0_policy_node:\n  ros__parameters:\n    max_rate: 4.0\n"
        "    cameras:\n      topics: [/a]\n"
        "other_node:\n  ros__parameters:\n    max_rate: 9.0\n"
    )
    params = replay.node_parameters(f, "pi0_policy_node")
    assert params == {"max_rate": 4.0, "sync.slop": 0.01, "cameras.topics": ["/a"]}


def test_errors_exit_2(demo, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(demo["params"].read_text().replace("/joint_states", "/no_such_topic"))
    rc = replay.main([str(demo["bag"]), "--config", str(bad), "--output", str(tmp_path / "o"),
                      "--quiet"])
    assert rc == 2 and "/no_such_topic" in capsys.readouterr().err
    rc = replay.main([str(tmp_path), "--config", str(demo["params"]), "--output",
                      str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "not a rosbag2 bag" in capsys.readouterr().err
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(demo["params"].read_text().replace("max_rate: 5.0", "max_rate: -1.0"))
    rc = replay.main([str(demo["bag"]), "--config", str(invalid), "--output",
                      str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "max_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        replay.main([str(demo["bag"]), "--output", str(tmp_path / "o")])  # no --config


def test_live_mode_publishes_bag_with_clock(demo):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import JointState

    from ros_helpers import fresh_domain_id

    domain = fresh_domain_id()
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=domain)
    node = rclpy.create_node("live_listener", context=ctx)
    joints, clocks = [], []
    qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(JointState, "/joint_states", joints.append, qos)
    node.create_subscription(Clock, "/clock", clocks.append, qos)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    env = {**os.environ, "ROS_DOMAIN_ID": str(domain),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pi0_ros.tools.replay", str(demo["bag"]), "--live", "--clock",
         "--rate", "3", "--topics", "/joint_states", "--wait", "20"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + LIVE_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        for _ in range(20):
            executor.spin_once(timeout_sec=0.05)
        output = proc.communicate(timeout=5)[0] if proc.poll() is not None else ""
        assert proc.returncode == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    expected = int(BAG_SECONDS * make_demo.DemoSpec.joint_rate) + 1
    assert len(joints) >= expected * 0.9, (len(joints), output)
    assert clocks, output
    stamps = [c.clock.sec * 10**9 + c.clock.nanosec for c in clocks]
    assert stamps == sorted(stamps)
    assert stamps[0] >= make_demo.START_NS


def test_without_pi0_ros_msgs_the_rosbags_type_writes_the_same_chunks(demo, golden, tmp_path,
                                                                      monkeypatch):
    from pi0_ros.ros import conversions

    def missing(*args, **kwargs):
        raise ImportError("No module named 'pi0_ros_msgs'")

    monkeypatch.setattr(conversions, "chunk_to_msg", missing)
    out = replay.run_offline(demo["bag"], demo["params"], tmp_path, seed=7, plots=False)
    stamps, chunks = replay.read_action_chunks(out.bag)
    g_stamps, g_chunks = replay.read_action_chunks(golden.bag)
    assert replay.compare_actions(stamps, chunks, g_stamps, g_chunks, 0.0).ok
