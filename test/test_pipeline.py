"""The pipeline core without ROS: gate reasons, silence, clock jumps, noise, slots, results,
diagnostics levels, and the settings -> policy mapping (every name the node accepts)."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from pi0_ros.pipeline import (ERROR, OK, WARN, PolicyPipeline, config_from_values, noise_for,
                              resolve_slots)
from pi0_ros.pipeline.core import NO_OUTPUT_WARN_S
from pi0_ros.ros.sync import ApproximateTimeSynchronizer

S = 1_000_000_000
T0 = 1_700_000_000 * S
BASE = {"checkpoint": "/ckpt", "prompt": "pick", "cameras.topics": ["/cam"],
        "joint_states.names": ["a", "b"], "actions.joint_names": ["a", "b"],
        "max_input_age": 0.5, "sync.slop": 0.01}


def _msg(stamp: int, **fields):
    sec, nsec = divmod(stamp, S)
    return types.SimpleNamespace(header=types.SimpleNamespace(
        stamp=types.SimpleNamespace(sec=sec, nanosec=nsec)), **fields)


class FakePolicy:
    model_name = "fake"
    camera_slots = ("base_0_rgb", "left_wrist_0_rgb")
    noise_shape = (4, 3)
    state_dim = None
    rtc = None

    def prompt_fit(self, prompt, state):
        return None

    def __init__(self, actions=None):
        self.actions = actions
        self.noises = []

    def prepare_image(self, rgb, name):
        return rgb

    def infer(self, obs, noise=None):
        self.noises.append(noise)
        if self.actions is not None:
            return {"actions": self.actions}
        return {"actions": np.tile(obs["state"], (4, 1)) + noise[:, :2]}

    def status(self):
        return {}

    def close(self):
        pass


class Clock:
    def __init__(self):
        self.ns = T0

    def __call__(self):
        return self.ns


def _pipeline(clock: Clock, policy=None, **params):
    config = config_from_values({**BASE, **params})
    seen = []

    def state_of(msg, names):
        if msg.state is None:
            raise type("E", (ValueError,), {"reason": "missing_joint"})("joint 'b' missing")
        return np.asarray(msg.state, np.float32)

    pipe = PolicyPipeline(config, clock=clock, image_of=lambda m: m.rgb, state_of=state_of,
                          make_sync=lambda n, q, s: ApproximateTimeSynchronizer(n, q, s),
                          sink=seen.append)
    pipe.bind(policy or FakePolicy())
    pipe.start()
    return pipe, seen


def _feed(pipe, clock, t, state=(0.1, 0.2)):
    clock.ns = t
    rgb = np.zeros((4, 4, 3), np.uint8)
    pipe.on_input(0, t, _msg(t, rgb=rgb))
    pipe.on_input(1, t, _msg(t, state=None if state is None else list(state)))


def test_sets_become_observations_with_noise_of_their_stamp():
    clock = Clock()
    pipe, seen = _pipeline(clock)
    for k in range(3):
        _feed(pipe, clock, T0 + k * S // 10)
    _feed(pipe, clock, T0 + 3 * S // 10)
    assert [o.stamp_ns for o in seen][:3] == [T0, T0 + S // 10, T0 + 2 * S // 10]
    obs = seen[1]
    assert obs.input_stamps == (obs.stamp_ns, obs.stamp_ns)
    np.testing.assert_array_equal(obs.noise, noise_for(0, obs.stamp_ns, (4, 3)))
    assert not np.array_equal(seen[0].noise, seen[1].noise)
    chunk = pipe.accept(pipe.infer(obs))
    assert chunk is not None and chunk.sequence == 1
    assert pipe.diagnostics("active")[0] == OK


def test_gate_reasons():
    clock = Clock()
    pipe, seen = _pipeline(clock)
    pipe.on_input(1, 0, _msg(0, state=[0, 0]))
    pipe.on_input(1, T0 + 5 * S, _msg(T0 + 5 * S, state=[0, 0]))  # 5 s ahead
    _feed(pipe, clock, T0 + S)
    pipe.on_input(1, T0 + S, _msg(T0 + S, state=[0, 0]))  # same stamp again
    _feed(pipe, clock, T0 + 2 * S, state=None)
    counts = pipe.counts()
    for reason in ("zero_stamp", "future_stamp", "stamp_out_of_order", "missing_joint"):
        assert counts.get(f"rejected.{reason}") == 1, (reason, counts)
    assert "joint_states.names" in pipe.last_rejection


def test_stale_and_rate_limited():
    clock = Clock()
    pipe, seen = _pipeline(clock, **{"max_rate": 2.0})
    clock.ns = T0 + 2 * S  # the set completes 2 s after its stamp
    pipe.on_input(0, T0, _msg(T0, rgb=np.zeros((4, 4, 3), np.uint8)))
    pipe.on_input(1, T0, _msg(T0, state=[0, 0]))
    assert pipe.counts()["rejected.stale_input"] == 1
    for k in range(4):
        _feed(pipe, clock, T0 + 3 * S + k * S // 10)
    assert len(seen) == 1 and pipe.counts()["rate_limited"] >= 2


def test_silence_is_an_error_until_the_input_is_back():
    clock = Clock()
    pipe, _ = _pipeline(clock)
    _feed(pipe, clock, T0)
    clock.ns = T0 + S  # nothing for 1 s > max_input_age 0.5
    assert pipe.check_silence() == [0, 1]
    level, message, values = pipe.diagnostics("active")
    assert level == ERROR and "/cam" in message and values["input_silent_events"] == 2
    assert pipe.check_silence() == []  # counted once per episode
    _feed(pipe, clock, T0 + S)
    assert pipe.diagnostics("active")[0] != ERROR


def test_sim_clock_starting_late_is_not_silence():
    """A node activated before the first /clock (sim time reads 0) is not 'silent' for 53 years
    when the clock starts."""
    clock = Clock()
    clock.ns = 0
    pipe, _ = _pipeline(clock)
    clock.ns = T0
    assert pipe.check_silence() == []


def test_clock_jump_back_resets_the_history():
    clock = Clock()
    pipe, seen = _pipeline(clock)
    for k in range(3):
        _feed(pipe, clock, T0 + 10 * S + k * S // 10)
    n = len(seen)
    for k in range(3):  # a looping bag starts over
        _feed(pipe, clock, T0 + k * S // 10)
    assert pipe.counts()["clock_jumps_back"] == 1
    assert len(seen) > n and "rejected.stamp_out_of_order" not in pipe.counts()


def test_no_chunk_warns_with_the_top_rejection():
    clock = Clock()
    pipe, _ = _pipeline(clock)
    for k in range(5):
        _feed(pipe, clock, T0 + k * S // 10, state=None)
    clock.ns = T0 + int((NO_OUTPUT_WARN_S + 1) * S)
    _feed(pipe, clock, clock.ns, state=None)
    level, message, _ = pipe.diagnostics("active")
    assert level == WARN and "missing_joint (6)" in message


def test_bad_and_nonfinite_outputs_are_rejected():
    clock = Clock()
    with pytest.raises(ValueError, match="actions.joint_names has 2 names"):
        _pipeline(clock, FakePolicy(np.zeros((4, 3), np.float32)))  # at warm-up already
    with pytest.raises(ValueError, match="not finite"):
        _pipeline(clock, FakePolicy(np.full((4, 2), np.nan, np.float32)))
    policy = FakePolicy()
    pipe, seen = _pipeline(clock, policy)
    _feed(pipe, clock, T0)
    _feed(pipe, clock, T0 + S // 10)
    for actions, reason in ((np.zeros((4, 3), np.float32), "bad_output"),
                            (np.full((4, 2), np.inf, np.float32), "nonfinite_output")):
        policy.actions = actions
        assert pipe.accept(pipe.infer(seen[0])) is None
        assert pipe.counts()[f"rejected.{reason}"] == 1


def test_stopped_pipeline_discards_results():
    clock = Clock()
    pipe, seen = _pipeline(clock)
    _feed(pipe, clock, T0)
    _feed(pipe, clock, T0 + S // 10)
    chunk = pipe.infer(seen[0])
    pipe.stop()
    assert pipe.accept(chunk) is None and pipe.counts()["discarded_results"] == 1


def test_slots_resolved_from_the_checkpoint():
    assert resolve_slots(["", ""], ("a", "b", "c")) == ("a", "b")
    assert resolve_slots(["c", ""], ("a", "b", "c")) == ("c", "b")
    with pytest.raises(ValueError, match="only 1 camera slots"):
        resolve_slots(["", ""], ("a",))
    with pytest.raises(ValueError, match="not camera slots"):
        resolve_slots(["x"], ("a",))
    with pytest.raises(ValueError, match="two cameras feed one slot"):
        resolve_slots(["c", ""], ("b", "c"))


def test_settings_are_strict():
    with pytest.raises(ValueError, match="'sync.slope' \\(did you mean 'sync.slop'\\?\\)"):
        config_from_values({**BASE, "sync.slope": 0.1})
    with pytest.raises(ValueError, match="actions.dt must be in"):
        config_from_values({**BASE, "actions.dt": 1e-200})
    with pytest.raises(ValueError, match="model.embedding"):
        config_from_values({**BASE, "model.embedding": "emb"})
    with pytest.raises(ValueError, match="remote.uri must start with ws://"):
        config_from_values({**BASE, "remote.uri": "http://x"})


def test_load_policy_passes_every_model_setting(monkeypatch):
    """Every model.* / tensorrt.* / remote.* setting reaches the policy it builds."""
    from pi0_ros.pipeline import factory
    from pi0_ros.policy import Policy

    seen = {}
    monkeypatch.setattr(Policy, "from_checkpoint",
                        classmethod(lambda cls, ckpt, **kw: seen.update(kw, ckpt=ckpt) or "p"))
    config = config_from_values({
        **BASE, "model.device": "cpu", "model.dtype": "float32", "model.num_steps": 3,
        "model.seed": 9, "model.prompt_buckets": [16], "model.pipeline": True,
        "model.embedding": "lm_head", "model.allow_unknown_processor_steps": True,
        "model.resize": "pillow",
        "norm_stats": "droid", "tokenizer": "/t.model", "model.torch_threads": 0,
    })
    assert factory.load_policy(config, ("base_0_rgb",)) == "p"
    assert seen["ckpt"] == "/ckpt" and seen["num_steps"] == 3 and seen["seed"] == 9
    assert seen["prompt_buckets"] == (16,) and seen["pipeline"] is True
    assert seen["embedding"] == "lm_head" and seen["allow_unknown_processor_steps"] is True
    assert seen["norm_stats"] == "droid" and seen["tokenizer"] == "/t.model"
    assert seen["cameras"] == {"base_0_rgb": "base_0_rgb"} and seen["resize"] == "pillow"
    opts = seen["engine_options"]
    assert (opts.backend, opts.precision, opts.device) == ("eager", "float32", "cpu")


def test_remote_setting_builds_a_remote_policy(monkeypatch):
    from pi0_ros import serve
    from pi0_ros.pipeline import factory

    made = {}

    class Remote:
        def __init__(self, uri, **kw):
            made.update(kw, uri=uri)

    monkeypatch.setattr(serve, "RemotePolicy", Remote)
    monkeypatch.setenv("PI0_ROS_API_KEY", "k1")
    config = config_from_values({**BASE, "checkpoint": "", "remote.uri": "ws://gpu:8000",
                                 "remote.timeout": 2.5})
    assert isinstance(factory.load_policy(config), Remote)
    assert made == {"uri": "ws://gpu:8000", "api_key": "k1", "timeout_s": 2.5}


def test_no_rclpy_below_ros():
    """The core (pipeline, policy, engine, model, control, serve) never imports rclpy."""
    root = Path(__file__).resolve().parents[1] / "pi0_ros"
    for sub in ("pipeline", "engine", "model", "control", "serve"):
        for path in (root / sub).rglob("*.py"):
            text = path.read_text()
            assert "import rclpy" not in text and "from rclpy" not in text, path
    for path in (root / "policy.py", root / "processing.py", root / "stats.py"):
        text = path.read_text()
        assert "import rclpy" not in text and "from rclpy" not in text, path
    for path in (root / "tools").glob("replay*.py"):
        assert "ros.node" not in path.read_text(), f"{path} imports the node"


def test_every_parameter_is_documented():
    """docs/NODE.md lists every name of the one parameter table (a documented value can never
    be missing from the node, and a new one never missing from the docs)."""
    from pi0_ros.pipeline import PARAMETERS

    text = (Path(__file__).resolve().parents[1] / "docs" / "NODE.md").read_text()
    missing = [name for name in PARAMETERS if f"`{name}`" not in text]
    assert not missing, f"parameters not in docs/NODE.md: {missing}"


def test_an_input_not_heard_yet_is_waiting_not_silent():
    """A player / driver starting after activation is not a 'silent input' event (the spurious
    start-up warning of issue 13), but diagnostics say what the node waits for."""
    clock = Clock()
    pipe, _ = _pipeline(clock)
    clock.ns = T0 + 2 * S
    assert pipe.check_silence() == [] and "input_silent_events" not in pipe.counts()
    level, message, _ = pipe.diagnostics("active")
    assert level == WARN and "waiting for the first message on ['/cam', 'joint_states']" in message
    _feed(pipe, clock, T0 + 2 * S)
    assert pipe.diagnostics("active")[0] == OK
