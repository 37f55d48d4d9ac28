"""Real-time chunking through the pipeline, the ActionChunk and the executor, on the demo bag:
the rtc.* parameters, RTC off is today's replay exactly, RTC on measures d from the latency,
continues the previous chunk and the executor starts every chunk at its d (no mismatch)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from pi0_ros.model.rtc import RTCConfig
from pi0_ros.pipeline import config_from_values
from pi0_ros.tools import make_demo, replay

BAG_SECONDS = 2.0
LATENCY = 0.12  # s of bag time from acceptance to the executor (--latency)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo.make_demo(tmp_path_factory.mktemp("demo"),
                               make_demo.DemoSpec(duration=BAG_SECONDS))


def _params(demo, tmp_path: Path, rtc: dict | None, strategy: str) -> Path:
    doc = yaml.safe_load(Path(demo["params"]).read_text())
    if rtc is not None:
        doc[make_demo.POLICY_NODE]["ros__parameters"]["rtc"] = rtc
    doc[make_demo.EXECUTOR_NODE]["ros__parameters"]["strategy"] = strategy
    path = tmp_path / f"params_{strategy}_{bool(rtc)}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _run(demo, tmp_path, rtc, strategy, latency=LATENCY):
    out = tmp_path / f"out_{strategy}_{bool(rtc)}_{latency}"
    return replay.run_offline(demo["bag"], _params(demo, tmp_path, rtc, strategy), out, seed=3,
                              latency=latency, plots=False)


# -- parameters -----------------------------------------------------------------------------------
BASE = {"checkpoint": "/x", "prompt": "p", "joint_states.names": ["a"],
        "actions.joint_names": ["a"]}


def test_rtc_parameters_map_onto_the_core_config():
    cfg = config_from_values(BASE)
    assert cfg.rtc == RTCConfig()  # off by default
    cfg = config_from_values({**BASE, "rtc.enabled": True, "rtc.max_guidance_weight": 3.0,
                              "rtc.schedule": "linear", "rtc.latency_percentile": 50.0,
                              "rtc.max_delay": 7})
    assert cfg.rtc == RTCConfig(True, 3.0, "linear", 7, 50.0)
    assert config_from_values({**BASE, "rtc.enabled": True}).rtc.max_delay is None


@pytest.mark.parametrize("values, needle", [
    ({"model.backend": "tensorrt"}, "model.backend 'tensorrt' cannot run it"),
    ({"model.dtype": "fp8"}, "FP8 GEMMs have no backward"),
    ({"model.pipeline": True}, "not with model.pipeline"),
    ({"remote.uri": "ws://h:1"}, "not with remote.uri"),
    ({"rtc.schedule": "cosine"}, "rtc.schedule: expected one of"),
    ({"rtc.max_guidance_weight": 0.0}, "rtc.max_guidance_weight: expected a finite number > 0"),
    ({"rtc.max_delay": -2}, "rtc.max_delay: expected -1"),
    ({"rtc.latency_percentile": 101.0}, "rtc.latency_percentile: expected a value in"),
])
def test_rtc_parameters_are_refused_at_configure(values, needle):
    with pytest.raises(ValueError, match=needle):
        config_from_values({**BASE, "rtc.enabled": True, **values})


def test_rtc_off_leaves_other_backends_alone():
    config_from_values({**BASE, "model.backend": "tensorrt", "rtc.enabled": False})


# -- the replay -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    return {"today": _run(demo, tmp, None, "replace"),
            "off": _run(demo, tmp, {"enabled": False}, "rtc"),
            "on": _run(demo, tmp, {"enabled": True}, "rtc")}


def test_rtc_off_is_todays_replay_exactly(runs):
    today, off = runs["today"].result, runs["off"].result
    assert len(today.chunks) == len(off.chunks) >= 8
    for a, b in zip(today.chunks, off.chunks):
        assert a.stamp_ns == b.stamp_ns and np.array_equal(a.actions, b.actions)
        assert b.rtc_delay == 0
    assert runs["today"].digest == runs["off"].digest
    assert off.executor_events["rtc_delay_mismatch"] == 0


def test_rtc_on_measures_d_and_the_executor_starts_each_chunk_there(runs, demo):
    on, today = runs["on"].result, runs["today"].result
    dt = make_demo.DemoSpec().action_dt
    assert len(on.chunks) == len(today.chunks)
    # The first chunk has nothing to continue: today's chunk, bit for bit, and d = 0.
    assert on.chunks[0].rtc_delay == 0
    assert np.array_equal(on.chunks[0].actions, today.chunks[0].actions)
    # The executor started every chunk exactly at the d its prefix assumed.
    events = on.executor_events
    assert events["chunks_accepted"] == len(on.chunks)
    assert events["rtc_delay_mismatch"] == 0, events
    # d = ceil(latency / dt) of the measured latency (set completion + --latency).
    delays = [c.rtc_delay for c in on.chunks[1:]]
    want = math.ceil(LATENCY / dt - 1e-9)
    assert min(delays) >= want and max(delays) <= want + 1, delays
    assert any(not np.array_equal(a.actions, b.actions)
               for a, b in zip(on.chunks[1:], today.chunks[1:]))
    # The ActionChunk messages carry d.
    from rosbags.rosbag2 import Reader

    store = replay.typestore()
    with Reader(runs["on"].bag) as reader:
        conns = [c for c in reader.connections if c.msgtype == replay.ACTION_CHUNK_TYPE]
        got = [store.deserialize_cdr(raw, replay.ACTION_CHUNK_TYPE).rtc_delay
               for _, _, raw in reader.messages(connections=conns)]
    assert got == [c.rtc_delay for c in on.chunks]


# -- the pipeline's bookkeeping (fake policy, injected clock) -------------------------------------
class RecordingRTCPolicy:
    """test_pipeline.FakePolicy with the RTC extras: records each prefix, returns a normalized
    chunk of row index + 10 * call number."""

    model_name = "fake"
    camera_slots = ("base_0_rgb", "left_wrist_0_rgb")
    noise_shape = (8, 3)
    state_dim = None
    rtc = RTCConfig(enabled=True)

    def prompt_fit(self, prompt, state):
        return None

    def __init__(self):
        self.prefixes = []

    def prepare_image(self, rgb, name):
        return rgb

    def infer(self, obs, noise=None, prefix=None):
        self.prefixes.append(prefix)
        raw = np.arange(8, dtype=np.float32)[:, None] + 10 * len(self.prefixes) + np.zeros(3)
        return {"actions": raw[:, :2].astype(np.float32),
                "actions_normalized": raw.astype(np.float32)}

    def status(self):
        return {}

    def close(self):
        pass


def test_pipeline_measures_d_and_aligns_the_last_accepted_chunk():
    from test_pipeline import T0, Clock, _feed, _pipeline

    from pi0_ros.pipeline.core import PolicyPipeline

    S = 1_000_000_000
    clock, policy = Clock(), RecordingRTCPolicy()
    pipe, seen = _pipeline(clock, policy, **{"rtc.enabled": True, "actions.dt": 0.02})
    assert isinstance(pipe, PolicyPipeline)
    pipe.delivery_delay = 0.01
    _feed(pipe, clock, T0)
    clock.ns = T0 + 40_000_000  # accepted 40 ms after the stamp (+10 ms delivery): d = 3
    first = pipe.accept(pipe.infer(seen[-1]))
    assert first.rtc_delay == 0 and policy.prefixes[-1] is None  # nothing to continue yet
    _feed(pipe, clock, T0 + 60_000_000)  # 3 actions after the first chunk's stamp
    second = pipe.accept(pipe.infer(seen[-1]))
    p = policy.prefixes[-1]
    assert (p.delay, second.rtc_delay, p.valid_len, p.shift) == (3, 3, 5, 3.0)
    np.testing.assert_array_equal(p.actions[:5], first.normalized[3:])
    assert pipe.diagnostics("active")[2]["rtc_delay"] == 3
    # A chunk of an old epoch is not continued: after stop / start nothing is.
    pipe.stop()
    pipe.start()
    _feed(pipe, clock, T0 + 2 * S)
    third = pipe.infer(seen[-1])
    assert policy.prefixes[-1] is None and third.rtc_delay == 0


def test_pipeline_refuses_a_policy_without_rtc():
    from test_pipeline import Clock, FakePolicy, _pipeline

    with pytest.raises(ValueError, match="the policy runs without real-time chunking"):
        _pipeline(Clock(), FakePolicy(), **{"rtc.enabled": True})
