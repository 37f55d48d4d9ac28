"""FP8 module swap and its accuracy, through the CPU quantize-dequantize reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pi0_ros.engine.base import dummy_inputs
from pi0_ros.engine.fp8 import (
    FP8_MAX,
    Fp8Linear,
    compare_precisions,
    is_quantized,
    quantize_activation,
    quantize_fp8,
    quantize_weight,
)
from pi0_ros.model import Pi0Model, tiny_config

# e4m3: 3 mantissa bits -> round-to-nearest relative error <= 2^-4 for normal values; below
# the smallest normal (2^-6 of the scale) the absolute error is <= half the subnormal step 2^-10.
E4M3_REL = 2.0**-4
E4M3_SUB_ABS = 2.0**-10
# End-to-end on the random tiny models (actions RMS ~1.2), relative to the float32 actions' RMS.
FP8_MAX_REL = 0.15
FP8_MEAN_REL = 0.03
BF16_MAX_REL = 0.02


def test_weight_quantization_error_bound():
    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # channels of very different
    q, scale = quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    torch.testing.assert_close(w.abs().amax(1) / FP8_MAX, scale)
    err = (q.float() * scale[:, None] - w).abs()
    bound = torch.maximum(w.abs() * E4M3_REL, scale[:, None] * E4M3_SUB_ABS)
    assert bool((err <= bound * (1 + 1e-6)).all())
    assert q.float().abs().max() <= FP8_MAX
    # An all-zero channel gets a tiny scale, not 0/0.
    q0, s0 = quantize_weight(torch.zeros(2, 16))
    assert torch.isfinite(s0).all() and (q0.float() == 0).all()


@pytest.mark.parametrize("mode", ["per_token", "per_tensor"])
def test_activation_quantization(mode):
    torch.manual_seed(1)
    x = torch.randn(5, 32) * torch.tensor([1e-3, 1.0, 10.0, 100.0, 0.1])[:, None]
    q, s = quantize_activation(x, mode)
    assert s.shape == (5, 1) and s.is_contiguous()
    if mode == "per_token":
        torch.testing.assert_close(s[:, 0], x.abs().amax(1) / FP8_MAX)
    else:
        assert torch.all(s == x.abs().max() / FP8_MAX)
    err = (q.float() * s - x).abs()
    assert bool((err <= torch.maximum(x.abs() * E4M3_REL, s * E4M3_SUB_ABS) * 1.000001).all())


def test_fp8_linear_matches_dequantized_math():
    torch.manual_seed(2)
    lin = nn.Linear(32, 16, bias=True)
    f = Fp8Linear.from_linear(lin, emulate=True)
    x = torch.randn(2, 3, 32)
    xq, xs = quantize_activation(x.reshape(-1, 32), "per_token")
    expect = (xq.float() * xs) @ f.dequantized_weight().t() + lin.bias
    torch.testing.assert_close(f(x), expect.reshape(2, 3, 16))
    rel = (f(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.1
    assert f.weight.dtype == torch.float32 and f.weight.numel() == 0
    with pytest.raises(ValueError, match="divisible by 16"):
        Fp8Linear.from_linear(nn.Linear(20, 16), emulate=False)


@pytest.fixture(scope="module", params=[True, False], ids=["pi05", "pi0"])
def model(request) -> Pi0Model:
    torch.manual_seed(0)
    return Pi0Model(tiny_config(pi05=request.param, num_cameras=2)).eval()


def test_quantize_swaps_only_the_gemma_linears(model):
    import copy

    m = copy.deepcopy(model).set_precision("bfloat16")
    quantize_fp8(m)  # no FP8 GPU here -> the emulation
    swapped = [n for n, mod in m.named_modules() if isinstance(mod, Fp8Linear)]
    depth = model.config.lm.depth
    assert len(swapped) == 2 * depth * 7
    assert all(n.startswith(("lm.", "expert.")) for n in swapped)
    assert isinstance(m.vision.layers[0].mlp.fc1, nn.Linear)
    assert isinstance(m.action_in_proj, nn.Linear) and is_quantized(m)
    assert m.dtype == torch.bfloat16  # the model still sees its activation dtype
    quantize_fp8(m)  # idempotent
    assert sum(isinstance(x, Fp8Linear) for x in m.modules()) == len(swapped)
    with pytest.raises(ValueError, match="target"):
        quantize_fp8(copy.deepcopy(model), targets=("decoder",))


def test_fp8_accuracy_vs_float32(model):
    x = dummy_inputs(model.config, 2, 2, 20, seed=7)
    report = compare_precisions(model, x, num_steps=5)
    assert set(report) == {"bfloat16", "fp8", "fp8_vs_bfloat16"}
    rms = report["fp8"]["ref_rms"]
    assert 0 < report["bfloat16"]["max_abs"] <= BF16_MAX_REL * rms
    assert 0 < report["fp8"]["max_abs"] <= FP8_MAX_REL * rms
    assert report["fp8"]["mean_abs"] <= FP8_MEAN_REL * rms
    # The reference model is untouched.
    assert model.dtype == torch.float32 and not is_quantized(model)
    with pytest.raises(ValueError, match="noise"):
        compare_precisions(model, dummy_inputs(model.config, 1, 2, 5, with_noise=False))
