"""pi0-ros-replay: deterministic offline replay of the synthetic demo bag, --compare pass / fail,
parameter-file handling, errors, and the live player (subprocess, private ROS domain)."""

from __future__ import annotations

import contextlib
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
    assert res.executor_name.startswith("pi0_ros.control.ExecutorDriver")
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
    text = capsys.readouterr().out
    assert "FAIL" in text and "joint panda_" in text  # the worst action named by its joint
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


@contextlib.contextmanager
def _live_player(demo, *flags: str, depth: int = 100):
    """``pi0-ros-replay BAG --live --clock --rate 3 --topics /joint_states FLAGS`` in a subprocess
    on a fresh domain, and a listener recording /joint_states and /clock; yields (process,
    joints, clocks, spin_once)."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import JointState

    from ros_helpers import fresh_domain_id, ros_env

    domain = fresh_domain_id()
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=domain)
    node = rclpy.create_node("live_listener", context=ctx)
    joints, clocks = [], []
    qos = QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(JointState, "/joint_states", joints.append, qos)
    node.create_subscription(Clock, "/clock", clocks.append, qos)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pi0_ros.tools.replay", str(demo["bag"]), "--live", "--clock",
         *flags, "--rate", "3", "--topics", "/joint_states", "--wait", "20"],
        env=ros_env(domain), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        yield proc, joints, clocks, lambda: executor.spin_once(timeout_sec=0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=ctx)


def test_live_mode_publishes_bag_with_clock(demo):
    with _live_player(demo) as (proc, joints, clocks, spin_once):
        deadline = time.monotonic() + LIVE_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            spin_once()
        for _ in range(20):
            spin_once()
        output = proc.communicate(timeout=5)[0] if proc.poll() is not None else ""
        assert proc.returncode == 0, output
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
    monkeypatch.setattr(replay, "_msgs_built", lambda: False)
    out = replay.run_offline(demo["bag"], demo["params"], tmp_path, seed=7, plots=False)
    stamps, chunks = replay.read_action_chunks(out.bag)
    g_stamps, g_chunks = replay.read_action_chunks(golden.bag)
    assert replay.compare_actions(stamps, chunks, g_stamps, g_chunks, 0.0).ok


# ---------------------------------------------------------------------------------------------
# issue 13, item 7: prompt topics, --loop, live-mode flags, the report's prompt, joint names


def _write_bag(path: Path, messages) -> Path:
    """A bag of make_demo-style (log ns, topic, type, rosbags message) tuples."""
    from rosbags.rosbag2 import Writer

    store = make_demo.typestore()
    writer = Writer(path, version=8)
    writer.open()
    conns = {}
    for stamp, topic, typ, msg in sorted(messages, key=lambda m: m[0]):
        if topic not in conns:
            conns[topic] = writer.add_connection(topic, typ, typestore=store)
        writer.write(conns[topic], stamp, store.serialize_cdr(msg, typ))
    writer.close()
    return path


def _string(text: str):
    return make_demo.typestore().types["std_msgs/msg/String"](data=text)


RAW_PROMPT = "pick_up the\nred *block*"  # what a bag no one here wrote may carry


def test_the_bags_own_prompt_topic_is_read_and_the_report_shows_the_model_prompt(demo,
                                                                                 tmp_path):
    """A bag whose prompt is on /prompt (not /pi0_policy_node/prompt) drives the prompt without
    --prompt-topic; the report shows what the model sees (openpi's clean_prompt), escaped for
    markdown, on one line."""
    spec = make_demo.DemoSpec(duration=1.0, prompt_topic="/prompt", prompt=RAW_PROMPT)
    bag = make_demo.make_bag(tmp_path / "bag", spec)
    out = replay.run_offline(bag, demo["params"], tmp_path / "out", seed=7, duration=1.0)
    assert out.result.prompt == RAW_PROMPT
    assert out.result.chunks
    lines = out.report.read_text().splitlines()
    (line,) = [ln for ln in lines if ln.startswith("- prompt (as the model sees it)")]
    assert line.endswith('"pick up the red \\*block\\*"'), line
    (given,) = [ln for ln in lines if ln.startswith("- prompt as given")]
    assert "\\\\n" in given and "\\_" in given, given  # visible \n, escaped _
    assert not any(ln.startswith("red") for ln in lines)  # no raw newline split the line


def test_unread_prompt_topics_are_warned_about(demo, tmp_path, caplog):
    spec = make_demo.DemoSpec(duration=1.0)
    extra = (make_demo.START_NS + 1, "/task/instruction", "std_msgs/msg/String",
             _string("stack the cups"))
    bag = _write_bag(tmp_path / "bag", [*make_demo.bag_messages(spec), extra])
    with caplog.at_level("WARNING", logger="pi0_ros.tools.replay"):
        out = replay.run_offline(bag, demo["params"], tmp_path / "out", plots=False,
                                 duration=0.5)
    assert out.result.prompt == spec.prompt  # /pi0_policy_node/prompt wins
    warned = [r.getMessage() for r in caplog.records if "/task/instruction" in r.getMessage()]
    assert warned and "--prompt-topic /task/instruction" in warned[0]
    out = replay.run_offline(bag, demo["params"], tmp_path / "out2", plots=False,
                             duration=0.5, prompt_topic="/task/instruction")
    assert out.result.prompt == "stack the cups"
    with pytest.raises(replay.ReplayError, match=r"--prompt-topic /nope: not in the bag"):
        replay.run_offline(bag, demo["params"], tmp_path / "out3", prompt_topic="/nope")


def test_choose_prompt_topic():
    s = "std_msgs/msg/String"
    node = "pi0_policy_node"
    both = [("/pi0_policy_node/prompt", s), ("/prompt", s), ("/joint_states", "x/msg/J")]
    assert replay.choose_prompt_topic(both, node) == ("/pi0_policy_node/prompt", ["/prompt"])
    assert replay.choose_prompt_topic(both[1:], node) == ("/prompt", [])
    two = [("/a/prompt", s), ("/b/prompt", s)]
    assert replay.choose_prompt_topic(two, node) == (None, ["/a/prompt", "/b/prompt"])
    assert replay.choose_prompt_topic(two, node, "/b/prompt") == ("/b/prompt", ["/a/prompt"])
    with pytest.raises(replay.ReplayError, match="is x/msg/J"):
        replay.choose_prompt_topic(both, node, "/joint_states")


def test_live_mode_refuses_unknown_flags(demo, capsys):
    with pytest.raises(SystemExit) as info:
        replay.main([str(demo["bag"]), "--live", "--bogus", "--wait", "0"])
    assert info.value.code == 2
    assert "--bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        replay.main([str(demo["bag"]), "--config", str(demo["params"]), "--output", "/tmp/x",
                     "--loop"])  # --loop is a live option


def test_compare_failure_names_the_joint():
    s = np.array([1], np.int64)
    a = [np.zeros((4, 3), np.float32)]
    b = [a[0].copy()]
    b[0][2, 1] = 0.5
    msg = replay.compare_actions(s, b, s, a, 1e-3, ("j0", "elbow", "gripper")).message
    assert "step 2, joint elbow (dim 1)" in msg, msg
    assert "dim 1" in replay.compare_actions(s, b, s, a, 1e-3).message  # without names


def test_live_loop_plays_again_with_the_clock_going_back(demo):
    """--live --loop replays the bag until interrupted (/clock jumps back to the bag start each
    pass); SIGINT ends it with status 0."""
    import signal

    per_pass = int(BAG_SECONDS * make_demo.DemoSpec.joint_rate) + 1
    # a deep queue: no drops when the runner is slow
    with _live_player(demo, "--loop", depth=2000) as (proc, joints, clocks, spin_once):
        deadline = time.monotonic() + LIVE_TIMEOUT
        while (proc.poll() is None and time.monotonic() < deadline
               and len(joints) < 1.5 * per_pass):
            spin_once()
        assert proc.poll() is None, proc.communicate()[0]  # still playing after one pass
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=LIVE_TIMEOUT)[0]
        assert proc.returncode == 0, output
    assert len(joints) >= 1.5 * per_pass, (len(joints), output)
    assert "looping" in output
    stamps = [c.clock.sec * 10**9 + c.clock.nanosec for c in clocks]
    assert any(b < a for a, b in zip(stamps, stamps[1:])), "the clock never went back"
    joint_stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in joints]
    assert any(b < a for a, b in zip(joint_stamps, joint_stamps[1:])), "played only once"


def test_relative_topics_resolve_like_the_node(demo, golden, tmp_path):
    """config/policy_node.yaml's relative topics (``joint_states``) are what a node in the root
    namespace subscribes to (``/joint_states``): the replay resolves them the same way."""
    import yaml

    doc = yaml.safe_load(Path(demo["params"]).read_text())
    section = doc[make_demo.POLICY_NODE]["ros__parameters"]
    section["cameras.topics"] = [t.lstrip("/") for t in section["cameras.topics"]]
    section["joint_states.topic"] = "joint_states"
    params = tmp_path / "relative.yaml"
    params.write_text(yaml.safe_dump(doc))
    out = replay.run_offline(demo["bag"], params, tmp_path / "out", seed=7, plots=False)
    assert out.digest == golden.digest
