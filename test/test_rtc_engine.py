"""Real-time chunking through the engine and Policy (``EngineSpec.rtc``, ``ModelInputs.prefix``,
``Policy.infer(prefix=...)``): RTC off is today's output exactly, RTC on freezes the committed
prefix, the CUDA-graph backend (CPU stand-in) replays the guided sampler exactly, and backends
without a backward refuse it at prepare."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pi0_ros.engine import EngineSpec
from pi0_ros.engine.base import dummy_inputs, select_rows
from pi0_ros.engine.cuda_graph import CudaGraphBackend
from pi0_ros.engine.cuda_standin import CudaStandin
from pi0_ros.engine.eager import EagerBackend
from pi0_ros.model import Pi0Model, random_init_, tiny_config
from pi0_ros.model.rtc import RTCConfig, align_prefix

# The core's justified tolerance (test_rtc.py): the guided frozen prefix is within 0.1 (RMS) /
# 0.15 (max) of the distance an unguided chunk from the same observation has to it.
from test_rtc import PREFIX_MAX_RATIO, PREFIX_RMS_RATIO

STEPS = 4
ON = RTCConfig(enabled=True)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module", params=[True, False], ids=["pi05", "pi0"])
def model(request) -> Pi0Model:
    return random_init_(Pi0Model(tiny_config(pi05=request.param, num_cameras=2)), 0).eval()


def _eager(model, **spec):
    backend = EagerBackend(model, warmup=0)
    backend.prepare(EngineSpec(num_cameras=2, num_steps=STEPS, **spec))
    return backend


def _aligned(model, prev, delay, shift=0):
    cfg = model.config
    return align_prefix(prev, 0.0, shift * 0.02, 0.02, delay, cfg.action_horizon,
                        cfg.action_dim)


def test_rtc_off_or_without_prefix_is_bit_identical(model):
    cfg = model.config
    x = dummy_inputs(cfg, 2, 2, 10, seed=1)
    plain = _eager(model, max_batch=2).infer(x).actions
    disabled = _eager(model, max_batch=2, rtc=RTCConfig(enabled=False)).infer(x).actions
    rtc = _eager(model, max_batch=2, rtc=ON)
    assert torch.equal(disabled, plain)
    assert torch.equal(rtc.infer(x).actions, plain)  # no prefix at all
    assert torch.equal(rtc.infer(dataclasses.replace(x, prefix=(None, None))).actions, plain)
    # Device-drawn noise follows the same seeded generator with RTC on.
    y = dummy_inputs(cfg, 1, 2, 10, seed=2, with_noise=False)
    assert torch.equal(_eager(model, rtc=ON).infer(y).actions, _eager(model).infer(y).actions)


@pytest.mark.parametrize("delay", [1, "half"])
def test_frozen_prefix_through_the_backend(model, delay):
    cfg = model.config
    d = cfg.action_horizon // 2 if delay == "half" else delay
    backend = _eager(model, max_batch=2, rtc=ON)
    x = dummy_inputs(cfg, 2, 2, 10, seed=3)
    prev = backend.infer(dummy_inputs(cfg, 2, 2, 10, seed=4)).actions  # other obs and noise
    plain = backend.infer(x).actions
    guided = backend.infer(dataclasses.replace(
        x, prefix=(_aligned(model, prev[0].numpy(), d), None))).actions
    err, ref = (guided[0] - prev[0])[:d], (plain[0] - prev[0])[:d]
    assert err.pow(2).mean().sqrt() <= PREFIX_RMS_RATIO * ref.pow(2).mean().sqrt()
    assert err.abs().max() <= PREFIX_MAX_RATIO * ref.abs().max()
    assert torch.equal(guided[1], plain[1])  # the row without a prefix is untouched
    # A padded batch: the row runs in the 2-row graph with an empty second prefix row.
    one = backend.infer(select_rows(dataclasses.replace(
        x, prefix=(_aligned(model, prev[0].numpy(), d), None)), slice(0, 1))).actions
    assert torch.allclose(one[0], guided[0], atol=1e-5)


def test_prefix_without_rtc_or_with_wrong_rows_is_refused(model):
    cfg = model.config
    x = dummy_inputs(cfg, 1, 2, 10, seed=5)
    p = _aligned(model, np.zeros((cfg.action_horizon, cfg.action_dim), np.float32), 1)
    with pytest.raises(ValueError, match="prepared without RTC"):
        _eager(model).infer(dataclasses.replace(x, prefix=(p,)))
    with pytest.raises(ValueError, match="expected 1 rows"):
        _eager(model, rtc=ON).infer(dataclasses.replace(x, prefix=(p, None)))


def test_backends_without_backward_refuse_rtc_at_prepare(model):
    class Trt(EagerBackend):
        name = "tensorrt"

    with pytest.raises(ValueError, match="model.backend 'tensorrt' cannot run it"):
        Trt(model, warmup=0).prepare(EngineSpec(num_cameras=2, num_steps=STEPS, rtc=ON))
    with pytest.raises(ValueError, match="rtc.max_delay"):
        _eager(model, rtc=RTCConfig(enabled=True, max_delay=model.config.action_horizon + 1))


def test_cuda_graph_standin_replays_the_guided_sampler_exactly(model):
    """Capture (record-and-replay, host syncs raise) of the guided denoise stage: replay equals
    eager bit for bit, with and without a prefix, on every slot."""
    cfg = model.config
    spec = EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=2, batch_sizes=(1, 2),
                      prompt_buckets=(cfg.max_token_len,), pipeline=True, rtc=ON)
    graph = CudaGraphBackend(model, runtime=CudaStandin(), warmup=1)
    graph.prepare(spec)
    eager = EagerBackend(model, warmup=0)
    eager.prepare(spec)
    prev = eager.infer(dummy_inputs(cfg, 2, 2, 10, seed=6)).actions
    for i, prefix in enumerate([None, (_aligned(model, prev[0].numpy(), 2),
                                       _aligned(model, prev[1].numpy(), 3, shift=1)),
                                (None, _aligned(model, prev[1].numpy(), 1))]):
        x = dataclasses.replace(dummy_inputs(cfg, 2, 2, 9, seed=10 + i), prefix=prefix)
        assert torch.equal(graph.infer(x).actions, eager.infer(x).actions), i


# -- Policy ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_obs():
    from test_policy import _tiny_obs

    import json
    from pathlib import Path

    from safetensors.numpy import load_file

    fixtures = Path(__file__).parent / "fixtures"
    ref = load_file(str(fixtures / "openpi_preprocess" / "preprocess.safetensors"))
    strings = json.loads((fixtures / "openpi_preprocess" / "strings.json").read_text())
    tiny = (load_file(str(fixtures / "openpi_tiny_pi05" / "inputs.safetensors")), None)
    return [_tiny_obs(tiny, ref, strings, i) for i in range(2)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from test_policy import _tiny_ckpt

    return _tiny_ckpt(tmp_path_factory.mktemp("rtc"))


def _noise(policy, seed):
    return np.random.default_rng(seed).standard_normal(policy.noise_shape, dtype=np.float32)


def test_policy_rtc_off_is_todays_output_exactly(ckpt, tiny_obs):
    from pi0_ros.policy import Policy

    today = Policy.from_checkpoint(ckpt, num_steps=STEPS)
    off = Policy.from_checkpoint(ckpt, num_steps=STEPS, rtc=RTCConfig(enabled=False))
    on = Policy.from_checkpoint(ckpt, num_steps=STEPS, rtc=ON)
    for i, obs in enumerate(tiny_obs):
        noise = _noise(today, i)
        want = today.infer(obs, noise=noise)
        got_off, got_on = off.infer(obs, noise=noise), on.infer(obs, noise=noise, prefix=None)
        assert set(want) == set(got_off) == {"actions", "policy_timing"}
        assert np.array_equal(got_off["actions"], want["actions"])
        assert np.array_equal(got_on["actions"], want["actions"])  # no previous chunk
        assert np.array_equal(got_on["actions_normalized"], today.last_normalized)
        assert np.array_equal(on.postprocess(got_on["actions_normalized"]), want["actions"])
    batch = on.infer_batch(tiny_obs, noise=np.stack([_noise(today, i) for i in range(2)]),
                           prefixes=[None, None])
    plain = today.infer_batch(tiny_obs, noise=np.stack([_noise(today, i) for i in range(2)]))
    for b, p in zip(batch, plain):
        assert np.array_equal(b["actions"], p["actions"])
    with pytest.raises(ValueError, match="real-time chunking is off"):
        today.infer(tiny_obs[0], prefix=_aligned_zero(today))


def _aligned_zero(policy):
    h, a = policy.noise_shape
    return align_prefix(np.zeros((h, a), np.float32), 0.0, 0.0, 0.02, 1, h, a)


@pytest.mark.parametrize("delay", [0, 1, "half"])
def test_policy_rtc_freezes_the_committed_prefix(ckpt, tiny_obs, delay):
    """The previous chunk (other observation, other noise) aligned 2 steps on; the new chunk's
    first d normalized actions match its rows within the core's tolerance (d = 0: the seam row
    is pulled in by the soft mask)."""
    from pi0_ros.policy import Policy

    on = Policy.from_checkpoint(ckpt, num_steps=STEPS, rtc=ON)
    h, a = on.noise_shape
    d = h // 2 if delay == "half" else delay
    prev = on.infer(tiny_obs[1], noise=_noise(on, 7))["actions_normalized"]
    aligned = align_prefix(prev, 0.0, 2 * 0.02, 0.02, d, h, a)
    target = torch.from_numpy(aligned.actions)
    plain = torch.from_numpy(on.infer(tiny_obs[0], noise=_noise(on, 8))["actions_normalized"])
    out = on.infer(tiny_obs[0], noise=_noise(on, 8), prefix=aligned)
    guided = torch.from_numpy(out["actions_normalized"])
    np.testing.assert_array_equal(out["actions"], on.postprocess(out["actions_normalized"]))
    # The static prefix buffer never leaks into a later inference without a previous chunk.
    again = on.infer(tiny_obs[0], noise=_noise(on, 8))["actions_normalized"]
    assert np.array_equal(again, plain.numpy())
    if d == 0:
        assert (guided - target)[0].abs().max() < 0.5 * (plain - target)[0].abs().max()
        return
    err, ref = (guided - target)[:d], (plain - target)[:d]
    assert err.pow(2).mean().sqrt() <= PREFIX_RMS_RATIO * ref.pow(2).mean().sqrt()
    assert err.abs().max() <= PREFIX_MAX_RATIO * ref.abs().max()


def test_policy_refuses_rtc_on_a_forward_only_backend(ckpt):
    from pi0_ros.policy import Policy

    with pytest.raises(ValueError, match="'tensorrt' cannot run it"):
        Policy.from_checkpoint(ckpt, backend="tensorrt", rtc=ON)


def test_lerobot_rtc_config_maps_onto_the_settings():
    from pi0_ros.model.assets import RTCConfig as LeRobotRTC
    from pi0_ros.model.rtc import from_lerobot

    cfg = LeRobotRTC.from_json({"enabled": True, "prefix_attention_schedule": "exp",
                                "max_guidance_weight": 10.0, "execution_horizon": 8})
    assert from_lerobot(cfg) == RTCConfig(enabled=True, max_guidance_weight=10.0,
                                          schedule="exp")
    assert from_lerobot(LeRobotRTC()).schedule == "linear"
    with pytest.raises(ValueError, match="prefix_attention_schedule: expected one of"):
        from_lerobot(LeRobotRTC(prefix_attention_schedule="COSINE"))
