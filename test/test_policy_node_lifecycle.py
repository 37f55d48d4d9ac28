"""Policy-node lifecycle in process over Fast DDS, driven through /<node>/change_state.

Configure failures (invalid parameters; checkpoint missing, corrupt or mismatched) end in
FAILURE with the reason logged and a later configure after fixing the parameter succeeds;
20 activate / deactivate / cleanup / configure cycles leave no thread or memory behind.
One node per module: the real Policy on the tiny checkpoint.
"""

from __future__ import annotations

import gc
import shutil
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from sensor_msgs.msg import Image, JointState
from test_policy_node_harness import WAIT, Harness, wait_for

from pi0_ros.ros import conversions as conv
from pi0_ros.pipeline import load_policy as default_policy_factory

pytest.importorskip("pi0_ros_msgs.msg", reason="pi0_ros_msgs is not built into this environment")

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "openpi_tiny_pi05"
PRE = FIXTURES / "openpi_preprocess"
STATE_NAMES = [f"s{i}" for i in range(8)]  # norm stats: state dim 8
ACTION_NAMES = [f"a{i}" for i in range(7)]  # action dim 7
CAMS = ["/lc/cam0", "/lc/cam1"]
JOINTS = "/lc/joint_states"
CYCLES = 20
THREAD_SLACK = 0  # threads after the cycles minus threads before
MEMORY_SLACK = 2 * 2**20  # bytes of Python allocations allowed to remain after the cycles


def make_checkpoint(root: Path) -> Path:
    """The tiny openpi checkpoint laid out as a real one: assets/<id>/norm_stats.json."""
    ckpt = root / "tiny_pi05"
    (ckpt / "assets" / "tiny").mkdir(parents=True)
    shutil.copy(TINY / "model.safetensors", ckpt)
    shutil.copy(TINY / "config.json", ckpt)
    shutil.copy(PRE / "norm_stats.json", ckpt / "assets" / "tiny")
    shutil.copy(PRE / "tokenizer.model", ckpt)
    return ckpt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def h(ckpt):
    overrides = {
        "checkpoint": str(ckpt),
        "prompt": "stack the blocks",
        "model.device": "cpu",
        "model.num_steps": 2,
        "model.warmup": 1,
        "cameras.topics": CAMS,
        "joint_states.topic": JOINTS,
        "joint_states.names": STATE_NAMES,
        "actions.joint_names": ACTION_NAMES,
        "max_input_age": 2.0,
        "diagnostics.period": 0.5,
    }
    harness = Harness(overrides, policy_factory=default_policy_factory, node_name="lc_policy")
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture(autouse=True)
def unconfigured(h, ckpt):
    """Each test starts unconfigured with the good parameters."""
    yield
    if h.state() == "active":
        assert h.transition("deactivate")
    if h.state() == "inactive":
        assert h.transition("cleanup")
    h.set_params(checkpoint=str(ckpt))


def _chunk_once(h) -> None:
    rgb = np.zeros((60, 80, 3), np.uint8)
    before = h.n("chunks")

    def step():
        stamp = h.now_ns()
        for topic in CAMS:
            h.publish(Image, topic, conv.rgb_to_image(rgb, "rgb8", stamp_ns=stamp))
        positions = np.linspace(-0.5, 0.5, len(STATE_NAMES))
        h.publish(JointState, JOINTS, h.joint_state(stamp, positions, STATE_NAMES))
        try:
            wait_for(lambda: h.n("chunks") > before, 0.5)
            return True
        except AssertionError:
            return False

    wait_for(step, 3 * WAIT, what="a chunk from the real policy")
    msg = h.last("chunks")
    actions = conv.msg_to_chunk(msg)
    assert actions.shape == (50, 7) and np.all(np.isfinite(actions))


def test_real_policy_publishes_chunks(h):
    assert h.transition("configure")
    assert h.transition("activate")
    h.wait_for_subscribers([(Image, CAMS[0]), (Image, CAMS[1]), (JointState, JOINTS)])
    _chunk_once(h)
    assert h.node.policy.settings.action_dim == len(ACTION_NAMES)


@pytest.mark.parametrize(
    ("params", "fix"),
    [
        ({"model.backend": "warp_drive"}, {"model.backend": "auto"}),
        ({"cameras.topics": ["/a", "/b", "/c", "/d"]}, {"cameras.topics": CAMS}),
        ({"joint_states.names": []}, {"joint_states.names": STATE_NAMES}),
        ({"actions.joint_names": []}, {"actions.joint_names": ACTION_NAMES}),
        ({"sync.queue_size": 0}, {"sync.queue_size": 10}),
        ({"sync.slop": -0.1}, {"sync.slop": 0.05}),
        ({"max_input_age": -2.0}, {"max_input_age": 2.0}),
        ({"cameras.transports": ["raw", "pigeon"]}, {"cameras.transports": ["raw", "raw"]}),
    ],
    ids=[
        "unknown_backend",
        "four_cameras",
        "empty_state_joints",
        "empty_action_joints",
        "zero_queue",
        "negative_slop",
        "negative_age",
        "bad_transport",
    ],
)
def test_invalid_parameter_fails_configure_then_fixed(h, params, fix):
    h.set_params(**params)
    assert not h.transition("configure")
    assert h.state() == "unconfigured"
    h.set_params(**fix)
    assert h.transition("configure")
    assert h.state() == "inactive"


def test_missing_checkpoint_fails_then_fixed(h, tmp_path):
    h.set_params(checkpoint=str(tmp_path / "nope"))
    assert not h.transition("configure")
    assert h.state() == "unconfigured" and h.node.policy is None


def test_corrupt_checkpoint_fails_then_fixed(h, ckpt, tmp_path):
    bad = make_checkpoint(tmp_path)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    h.set_params(checkpoint=str(bad))
    assert not h.transition("configure")
    h.set_params(checkpoint=str(ckpt))
    assert h.transition("configure")


def test_mismatched_checkpoint_fails_then_fixed(h, ckpt):
    # The parameters name 6 action dims; the checkpoint's norm stats have 7.
    h.set_params(**{"actions.joint_names": ACTION_NAMES[:6]})
    assert not h.transition("configure")
    h.set_params(**{"actions.joint_names": ACTION_NAMES})
    # A state vector of the wrong length is a mismatch too.
    h.set_params(**{"joint_states.names": STATE_NAMES[:5]})
    assert not h.transition("configure")
    h.set_params(**{"joint_states.names": STATE_NAMES})
    assert h.transition("configure")


def _fake_overrides():
    return {
        "checkpoint": "/fake",
        "prompt": "p",
        "cameras.topics": CAMS,
        "joint_states.topic": JOINTS,
        "joint_states.names": STATE_NAMES,
        "actions.joint_names": STATE_NAMES,
    }


def test_twenty_cycles_leave_no_threads_or_memory():
    """The node's own resources (worker thread, subscriptions, publishers, timers) over 20
    activate / deactivate / cleanup / configure cycles; the fake policy keeps it fast."""
    harness = Harness(_fake_overrides(), node_name="cycle_policy")

    def cycle():
        assert harness.transition("configure")
        assert harness.transition("activate")
        assert harness.transition("deactivate")
        assert harness.transition("cleanup")

    try:
        for _ in range(3):  # warm: first transitions populate caches (DDS, logging)
            cycle()
        gc.collect()
        threads0 = threading.active_count()
        tracemalloc.start()
        mem0 = tracemalloc.get_traced_memory()[0]
        for _ in range(CYCLES):
            cycle()
        gc.collect()
        mem1 = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert threading.active_count() - threads0 <= THREAD_SLACK, threading.enumerate()
        assert mem1 - mem0 < MEMORY_SLACK, f"{(mem1 - mem0) / 2**20:.2f} MiB left behind"
        assert harness.control.instances == harness.control.closed == CYCLES + 3
        assert not list(harness.node.subscriptions)  # ~/prompt and the inputs are gone
    finally:
        harness.close()


def test_cleanup_frees_the_real_model(h):
    import weakref

    gc.collect()
    threads0 = threading.active_count()
    for _ in range(3):
        assert h.transition("configure")
        assert h.transition("activate")
        model = weakref.ref(h.node.policy.model)
        assert h.transition("deactivate")
        assert h.transition("cleanup")
        gc.collect()
        assert model() is None, gc.get_referrers(model())
        assert h.node.policy is None
    assert threading.active_count() <= threads0
    assert h.transition("configure") and h.transition("activate")
    h.wait_for_subscribers([(Image, CAMS[0]), (Image, CAMS[1]), (JointState, JOINTS)])
    _chunk_once(h)  # and it still works


@pytest.mark.parametrize("path", [["configure", "activate"], ["configure"], []])
def test_shutdown_from_any_state_releases_everything(path):
    harness = Harness(_fake_overrides(), node_name="sd_policy")
    try:
        for label in path:
            assert harness.transition(label)
        shutdown = {2: "active_shutdown", 1: "inactive_shutdown", 0: "shutdown"}[len(path)]
        assert harness.transition(shutdown)
        assert harness.state() == "finalized"
        assert harness.node.policy is None and harness.node._worker is None
        assert harness.control.instances == harness.control.closed
        assert not [t for t in threading.enumerate() if t.name == "pi0-policy-node"]
    finally:
        harness.close()
