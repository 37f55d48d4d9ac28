"""Checkpoint loader: key layouts, full-size key table, and every refusal with a clear error."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pi0_ros.model import (CheckpointError, Pi0Config, Pi0Model, checkpoint_shapes,
                           load_checkpoint, random_init_, save_checkpoint, tiny_config)

FIXTURES = Path(__file__).parent / "fixtures"
OPENPI = FIXTURES / "openpi_tiny_pi05"

# SEMANTICS §11, written out independently of the loader's prefix table.
_V = "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
_LM = "paligemma_with_expert.paligemma.model.language_model.layers.{l}."
_EX = "paligemma_with_expert.gemma_expert.model.layers.{l}."
SIGLIP_LAYER = {
    "layer_norm1.weight": [1152], "layer_norm1.bias": [1152],
    **{f"self_attn.{p}.weight": [1152, 1152] for p in ("k_proj", "v_proj", "q_proj", "out_proj")},
    **{f"self_attn.{p}.bias": [1152] for p in ("k_proj", "v_proj", "q_proj", "out_proj")},
    "layer_norm2.weight": [1152], "layer_norm2.bias": [1152],
    "mlp.fc1.weight": [4304, 1152], "mlp.fc1.bias": [4304],
    "mlp.fc2.weight": [1152, 4304], "mlp.fc2.bias": [1152],
}


def full_size_table(pi05: bool) -> dict[str, list[int]]:
    t = {
        _V + "embeddings.patch_embedding.weight": [1152, 3, 14, 14],
        _V + "embeddings.patch_embedding.bias": [1152],
        _V + "embeddings.position_embedding.weight": [256, 1152],
        _V + "post_layernorm.weight": [1152], _V + "post_layernorm.bias": [1152],
        "paligemma_with_expert.paligemma.model.multi_modal_projector.linear.weight": [2048, 1152],
        "paligemma_with_expert.paligemma.model.multi_modal_projector.linear.bias": [2048],
        "paligemma_with_expert.paligemma.model.language_model.norm.weight": [2048],
        "paligemma_with_expert.paligemma.lm_head.weight": [257152, 2048],
        "paligemma_with_expert.gemma_expert.lm_head.weight": [257152, 1024],
        "action_in_proj.weight": [1024, 32], "action_in_proj.bias": [1024],
        "action_out_proj.weight": [32, 1024], "action_out_proj.bias": [32],
    }
    for i in range(27):
        for k, s in SIGLIP_LAYER.items():
            t[_V + f"encoder.layers.{i}." + k] = s
    for layer in range(18):
        for prefix, w, mlp in ((_LM, 2048, 16384), (_EX, 1024, 4096)):
            p = prefix.format(l=layer)
            t[p + "self_attn.q_proj.weight"] = [2048, w]
            t[p + "self_attn.k_proj.weight"] = [256, w]
            t[p + "self_attn.v_proj.weight"] = [256, w]
            t[p + "self_attn.o_proj.weight"] = [w, 2048]
            t[p + "mlp.gate_proj.weight"] = [mlp, w]
            t[p + "mlp.up_proj.weight"] = [mlp, w]
            t[p + "mlp.down_proj.weight"] = [w, mlp]
            for norm in ("input_layernorm", "post_attention_layernorm"):
                if prefix == _EX and pi05:
                    t[p + norm + ".dense.weight"] = [3072, 1024]
                    t[p + norm + ".dense.bias"] = [3072]
                else:
                    t[p + norm + ".weight"] = [w]
    if pi05:
        t["paligemma_with_expert.gemma_expert.model.norm.dense.weight"] = [3072, 1024]
        t["paligemma_with_expert.gemma_expert.model.norm.dense.bias"] = [3072]
        for name in ("time_mlp_in", "time_mlp_out"):
            t[name + ".weight"], t[name + ".bias"] = [1024, 1024], [1024]
    else:
        t["paligemma_with_expert.gemma_expert.model.norm.weight"] = [1024]
        t["state_proj.weight"], t["state_proj.bias"] = [1024, 32], [1024]
        t["action_time_mlp_in.weight"], t["action_time_mlp_in.bias"] = [1024, 2048], [1024]
        t["action_time_mlp_out.weight"], t["action_time_mlp_out.bias"] = [1024, 1024], [1024]
    return t


@pytest.mark.parametrize("name,count,params", [("pi0", 777, 3_501_372_176),
                                               ("pi05", 812, 3_616_757_520)])
def test_full_size_key_table(name, count, params):
    shapes = checkpoint_shapes(Pi0Config.preset(name))
    assert {k: list(v) for k, v in shapes.items()} == full_size_table(name == "pi05")
    assert len(shapes) == count
    assert sum(math.prod(s) for s in shapes.values()) == params


def test_full_size_builds_on_meta():
    for name in ("pi0", "pi05"):
        with torch.device("meta"):
            model = Pi0Model(Pi0Config.preset(name))
        assert all(p.is_meta for p in model.parameters())


def _tiny_checkpoint(tmp_path, pi05=True, precision="float32", seed=0) -> Path:
    model = random_init_(Pi0Model(tiny_config(pi05=pi05, num_cameras=2)), seed)
    return save_checkpoint(model, tmp_path / f"ckpt_{pi05}_{precision}", precision=precision)


def _rewrite(ckpt: Path, edit) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(ckpt / "model.safetensors"))


@pytest.mark.parametrize("pi05", [True, False])
def test_round_trip_and_pi05_detection(tmp_path, pi05):
    ckpt = _tiny_checkpoint(tmp_path, pi05)
    raw = json.loads((ckpt / "config.json").read_text())
    del raw["pi05"]  # openpi's real config.json does not say: the keys decide
    (ckpt / "config.json").write_text(json.dumps(raw))
    model, config = load_checkpoint(ckpt)
    assert config.pi05 == pi05
    assert not any("gemma_expert.lm_head" in n for n, _ in model.named_parameters())


def test_bf16_file_loads_in_both_precisions(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path, precision="bfloat16")
    tensors = load_file(str(ckpt / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    m32, _ = load_checkpoint(ckpt, dtype="float32")
    assert m32.dtype == torch.float32
    m16, _ = load_checkpoint(ckpt, dtype="bfloat16")
    assert m16.dtype == torch.bfloat16
    assert m16.action_in_proj.weight.dtype == torch.float32  # float32 island


def test_lerobot_prefix_and_rename(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path, pi05=True)
    reference, _ = load_checkpoint(ckpt)

    def to_lerobot(t):
        for k in list(t):
            value = t.pop(k)
            k = k.replace("time_mlp_", "action_time_mlp_")  # old hub name, renamed on load
            t["model." + k] = value
    _rewrite(ckpt, to_lerobot)
    model, _ = load_checkpoint(ckpt)
    assert torch.equal(model.time_mlp_in.weight, reference.time_mlp_in.weight)


def test_missing_key(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path)
    _rewrite(ckpt, lambda t: t.pop("action_out_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing key.*'action_out_proj.bias'.*\[32\]"):
        load_checkpoint(ckpt)


def test_unexpected_key(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path)
    _rewrite(ckpt, lambda t: t.__setitem__("extra_head.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected key.*extra_head.weight"):
        load_checkpoint(ckpt)


def test_misshaped_key(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path)
    _rewrite(ckpt, lambda t: t.__setitem__("action_in_proj.weight", torch.zeros(32, 16)))
    with pytest.raises(CheckpointError,
                       match=re.escape("'action_in_proj.weight' has shape [32, 16], expected "
                                       "[32, 32]")):
        load_checkpoint(ckpt)


def test_wrong_dtype(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path)
    _rewrite(ckpt, lambda t: t.__setitem__("action_in_proj.bias",
                                           torch.zeros(32, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match="'action_in_proj.bias' has dtype I32"):
        load_checkpoint(ckpt)


def test_truncated_file(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated file"):
        load_checkpoint(ckpt)
    (ckpt / "model.safetensors").write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="truncated file"):
        load_checkpoint(ckpt)


def test_corrupt_header(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path)
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_checkpoint(ckpt)


def test_config_disagrees_with_keys(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path, pi05=False)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["pi05"] = True
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="config says pi05=true but the tensors .* pi0 "):
        load_checkpoint(ckpt)
    raw["pi05"] = False
    raw["geometry"]["lm"]["depth"] = raw["geometry"]["expert"]["depth"] = 2
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="unexpected key.*layers.2"):
        load_checkpoint(ckpt)
    raw["geometry"]["lm"]["depth"] = raw["geometry"]["expert"]["depth"] = 3
    raw["geometry"]["lm"]["width"] = 96
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"has shape \[.*\], expected \[.*96"):
        load_checkpoint(ckpt)


def test_unknown_variant_and_missing_file(tmp_path):
    ckpt = tmp_path / "c"
    shutil.copytree(OPENPI, ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    del raw["geometry"]
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="tiny_gemma_lm.*geometry override"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="checkpoint .*nothing_here does not exist"):
        load_checkpoint(tmp_path / "nothing_here")
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(ckpt)


def test_checkpoint_dir_errors_say_what_is_missing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="checkpoint directory .*empty is empty"):
        load_checkpoint(empty)
    step = tmp_path / "step"  # a LeRobot training checkpoint, one level too high
    (step / "pretrained_model").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"no model.safetensors in .*step \(found: "
                       r"\['pretrained_model'\]\).*LeRobot keeps the policy in"):
        load_checkpoint(step)
    no_cfg = tmp_path / "no_cfg"
    no_cfg.mkdir()
    shutil.copy(OPENPI / "model.safetensors", no_cfg)
    with pytest.raises(CheckpointError, match=r"no config.json in .*no_cfg.*--geometry"):
        load_checkpoint(no_cfg)
    geometry = json.loads((OPENPI / "config.json").read_text())["geometry"]
    model, config = load_checkpoint(no_cfg, geometry=geometry)  # the override stands in for it
    assert config.pi05 and model.config.lm.width == geometry["lm"]["width"]
