"""The live node and the offline replay run one pipeline: same bag, seed and parameters -> the
same chunks for the same observations, the same rejection names and diagnostics levels.

The live side is the real ``pi0_policy_node`` process (sim time) fed by ``pi0-ros-replay --live
--clock``. It may skip observations while it infers, and which set the approximate-time
synchronizer forms depends on the order DDS delivers messages across topics, so the offline side
re-runs exactly the observations the live node answered (their ``input_stamps``). Cases: the demo
parameter file, the same file with ``cameras.slots`` unset (resolved from the checkpoint), and a
bag whose exterior camera goes silent for longer than ``max_input_age``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from ros_helpers import NodeProcess, fresh_domain_id, python_node, ros_env

pytest.importorskip("pi0_ros_msgs.msg", reason="pi0_ros_msgs is not built into this environment")

from pi0_ros.tools import make_demo, replay  # noqa: E402

BAG_SECONDS = 4.0
SILENT = (1.4, 2.6)  # s of bag time without the exterior camera (max_input_age is 0.5 s)
NODE = make_demo.POLICY_NODE
LIVE_TIMEOUT = 120.0  # s: node start (model load, warm-up) + playing the bag on a loaded runner
ACTIONS_ATOL = 0.0  # one implementation, same inputs, same noise, same threads: identical


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo.make_demo(tmp_path_factory.mktemp("parity"),
                               make_demo.DemoSpec(duration=BAG_SECONDS))


def _params_without_slots(params: Path, out: Path) -> Path:
    doc = yaml.safe_load(params.read_text())
    del doc[NODE]["ros__parameters"]["cameras.slots"]
    out.write_text(yaml.safe_dump(doc))
    return out


def _silent_camera_bag(bag: Path, out: Path) -> Path:
    """The demo bag without the exterior camera's messages during SILENT (bag time)."""
    from rosbags.rosbag2 import Reader, Writer

    topic = make_demo.DemoSpec.exterior_topic
    with Reader(bag) as reader:
        start = reader.start_time
        lo, hi = (start + int(s * 1e9) for s in SILENT)
        writer = Writer(out, version=8)
        writer.open()
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=replay.typestore())
                 for c in reader.connections}
        for conn, t, raw in reader.messages():
            if conn.topic == topic and lo <= t <= hi:
                continue
            writer.write(conns[conn.id], t, raw)
        writer.close()
    return out


def _run_live(bag: Path, params: Path, log_dir: Path, *extra: str) -> tuple[dict, list]:
    """Chunks {input stamps: actions}, diagnostics [(level, message, values)] of the live node."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from pi0_ros_msgs.msg import ActionChunk
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    domain = fresh_domain_id()
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=domain)
    listener = rclpy.create_node("parity_listener", context=ctx)
    chunks: dict[tuple[int, ...], np.ndarray] = {}
    diags: list = []

    def on_chunk(msg):
        key = tuple(t.sec * 10**9 + t.nanosec for t in msg.input_stamps)
        chunks[key] = np.asarray(msg.actions, np.float32).reshape(msg.horizon, msg.action_dim)

    def on_diag(msg):
        for s in msg.status:
            if s.name.endswith(": policy"):
                diags.append((s.level[0], s.message, {kv.key: kv.value for kv in s.values}))

    qos = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE)
    listener.create_subscription(ActionChunk, f"/{NODE}/action_chunk", on_chunk, qos)
    listener.create_subscription(DiagnosticArray, "/diagnostics", on_diag, qos)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(listener)
    node = NodeProcess(python_node("pi0_ros.ros.node", "--autostart", "--ros-args",
                                   "--params-file", str(params), "-p", "use_sim_time:=true",
                                   *extra),
                       domain, log_dir / "node.log").start()
    player = None
    try:
        deadline = time.monotonic() + LIVE_TIMEOUT
        # (Its diagnostics timer runs on sim time: silent until the player's /clock.)
        while "active: inputs accepted" not in node.output():
            assert node.running and time.monotonic() < deadline, node.output()
            executor.spin_once(timeout_sec=0.1)
        player = NodeProcess(python_node("pi0_ros.tools.replay", str(bag), "--live", "--clock",
                                         "--wait", "20"), domain, log_dir / "player.log").start()
        while player.running:
            assert time.monotonic() < deadline, player.output()
            executor.spin_once(timeout_sec=0.05)
        end = time.monotonic() + 3.0  # the last inference and a diagnostics period
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.05)
        assert player.proc.returncode == 0, player.output()
    finally:
        if player is not None:
            player.stop()
        code = node.stop()
        executor.shutdown()
        listener.destroy_node()
        rclpy.shutdown(context=ctx)
    assert code == 0, node.output()
    return chunks, diags


def _check_parity(bag: Path, params: Path, tmp_path: Path,
                  *extra: str) -> tuple[dict, list, object]:
    live, diags = _run_live(bag, params, tmp_path, *extra)
    assert len(live) >= 5, f"live node published only {len(live)} chunks"
    out = replay.run_offline(bag, params, tmp_path / "offline", plots=False,
                             observations=sorted(live))
    offline = {r.input_stamps: r.actions for r in out.result.chunks}
    assert set(offline) == set(live), (sorted(set(live) ^ set(offline)))
    for key, actions in live.items():
        np.testing.assert_allclose(offline[key], actions, rtol=0, atol=ACTIONS_ATOL,
                                   err_msg=f"observation {key}")
    # The same counters under the same names: every rejected.* / event name of the live node's
    # last diagnostics is one the replay reports too, and vice versa.
    last = diags[-1][2]
    live_names = {k for k in last if k.startswith("rejected.") or k.endswith("_events")}
    offline_names = {k for k in out.result.counts
                     if k.startswith("rejected.") or k.endswith("_events")}
    assert live_names == offline_names, (live_names, offline_names)
    return live, diags, out


def test_demo_file_live_equals_replay(demo, tmp_path):
    _check_parity(demo["bag"], demo["params"], tmp_path)


def test_unset_camera_slots_live_equals_replay(demo, tmp_path):
    params = _params_without_slots(demo["params"], tmp_path / "params.yaml")
    _check_parity(demo["bag"], params, tmp_path)


def test_silent_camera_same_reasons_and_levels(demo, tmp_path):
    bag = _silent_camera_bag(demo["bag"], tmp_path / "silent_bag")
    live, diags, out = _check_parity(bag, demo["params"], tmp_path)
    topic = make_demo.DemoSpec.exterior_topic
    # Both pause with ERROR naming the camera while it is silent, and count the event once.
    assert any(level == 2 and topic in message for level, message, _ in diags), diags
    assert any(level == 2 and topic in message for _, level, message in out.result.diagnostics)
    assert int(diags[-1][2]["input_silent_events"]) == out.result.counts["input_silent_events"]
    assert out.result.counts["input_silent_events"] == 1
    # No chunk from an observation inside the silent window (plus the sync slop).
    start = min(k[-1] for k in live)
    inside = [k for k in live if SILENT[0] + 0.5 < (k[-1] - start) / 1e9 < SILENT[1]]
    assert not inside, inside


def test_remote_mode_equals_local_replay(demo, tmp_path):
    """The node with ``remote.uri`` (pi0-ros-serve on the same checkpoint, loopback) publishes
    the chunks the local pipeline computes: the observation's noise travels with the request."""
    server = NodeProcess(python_node(
        "pi0_ros.tools.serve", "--checkpoint", str(demo["checkpoint"]), "--norm-stats", "demo",
        "--input-keys", "slots", "--device", "cpu", "--port", "0"), fresh_domain_id(),
        tmp_path / "serve.log").start()
    try:
        deadline = time.monotonic() + LIVE_TIMEOUT
        while "serving ws://" not in server.output():
            assert server.running and time.monotonic() < deadline, server.output()
            time.sleep(0.1)
        url = server.output().split("serving ", 1)[1].split()[0]
        live, diags, _ = _check_parity(demo["bag"], demo["params"], tmp_path,
                                       "-p", f"remote.uri:={url}")
    finally:
        assert server.stop() == 0, server.output()
    assert diags[-1][2]["policy.state"] == "connected"


def test_ros_env_is_loopback():  # the helper the live side relies on
    assert ros_env(7)["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
