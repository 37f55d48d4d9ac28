"""The native FP8 path (``torch._scaled_mm``) on CPU against its emulation, static activation
scales (calibration, kernel count, accuracy on the openpi fixture), and FP8 under graph replay.

torch 2.13 runs row-wise scaled ``_scaled_mm`` on CPU, so the scale layouts the GPU kernel
needs (scale_a (M, 1), scale_b (1, N), contiguous float32) are exercised here; a GPU adds only
its own accumulation order (test_engine_gpu.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pi0_ros.engine.base import EngineSpec, ModelInputs, dummy_inputs
from pi0_ros.engine.cuda_graph import CudaGraphBackend
from pi0_ros.engine.cuda_standin import CudaStandin, no_host_sync
from pi0_ros.engine.eager import EagerBackend
from pi0_ros.engine.fp8 import (
    FP8_MAX,
    Fp8Linear,
    calibrate_input_amax,
    compare_precisions,
    cpu_scaled_mm_supported,
    quantize_activation,
    quantize_fp8,
)
from pi0_ros.model import Pi0Model, load_checkpoint, tiny_config
from ros_helpers import FIXTURES

pytestmark = pytest.mark.skipif(not cpu_scaled_mm_supported(),
                                reason="this torch has no CPU torch._scaled_mm")

# Native float32-output _scaled_mm vs the float32 emulation: the same e4m3 products, summed in
# another order (and, for static scales, the activation scale folded into the weight scale).
NATIVE_VS_EMULATED_RTOL = 1e-5
# openpi fixture (pi0.5, random tiny weights, actions RMS 1.47), 10 steps, vs float32; measured
# 2026-12-06: bf16 max 0.021, fp8 dynamic max 0.21 / mean 0.035, fp8 static max 0.29 / mean 0.037.
FIXTURE_FP8_MAX_ABS = 0.45
FIXTURE_FP8_MEAN_ABS = 0.06
STATIC_OPS_PER_LINEAR = 4  # divide, clamp, cast, _scaled_mm
DYNAMIC_MIN_OPS_PER_LINEAR = 8


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one torch thread (conftest.one_torch_thread)."""


def dequantized_reference(f: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    """The FP8 math written out: (x_q * s_x) @ (W_q * s_w)^T, scales on their own axes."""
    x2 = x.reshape(-1, f.in_features)
    xq, xs = quantize_activation(x2, f.act_scale, f.input_scale)
    w = f.qweight.float() * f.scale.reshape(f.out_features, 1)
    return ((xq.float() * xs) @ w.t()).reshape(*x.shape[:-1], f.out_features)


@pytest.mark.parametrize("mode", ["per_token", "per_tensor", "static"])
@pytest.mark.parametrize("shape", [(64, 64), (48, 32)], ids=["square", "rect"])
def test_native_scaled_mm_matches_emulation(mode, shape):
    torch.manual_seed(3)
    out_f, in_f = shape
    lin = nn.Linear(in_f, out_f, bias=False)
    # Channels and tokens of very different magnitude, so a scale on the wrong axis shows.
    lin.weight.data *= torch.logspace(-2, 1, out_f)[:, None]
    x = torch.randn(3, 5, in_f) * torch.logspace(-1, 1, 5)[None, :, None]
    amax = x.abs().amax() * 0.8 if mode == "static" else None  # some saturation
    native = Fp8Linear.from_linear(lin, act_scale=mode, emulate=False, input_amax=amax)
    emulated = Fp8Linear.from_linear(lin, act_scale=mode, emulate=True, input_amax=amax)
    y = native(x)
    assert y.dtype == torch.float32 and y.shape == (3, 5, out_f)
    ref = dequantized_reference(emulated, x)
    scale = ref.abs().max()
    torch.testing.assert_close(emulated(x), ref, rtol=0, atol=NATIVE_VS_EMULATED_RTOL * scale)
    torch.testing.assert_close(y, ref, rtol=0, atol=NATIVE_VS_EMULATED_RTOL * scale)
    # bf16 output (what the GPU path produces): the same within bf16 rounding.
    yb = native(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), dequantized_reference(native, x.bfloat16()),
                               rtol=2**-7, atol=2**-7 * scale)


def test_static_quantization_saturates_and_needs_calibration():
    lin = nn.Linear(32, 16, bias=False)
    f = Fp8Linear.from_linear(lin, act_scale="static", input_amax=2.0)
    assert torch.equal(f.input_scale, torch.tensor([2.0 / FP8_MAX]))
    q, _ = quantize_activation(torch.full((1, 32), 1e6), "static", f.input_scale)
    assert (q.float() == FP8_MAX).all()  # clamped, never NaN
    with pytest.raises(ValueError, match="input_amax"):
        Fp8Linear.from_linear(lin, act_scale="static")
    with pytest.raises(ValueError, match="input_amax"):
        quantize_fp8(Pi0Model(tiny_config()), act_scale="static", emulate=True)


@pytest.mark.parametrize("emulate", [True, False], ids=["emulated", "native"])
def test_static_scales_cut_the_kernel_count(emulate):
    torch.manual_seed(4)
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(2, 7, 64)
    counts = {}
    for mode in ("per_token", "static"):
        f = Fp8Linear.from_linear(lin, act_scale=mode, emulate=emulate, input_amax=x.abs().max())
        f(x)  # the (M, 1) unit scale is cached on first use (warm-up), not per call
        with no_host_sync("Fp8Linear.forward") as ops:
            f(x)
        counts[mode] = ops.ops
    if not emulate:
        assert counts["static"] == STATIC_OPS_PER_LINEAR
        assert counts["per_token"] >= DYNAMIC_MIN_OPS_PER_LINEAR
    assert counts["static"] < counts["per_token"]


def openpi_fixture():
    d = FIXTURES / "openpi_tiny_pi05"
    model, cfg = load_checkpoint(d)
    inp = load_file(str(d / "inputs.safetensors"))
    x = ModelInputs(
        images=torch.stack([inp[f"image.{c}"] for c in cfg.cameras], dim=1),
        image_masks=torch.stack([inp[f"image_mask.{c}"] for c in cfg.cameras], dim=1),
        tokens=inp["tokenized_prompt"].long(), token_mask=inp["tokenized_prompt_mask"],
        state=inp["state"], noise=inp["noise"])
    return model, cfg, x


def test_static_fp8_accuracy_on_the_openpi_fixture():
    model, cfg, x = openpi_fixture()
    calibration = [dummy_inputs(cfg, 2, 2, 30, seed=s) for s in range(3)]  # not the test input
    report = compare_precisions(model, x, 10, variants=("bfloat16", "fp8", "fp8_static"),
                                calibration=calibration, emulate=False)
    for variant in ("fp8", "fp8_static"):
        assert 0 < report[variant]["max_abs"] <= FIXTURE_FP8_MAX_ABS, (variant, report)
        assert report[variant]["mean_abs"] <= FIXTURE_FP8_MEAN_ABS, (variant, report)
    assert report["bfloat16"]["max_abs"] < report["fp8_static"]["max_abs"]


def test_calibration_sees_every_step_and_skips_unread_layers():
    torch.manual_seed(0)
    model = Pi0Model(tiny_config(pi05=True, num_cameras=2)).eval()
    amax = calibrate_input_amax(model, [dummy_inputs(model.config, 1, 2, 9, seed=1)], 3)
    depth = model.config.lm.depth
    last = f"lm.layers.{depth - 1}"
    assert f"{last}.self_attn.k_proj" in amax and f"{last}.mlp.up_proj" not in amax
    assert len(amax) == 2 * depth * 7 - 5  # the last LM layer runs only k / v
    assert all(float(v) > 0 for v in amax.values())


@pytest.mark.parametrize("mode", ["per_token", "static"])
def test_native_fp8_graph_replay_equals_eager(mode):
    """Native FP8 linears captured by the stand-in and replayed: exactly the eager result (the
    unit scale cache is filled by the warm-up, outside the capture)."""
    torch.manual_seed(0)
    model = Pi0Model(tiny_config(pi05=True, num_cameras=2)).eval()
    cfg = model.config
    amax = None
    if mode == "static":
        amax = calibrate_input_amax(model, [dummy_inputs(cfg, 1, 2, 9, seed=1)], 3)
    quantize_fp8(model, act_scale=mode, emulate=False, input_amax=amax)
    spec = EngineSpec(num_cameras=2, num_steps=3, max_batch=1, prompt_buckets=(16, 200))
    eager = EagerBackend(copy.deepcopy(model), warmup=0)
    eager.prepare(spec)
    rt = CudaStandin()
    with rt.tracking():
        graph = CudaGraphBackend(model, runtime=rt, warmup=1)
        graph.prepare(spec)
        for i, n in enumerate((5, 60)):
            x = dummy_inputs(cfg, 1, 2, n, seed=10 + i)
            assert torch.equal(graph.infer(x).actions, eager.infer(x).actions)
