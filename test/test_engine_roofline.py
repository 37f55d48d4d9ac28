"""Roofline math: parameter / FLOP counts against the model, scaling, peaks, ratios."""

from __future__ import annotations

import pytest
import torch

from pi0_ros.engine.roofline import (
    DevicePeak,
    StageCost,
    declared_peak,
    measure_peak,
    ratio_to_floor,
    roofline,
    stage_costs,
    vision_params,
)
from pi0_ros.model import Pi0Config, Pi0Model, tiny_config

H100 = DevicePeak("test", 500.0, 1000.0, 2000.0, 3000.0)


@pytest.mark.parametrize("cfg", [Pi0Config.preset("pi05"), Pi0Config.preset("pi0"),
                                 tiny_config()], ids=["pi05", "pi0", "tiny"])
def test_parameter_counts_match_the_model(cfg):
    with torch.device("meta"):
        m = Pi0Model(cfg)
    vision = sum(p.numel() for p in m.vision.parameters()) + m.projector.weight.numel() + \
        m.projector.bias.numel()
    assert vision_params(cfg) == vision
    # bf16 prefix weight bytes = every LM linear weight of depth-1 layers + last layer's k/v
    # (+ the gathered embedding rows): check against the module sizes.
    lin = [mod for mod in m.lm.layers[0].modules() if isinstance(mod, torch.nn.Linear)]
    per_layer = sum(x.weight.numel() for x in lin)
    last_kv = sum(x.weight.numel() for x in (m.lm.layers[-1].self_attn.k_proj,
                                             m.lm.layers[-1].self_attn.v_proj))
    L = cfg.max_token_len
    c = stage_costs(cfg, batch=1, num_cameras=cfg.num_cameras, prompt_len=L, num_steps=1)
    p = cfg.num_cameras * cfg.vision.tokens_per_image + L
    kv = cfg.lm.depth * 2 * cfg.lm.num_kv_heads * p * cfg.lm.head_dim * 2
    image_tokens = cfg.num_cameras * cfg.vision.tokens_per_image * cfg.lm.width * 2
    expect = ((cfg.lm.depth - 1) * per_layer + last_kv) * 2 + L * cfg.lm.width * 2 + kv + \
        image_tokens
    assert c["prefix"].bytes == pytest.approx(expect)


def test_scaling_laws():
    cfg = Pi0Config.preset("pi05")
    kw = dict(num_cameras=2, prompt_len=200)
    one = stage_costs(cfg, batch=1, num_steps=10, **kw)
    two = stage_costs(cfg, batch=2, num_steps=10, **kw)
    five = stage_costs(cfg, batch=1, num_steps=5, **kw)
    for stage in ("vision", "prefix", "denoise"):
        assert two[stage].flops == pytest.approx(2 * one[stage].flops)
        assert one[stage].bytes < two[stage].bytes < 2 * one[stage].bytes  # weights shared
    assert five["denoise"].flops == pytest.approx(one["denoise"].flops / 2)
    assert five["vision"] == one["vision"] and five["prefix"] == one["prefix"]
    fp8 = stage_costs(cfg, batch=1, num_steps=10, precision="fp8", **kw)
    assert fp8["prefix"].bytes < 0.55 * one["prefix"].bytes
    assert fp8["vision"] == one["vision"]
    short = stage_costs(cfg, batch=1, num_steps=10, num_cameras=2, prompt_len=48)
    assert short["prefix"].flops < one["prefix"].flops
    # Hand check of the full pi0.5 prefix: 2*P*params dominates (P = 712, ~1.98 B params).
    assert one["prefix"].flops == pytest.approx(2 * 712 * 1.98e9, rel=0.08)


def test_floor_is_the_max_of_compute_and_memory_per_stage():
    c = StageCost(flops=2e12, bytes=3e9)
    assert c.floor_ms(1000.0, 3000.0) == pytest.approx(2.0)  # compute 2 ms > memory 1 ms
    assert c.floor_ms(4000.0, 1000.0) == pytest.approx(3.0)  # memory bound
    cfg = Pi0Config.preset("pi05")
    r = roofline(cfg, H100, batch=1, num_cameras=2, prompt_len=200, num_steps=10)
    stages = ("vision", "prefix", "denoise")
    assert r["total"]["floor_ms"] == pytest.approx(sum(r[s]["floor_ms"] for s in stages))
    assert r["denoise"]["bound"] == "memory" and r["prefix"]["bound"] == "compute"
    for s in stages:
        assert r[s]["floor_ms"] == max(r[s]["compute_ms"], r[s]["memory_ms"])
    fp8 = roofline(cfg, H100, batch=1, num_cameras=2, prompt_len=200, num_steps=10,
                   precision="fp8")
    assert fp8["total"]["floor_ms"] < r["total"]["floor_ms"]
    ratios = ratio_to_floor({"total": 2 * r["total"]["floor_ms"], "vision": 1.0}, r)
    assert ratios["total"] == pytest.approx(2.0) and set(ratios) == {"total", "vision"}


def test_peaks():
    assert declared_peak("NVIDIA H100 80GB HBM3").gbps == 3350.0
    assert declared_peak("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert declared_peak("NVIDIA GH200 480GB").name == "GH200"
    assert declared_peak("NVIDIA L40S").name == "L40S"
    assert declared_peak("NVIDIA A100-SXM4-40GB").tflops_fp8 is None
    assert declared_peak("Some GPU") is None
    with pytest.raises(ValueError, match="fp8"):
        declared_peak("NVIDIA A100-SXM4-40GB").tflops("fp8")
    peak = measure_peak("cpu", seconds=0.1)
    assert peak.source == "measured" and peak.tflops_float32 > 0 and peak.gbps > 0


def test_kernel_counts_on_meta():
    from pi0_ros.engine.roofline import count_kernels

    cfg = tiny_config()
    five = count_kernels(cfg, batch=1, num_cameras=2, prompt_len=48, num_steps=5)
    ten = count_kernels(cfg, batch=1, num_cameras=2, prompt_len=48, num_steps=10)
    assert ten["vision"] == five["vision"] > 0 and ten["prefix"] == five["prefix"] > 0
    assert ten["denoise"] == 2 * five["denoise"]  # the loop is unrolled per step
    assert ten["total"] == ten["vision"] + ten["prefix"] + ten["denoise"]
    # Batch does not change the number of kernels.
    assert count_kernels(cfg, batch=4, num_cameras=2, prompt_len=48, num_steps=5) == five
