"""LeRobot semantics: pi0_ros reproduces LeRobot 0.6.1's own pi0.5 outputs on a checkpoint
LeRobot 0.6.1 wrote (`fixtures/lerobot06_tiny_pi05`, see its README), in ``semantics="lerobot"``
(the default for a LeRobot folder), and the same runs in ``semantics="openpi"`` do not.

What the semantics switch covers: the denoising time grid (``model.pi0.time_grid``), the
normalization formulas (``processing.Normalizer.semantics``: float32, ``eps`` 1e-8), which feed
the pi0.5 prompt's state bins, and the image resize (``images``, ``resize="lerobot"``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pi0_ros import processing as P
from pi0_ros.model import time_grid
from pi0_ros.pipeline.config import config_from_values
from pi0_ros.policy import Policy, checkpoint_semantics, resolve_semantics

FIXTURES = Path(__file__).parent / "fixtures"
FIX = FIXTURES / "lerobot06_tiny_pi05"
OPENPI = FIXTURES / "openpi_tiny_pi05"
REPORT = json.loads((FIX / "fixture.json").read_text())
CASES = [c["name"] for c in REPORT["cases"]]
PROMPTS = {c["name"]: c["prompt"] for c in REPORT["cases"]}
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb")

POLICY_ATOL = 1e-4  # robot actions, raw inputs -> LeRobot's preprocessor/policy/postprocessor
MODEL_ATOL = 1e-5  # normalized actions from LeRobot's own model inputs (observed <= 2e-6)
IMAGE_ATOL = 1e-6  # model images (observed: 0.0, the same torch kernel)

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def ref():
    return load_file(str(FIX / "lerobot_reference.safetensors"))


@pytest.fixture(scope="module")
def policies():
    """{semantics: Policy} on the fixture folder; "lerobot" comes from the layout (auto)."""
    pols = {"lerobot": Policy.from_checkpoint(FIX, geometry=FIX / "fixture.json",
                                              input_keys="slots"),
            "openpi": Policy.from_checkpoint(FIX, geometry=FIX / "fixture.json",
                                             input_keys="slots", semantics="openpi")}
    yield pols
    for pol in pols.values():
        pol.close()


def _obs(ref, case: str) -> dict:
    obs = {cam: ref[f"{case}.raw.{cam}"].numpy() for cam in CAMERAS}
    obs["state"] = ref[f"{case}.raw.state"].numpy()
    obs["prompt"] = PROMPTS[case]
    return obs


def _model_actions(pol: Policy, ref, case: str, steps: int) -> torch.Tensor:
    """The model alone on LeRobot's own model inputs (images after its resize, its tokens)."""
    return pol.model.sample_actions(
        ref[f"{case}.model.images"], ref[f"{case}.model.image_masks"], ref[f"{case}.tokens"],
        ref[f"{case}.attention_mask"], torch.zeros(1, 32), noise=ref[f"{case}.noise"],
        num_steps=steps)


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# -- the switch ---------------------------------------------------------------------------------
def test_fixture_is_what_lerobot_0_6_wrote():
    assert REPORT["lerobot_version"] == "0.6.1"
    assert REPORT["reloaded_weights_max_abs_diff"] == 0.0
    assert REPORT["embed_tokens_minus_lm_head_max_abs"] > 0.1  # untied, as after fine-tuning
    assert sum(f.stat().st_size for f in FIX.iterdir()) < 5_000_000


def test_semantics_default_from_the_layout(policies, caplog):
    assert checkpoint_semantics(FIX) == "lerobot"
    assert checkpoint_semantics(FIXTURES / "lerobot_tiny_pi05") == "lerobot"
    assert checkpoint_semantics(OPENPI) == "openpi"
    assert resolve_semantics("auto", OPENPI) == ("openpi", "from the checkpoint layout")
    assert resolve_semantics("lerobot", OPENPI) == ("lerobot", "explicit")
    with pytest.raises(ValueError, match=r"semantics: expected one of \['auto', 'openpi', "
                                         r"'lerobot'\], found 'LeRobot'"):
        resolve_semantics("LeRobot", FIX)
    lr, op = policies["lerobot"], policies["openpi"]
    assert (lr.semantics, lr.model.time_grid, lr.normalizer.semantics,
            lr.preprocessor.resize) == ("lerobot",) * 4
    assert (op.semantics, op.model.time_grid, op.normalizer.semantics,
            op.preprocessor.resize) == ("openpi", "openpi", "openpi", "fast")
    # An explicit resize wins over the semantics' default; the choice is logged at configure.
    with caplog.at_level(logging.INFO, logger="pi0_ros.policy"):
        mixed = Policy.from_model(None, lr.config, FIX, resize="pillow")
    assert (mixed.semantics, mixed.preprocessor.resize) == ("lerobot", "pillow")
    assert "lerobot semantics (from the checkpoint layout)" in caplog.text
    assert "image resize 'pillow'" in caplog.text
    mixed.close()


def test_node_parameter(monkeypatch):
    from pi0_ros.pipeline import factory

    base = {"checkpoint": "/ckpt", "prompt": "pick", "cameras.topics": ["/c"],
            "joint_states.names": ["a"], "actions.joint_names": ["a"]}
    assert config_from_values(base).model.semantics == "auto"
    assert config_from_values(base).model.resize == "auto"
    with pytest.raises(ValueError, match=r"model.semantics: expected one of \['auto', 'openpi', "
                                         r"'lerobot'\], found 'torch'"):
        config_from_values({**base, "model.semantics": "torch"})
    with pytest.raises(ValueError, match="model.resize: expected one of"):
        config_from_values({**base, "model.resize": "bicubic"})
    seen = {}
    monkeypatch.setattr(Policy, "from_checkpoint",
                        classmethod(lambda cls, ckpt, **kw: seen.update(kw) or "p"))
    factory.load_policy(config_from_values({**base, "model.device": "cpu",
                                            "model.semantics": "openpi"}))
    assert seen["semantics"] == "openpi" and seen["resize"] is None  # auto: by semantics
    factory.load_policy(config_from_values({**base, "model.device": "cpu",
                                            "model.resize": "lerobot"}))
    assert seen["semantics"] == "auto" and seen["resize"] == "lerobot"


# -- LeRobot reproduced (semantics="lerobot") ---------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_policy_level_reproduces_lerobot(policies, ref, case):
    """Raw camera images / state / prompt -> robot actions: LeRobot's preprocessor +
    ``predict_action_chunk`` + postprocessor (== ``select_action``'s chunk), within 1e-4."""
    pol = policies["lerobot"]
    obs = _obs(ref, case)
    batch = pol.preprocess(obs)
    np.testing.assert_array_equal(batch["tokens"].numpy(), ref[f"{case}.tokens"].numpy())
    np.testing.assert_array_equal(batch["token_mask"].numpy(),
                                  ref[f"{case}.attention_mask"].numpy())
    normalized = pol.normalizer.normalize(obs["state"], "state")
    np.testing.assert_array_equal(normalized, ref[f"{case}.state_normalized"][0].numpy())
    assert _max_diff(batch["images"], ref[f"{case}.model.images"]) <= IMAGE_ATOL
    np.testing.assert_array_equal(batch["image_masks"].numpy(),
                                  ref[f"{case}.model.image_masks"].numpy())
    # The postprocessor alone: LeRobot's unnormalization of its own model output, bit-equal.
    padded = np.zeros((50, 32), np.float32)
    padded[:, :7] = ref[f"{case}.policy.actions_normalized"][0].numpy()
    np.testing.assert_array_equal(pol.postprocess(padded), ref[f"{case}.policy.actions"][0])
    actions = pol.infer(obs, noise=ref[f"{case}.noise"][0].numpy())["actions"]
    assert actions.shape == (50, 7)
    diff = _max_diff(actions, ref[f"{case}.policy.actions"][0])
    assert diff <= POLICY_ATOL, f"{case}: max |pi0_ros - LeRobot| = {diff:.3g}"
    # select_action (LeRobot's queue over the same chunk), postprocessed: the first action.
    first = pol.postprocess(np.pad(ref[f"{case}.policy.select_action"].numpy(),
                                   ((0, 49), (0, 25))))[0]
    assert _max_diff(actions[0], first) <= POLICY_ATOL


@pytest.mark.parametrize("steps", [10, 3])
@pytest.mark.parametrize("case", CASES)
def test_model_level_reproduces_lerobot(policies, ref, case, steps):
    out = _model_actions(policies["lerobot"], ref, case, steps)
    diff = _max_diff(out, ref[f"{case}.model.actions_{steps}"])
    assert diff <= MODEL_ATOL, f"{case}, {steps} steps: max |diff| = {diff:.3g}"


def test_time_grids(ref):
    dt, times = time_grid(10, "lerobot")
    assert torch.equal(torch.tensor(times, dtype=torch.float32), ref["times_10"])
    assert times[:4] == (1.0, np.float32(0.9), np.float32(0.8), np.float32(0.7))
    assert dt == time_grid(10)[0] == float(np.float32(-0.1))
    assert time_grid(10)[1][2] == float(np.float32(0.79999995))  # openpi's accumulated grid
    for n in (1, 3, 7, 10, 33):  # LeRobot's euler_integrate, written out
        expected = [float(torch.tensor(1.0 + k * (-1.0 / n), dtype=torch.float32))
                    for k in range(n)]
        assert list(time_grid(n, "lerobot")[1]) == expected
    with pytest.raises(ValueError, match=r"time grid: expected one of \['openpi', 'lerobot'\], "
                                         "found 'jax'"):
        time_grid(10, "jax")


# -- openpi semantics on the same checkpoint: not LeRobot's numbers -----------------------------
@pytest.mark.parametrize("case", CASES)
def test_openpi_semantics_misses_lerobot(policies, ref, case):
    """Same folder, same inputs, ``semantics="openpi"``: the actions are off by more than the
    tolerance (mostly the antialiased uint8 resize; the edge state also lands in other bins)."""
    pol = policies["openpi"]
    obs = _obs(ref, case)
    actions = pol.infer(obs, noise=ref[f"{case}.noise"][0].numpy())["actions"]
    diff = _max_diff(actions, ref[f"{case}.policy.actions"][0])
    assert diff > POLICY_ATOL, f"{case}: openpi semantics within tolerance ({diff:.3g})"
    tokens_equal = np.array_equal(pol.preprocess(obs)["tokens"].numpy(),
                                  ref[f"{case}.tokens"].numpy())
    assert tokens_equal == (case != "edge")


@pytest.mark.parametrize("case", CASES)
def test_openpi_time_grid_misses_lerobot(policies, ref, case):
    """Model level, the grid is the only difference: openpi's float32-accumulated t gives
    ~6e-5..8e-5 (above MODEL_ATOL, below POLICY_ATOL) where LeRobot's grid gives <= 2e-6."""
    out = _model_actions(policies["openpi"], ref, case, 10)
    diff = _max_diff(out, ref[f"{case}.model.actions_10"])
    assert diff > MODEL_ATOL, f"{case}: openpi's grid within tolerance ({diff:.3g})"


# -- the formulas, written out from LeRobot's source -------------------------------------------
def _stats(**kw) -> P.NormStats:
    return P.NormStats(**{k: np.asarray(v, np.float64) for k, v in kw.items()})


def test_lerobot_normalization_formulas():
    """LeRobot ``_apply_transform``: float32; quantile width 0 -> eps 1e-8 (no + eps
    otherwise); z-score ``/ (std + eps)``, inverse ``x * std + mean``."""
    q = _stats(q01=[-1.0, 0.5, 2.0], q99=[3.0, 0.5, 2.5], mean=[0.0, 1.0, 2.0],
               std=[2.0, 0.0, 0.5])
    x = np.array([0.25, 0.5000001, 2.1], np.float32)
    lr = P.Normalizer({"state": q, "actions": q}, {"state": "quantile", "actions": "quantile"},
                      semantics="lerobot")
    f32 = np.float32
    width = np.array([4.0, 1e-8, 0.5], np.float32)
    expected = f32(2.0) * (x - np.array([-1.0, 0.5, 2.0], f32)) / width - f32(1.0)
    out = lr.normalize(x, "state")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    op = P.Normalizer({"state": q}, {"state": "quantile"})  # openpi: + 1e-6, float64
    assert abs(op.normalize(x, "state")[1] - out[1]) > 1.0  # the degenerate dim
    y = np.array([[0.5, -0.25, 1.0, 7.0]], np.float32)  # padded width: dim 3 passes through
    back = lr.unnormalize(y, "actions")
    head = (y[:, :3] + f32(1.0)) * width / f32(2.0) + np.array([-1.0, 0.5, 2.0], f32)
    np.testing.assert_array_equal(back, np.concatenate([head, y[:, 3:]], axis=1))
    z = P.Normalizer({"state": q, "actions": q}, {"state": "zscore", "actions": "zscore"},
                     semantics="lerobot")
    np.testing.assert_array_equal(
        z.normalize(x, "state"),
        (x - np.array([0, 1, 2], f32)) / (np.array([2, 0, 0.5], f32) + f32(1e-8)))
    np.testing.assert_array_equal(
        z.unnormalize(y[:, :3], "actions"),
        y[:, :3] * np.array([2, 0, 0.5], f32) + np.array([0, 1, 2], f32))
    assert lr.with_modes(False).semantics == "lerobot"
    assert op.with_semantics("lerobot").semantics == "lerobot"
    with pytest.raises(ValueError, match=r"Normalizer.semantics: expected one of \['openpi', "
                                         r"'lerobot'\], found 'torch'"):
        P.Normalizer({"state": q}, {"state": "quantile"}, semantics="torch")


def _lerobot_resize_written_out(image: np.ndarray, size: int) -> np.ndarray:
    """LeRobot: u8 -> float32 / 255, CHW; resize_with_pad_torch (bilinear, no antialias,
    clamp [0, 1], centered zero pad with the odd pixel at the bottom / right); * 2 - 1."""
    from torch.nn import functional as F

    x = torch.from_numpy(image.copy()).to(torch.float32) / 255
    x = x.permute(2, 0, 1).contiguous()[None]
    h, w = image.shape[:2]
    ratio = max(w / size, h / size)
    nh, nw = int(h / ratio), int(w / ratio)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    top, left = (size - nh) // 2, (size - nw) // 2
    x = F.pad(x, (left, size - nw - left, top, size - nh - top), value=0.0)
    return (x * 2.0 - 1.0)[0].numpy()


@pytest.mark.parametrize("shape", [(120, 160), (64, 80), (301, 97), (98, 98), (40, 40)])
def test_lerobot_resize(shape):
    g = np.random.default_rng(sum(shape))
    image = g.integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = _lerobot_resize_written_out(image, 98)
    np.testing.assert_array_equal(P.prepare_image(image, 98, resize="lerobot"), expected)
    np.testing.assert_array_equal(
        P.prepare_image_tensor(image, 98, "cpu", resize="lerobot").numpy(), expected)
    prepared = P.PreparedImage.from_uint8(image, 98, resize="lerobot")
    assert prepared.resize == "lerobot" and prepared.data.tobytes() == expected.tobytes()
    gap = np.abs(P.prepare_image(image, 98, resize="fast") - expected).max()
    if max(shape) > 98:  # shrinking: antialiased (openpi) vs not (LeRobot)
        assert gap > 0.05
    elif shape != (98, 98):  # enlarging: openpi rounds to uint8, LeRobot stays float
        assert 0 < gap <= 1.5 * 2 / 255  # about one uint8 level
    else:
        assert gap == 0
    # The uint8 form (resize_with_pad): LeRobot's resize_with_pad_torch on a uint8 image.
    u8 = P.resize_with_pad(image, 98, 98, resize="lerobot")
    assert u8.dtype == np.uint8 and u8.shape == (98, 98, 3)
    assert np.abs(u8.astype(np.float32) / 255 * 2 - 1 - expected.transpose(1, 2, 0)).max() < 0.01


def test_tensorrt_loop_engine_key_names_the_time_grid():
    """The TensorRT "denoise" engine unrolls the loop with t baked in: its cache key carries the
    model's time grid (an openpi-grid engine is never reused for LeRobot semantics)."""
    from types import SimpleNamespace

    from pi0_ros.engine.tensorrt.builder import EngineBuilder

    settings = SimpleNamespace(profiles=[], precision="bf16", strongly_typed=True, opt_level=3,
                               fp32_islands=True, clear_flags=(), opset=17)
    keys = {}
    for grid in ("openpi", "lerobot"):
        fake = SimpleNamespace(checkpoint="c", geometry="g", calibration_id="",
                               runtime=SimpleNamespace(version="10"),
                               device=SimpleNamespace(name="gpu", capability=(9, 0)),
                               model=SimpleNamespace(time_grid=grid))
        keys[grid] = {stage: EngineBuilder.key(fake, stage, 48, 2, 10, settings)
                      for stage in ("denoise", "denoise_step", "prefix")}
    assert keys["openpi"]["denoise"].time_grid == "openpi"
    assert keys["openpi"]["denoise"].digest != keys["lerobot"]["denoise"].digest
    for stage in ("denoise_step", "prefix"):  # t is an input there: one engine for both grids
        assert keys["openpi"][stage].digest == keys["lerobot"][stage].digest
