"""Model core: openpi fixture parity, KV cache == joint pass, masking, batching, precision."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pi0_ros.model import (OPENPI_CAMERAS, Pi0Config, Pi0Model, load_checkpoint, random_init_,
                           tiny_config, time_grid)
from pi0_ros.model.gemma import MASK_VALUE, apply_rope, rope_tables

FIXTURES = Path(__file__).parent / "fixtures"
OPENPI = FIXTURES / "openpi_tiny_pi05"
LEROBOT = FIXTURES / "lerobot_tiny_pi05"

FIXTURE_ATOL = 1e-4  # SEMANTICS §12: float32 implementation vs openpi's stored values
KV_VS_JOINT_ATOL = 1e-5  # KV-cached sampling vs one joint prefix+suffix pass (both float32 here)
BATCH_ATOL = 1e-5  # a batch of 2 vs two batches of 1
BF16_REL = 2e-2  # bfloat16 vs float32: max |diff| <= 2e-2 * max(1, max |actions|)

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def openpi():
    model, config = load_checkpoint(OPENPI)
    inputs = load_file(str(OPENPI / "inputs.safetensors"))
    expected = load_file(str(OPENPI / "expected.safetensors"))
    batch = dict(
        images=torch.stack([inputs[f"image.{c}"] for c in config.cameras], dim=1),
        image_masks=torch.stack([inputs[f"image_mask.{c}"] for c in config.cameras], dim=1),
        tokens=inputs["tokenized_prompt"].long(),
        token_mask=inputs["tokenized_prompt_mask"],
    )
    return model, config, inputs, expected, batch


def _prefix(model, batch):
    tokens = model.embed_images(batch["images"])
    cache = model.new_cache(tokens.shape[0], batch["images"].shape[1], batch["tokens"].shape[1])
    model.fill_prefix(cache, tokens, batch["image_masks"], batch["tokens"], batch["token_mask"])
    return tokens, cache


def _close(actual, expected, atol=FIXTURE_ATOL):
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= atol, f"max |diff| = {diff:.3g} > {atol}"


# -- openpi fixture -------------------------------------------------------------------------------
def test_fixture_config(openpi):
    _, config, *_ = openpi
    assert config.pi05 and config.cameras == ("base_0_rgb", "left_wrist_0_rgb")
    assert config.prefix_len() == 298 and config.suffix_len == 50


def test_fixture_prefix_intermediates(openpi):
    model, config, _, expected, batch = openpi
    tokens, cache = _prefix(model, batch)
    _close(tokens[:, :49], expected["image_emb_cam0"])
    embs, pad = model.embed_prefix(tokens, batch["image_masks"], batch["tokens"],
                                   batch["token_mask"])
    _close(embs, expected["prefix_embs"])
    assert torch.equal(pad, expected["prefix_pad_mask"])
    assert torch.equal(cache.positions, expected["prefix_position_ids"])
    valid = expected["prefix_pad_mask"][0]
    p = cache.prefix_len
    _close(cache.k[:, :, :, :p][..., valid, :], expected["prefix_k_all_layers"][..., valid, :])
    _close(cache.v[:, :, :, :p][..., valid, :], expected["prefix_v_all_layers"][..., valid, :])
    _close(cache.k[0, :, :, :p][..., valid, :], expected["prefix_k_layer0"][..., valid, :])
    # Layer 0 K/V are computed from the embeddings alone, so padded positions match too.
    _close(cache.v[0, :, :, :p], expected["prefix_v_layer0"])


def test_fixture_suffix_and_time(openpi):
    model, config, inputs, expected, batch = openpi
    _, cache = _prefix(model, batch)
    conds = model.time_conditioning(10)
    _close(conds.cond[:1], expected["adarms_cond_t1"])
    _close(model.embed_suffix(inputs["state"], inputs["noise"], conds, 0),
           expected["suffix_embs_t1"])
    _close(model.denoise_step(cache, inputs["state"], inputs["noise"], conds, 0),
           expected["v_t1"])
    flags = torch.zeros(50, dtype=torch.bool)
    flags[0] = True
    assert torch.equal(expected["suffix_att_mask"], flags)


@pytest.mark.parametrize("steps", [10, 3])
def test_fixture_actions(openpi, steps):
    model, _, inputs, expected, batch = openpi
    assert torch.equal(torch.tensor(time_grid(steps)[1]), expected[f"times_{steps}"])
    actions = model.sample_actions(**batch, state=inputs["state"], noise=inputs["noise"],
                                   num_steps=steps)
    _close(actions, expected[f"actions_{steps}"])


def test_fixture_trajectory(openpi):
    model, _, inputs, expected, batch = openpi
    _, cache = _prefix(model, batch)
    conds = model.time_conditioning(10)
    x = inputs["noise"]
    for k in range(10):
        _close(x, expected["trajectory_10"][k])
        v = model.denoise_step(cache, inputs["state"], x, conds, k)
        _close(v, expected["velocities_10"][k])
        x = x + conds.dt * v
    _close(x, expected["trajectory_10"][10])


def test_lerobot_layout_same_actions(openpi):
    _, _, inputs, expected, batch = openpi
    model, config = load_checkpoint(LEROBOT, geometry=LEROBOT / "fixture.json")
    assert config.cameras == ("base_0_rgb", "left_wrist_0_rgb")
    for steps in (10, 3):
        actions = model.sample_actions(**batch, state=inputs["state"], noise=inputs["noise"],
                                       num_steps=steps)
        _close(actions, expected[f"actions_{steps}"])


def test_lerobot_variant_names_need_geometry():
    from pi0_ros.model import CheckpointError

    with pytest.raises(CheckpointError, match="has shape .* expected .*--geometry"):
        load_checkpoint(LEROBOT)


def test_cli_reproduces_fixture(tmp_path):
    from pi0_ros.tools.infer import main

    for steps in (10, 3):
        out = tmp_path / f"a{steps}.safetensors"
        assert main(["--checkpoint", str(OPENPI), "--inputs", str(OPENPI / "inputs.safetensors"),
                     "--num-steps", str(steps), "--output", str(out)]) == 0
        expected = load_file(str(OPENPI / "expected.safetensors"))[f"actions_{steps}"]
        _close(load_file(str(out))["actions"], expected)


# -- random tiny configs --------------------------------------------------------------------------
def _random_batch(config: Pi0Config, batch: int, seed: int, valid_tokens=(20, 7)):
    g = torch.Generator().manual_seed(seed)
    n, s, length = config.num_cameras, config.vision.image_size, config.max_token_len
    token_mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        token_mask[b, :valid_tokens[b % len(valid_tokens)]] = True
    tokens = torch.randint(3, config.lm.vocab_size, (batch, length), generator=g)
    return dict(
        images=torch.rand(batch, n, 3, s, s, generator=g) * 2 - 1,
        image_masks=torch.ones(batch, n, dtype=torch.bool),
        tokens=torch.where(token_mask, tokens, 0),
        token_mask=token_mask,
        state=torch.randn(batch, config.action_dim, generator=g),
        noise=torch.randn(batch, config.action_horizon, config.action_dim, generator=g),
    )


def _model(pi05: bool, cameras: int = 3, seed: int = 0, **overrides):
    config = tiny_config(pi05=pi05, num_cameras=cameras, **overrides)
    return random_init_(Pi0Model(config), seed).eval(), config


def _joint_velocity(model: Pi0Model, batch, x_t, conds, step):
    """Reference: one joint pass of prefix + suffix through both stacks, masks and positions
    built directly from SEMANTICS §5 (block flags, cumsum rule, cumsum(pad) - 1 positions)."""
    cfg = model.config
    embs, pad = model.embed_prefix(model.embed_images(batch["images"]), batch["image_masks"],
                                   batch["tokens"], batch["token_mask"])
    suffix = model.embed_suffix(batch["state"], x_t, conds, step).to(model.dtype)
    b, p, s = embs.shape[0], embs.shape[1], suffix.shape[1]
    flags = torch.zeros(p + s, dtype=torch.long)
    flags[p] = 1
    if not cfg.pi05:
        flags[p + 1] = 1
    full_pad = torch.cat([pad, torch.ones(b, s, dtype=torch.bool)], dim=1)
    c = torch.cumsum(flags, 0)
    allowed = (c[None, :] <= c[:, None])[None] & full_pad[:, None, :] & full_pad[:, :, None]
    mask = torch.where(allowed, 0.0, MASK_VALUE)[:, None]
    positions = torch.cumsum(full_pad.long(), dim=1) - 1
    cos, sin = rope_tables(positions, cfg.lm.head_dim, cfg.lm.rope_theta, model.dtype)
    mods = conds.modulation[step] if cfg.pi05 else None
    xs = [embs, suffix]
    for i, (lm_layer, ex_layer) in enumerate(zip(model.lm.layers, model.expert.layers)):
        layers = (lm_layer, ex_layer)
        layer_mods = [(None, None), (None, None) if mods is None else (mods[2 * i],
                                                                        mods[2 * i + 1])]
        gates, qs, ks, vs = [], [], [], []
        for x, layer, m in zip(xs, layers, layer_mods):
            h, g = layer.input_layernorm(x, m[0])
            att = layer.self_attn
            n = x.shape[1]
            qs.append(att.q_proj(h).view(b, n, att.num_heads, att.head_dim).transpose(1, 2))
            ks.append(att.k_proj(h).view(b, n, att.num_kv_heads, att.head_dim).transpose(1, 2))
            vs.append(att.v_proj(h).view(b, n, att.num_kv_heads, att.head_dim).transpose(1, 2))
            gates.append(g)
        q = apply_rope(torch.cat(qs, 2), cos, sin)
        k = apply_rope(torch.cat(ks, 2), cos, sin).repeat_interleave(q.shape[1] // ks[0].shape[1],
                                                                     dim=1)
        v = torch.cat(vs, 2).repeat_interleave(q.shape[1] // vs[0].shape[1], dim=1)
        logits = q @ k.transpose(2, 3) * cfg.lm.head_dim**-0.5 + mask
        out = (torch.softmax(logits.float(), -1).to(v.dtype) @ v).transpose(1, 2).reshape(
            b, p + s, -1)
        new = []
        for j, (x, layer, m, g) in enumerate(zip(xs, layers, layer_mods, gates)):
            o = layer.self_attn.o_proj(out[:, :p] if j == 0 else out[:, p:])
            x = x + (o if g is None else o * g)
            h, g2 = layer.post_attention_layernorm(x, m[1])
            y = layer.mlp(h)
            new.append(x + (y if g2 is None else y * g2))
        xs = new
    final, _ = model.expert.norm(xs[1], None if mods is None else mods[-1])
    return model.action_out_proj(final[:, -cfg.action_horizon:].float())


@pytest.mark.parametrize("pi05", [True, False])
def test_kv_cache_equals_joint_pass(pi05):
    model, config = _model(pi05, cameras=3, seed=1)
    batch = _random_batch(config, 2, seed=2)
    batch["image_masks"][1, 0] = False  # masked leading camera: positions start at -1
    _, cache = _prefix(model, batch)
    conds = model.time_conditioning(4)
    x = batch["noise"]
    for step in range(conds.num_steps):
        cached = model.denoise_step(cache, batch["state"], x, conds, step)
        joint = _joint_velocity(model, batch, x, conds, step)
        _close(cached, joint, KV_VS_JOINT_ATOL)
        x = x + conds.dt * cached
    # the full sampler is exactly this loop
    _close(model.sample_actions(**{k: batch[k] for k in batch}, num_steps=4), x, 0.0)


@pytest.mark.parametrize("pi05", [True, False])
@pytest.mark.parametrize("masked_slot", [0, 1, 2])
def test_masked_camera_and_padding_do_not_matter(pi05, masked_slot):
    model, config = _model(pi05, cameras=3, seed=3)
    batch = _random_batch(config, 1, seed=4)
    batch["image_masks"][0, masked_slot] = False
    reference = model.sample_actions(**batch, num_steps=3)

    changed = {**batch, "images": batch["images"].clone()}
    changed["images"][0, masked_slot] = -1.0  # masked camera content is never attended
    _close(model.sample_actions(**changed, num_steps=3), reference, 1e-6)

    padded = {**batch, "tokens": batch["tokens"].clone()}
    padded["tokens"][0, 30:] = 77  # ids under mask False are never attended
    _close(model.sample_actions(**padded, num_steps=3), reference, 1e-6)

    token = {**batch, "tokens": batch["tokens"].clone()}
    token["tokens"][0, 5] = (token["tokens"][0, 5] + 1) % config.lm.vocab_size
    assert (model.sample_actions(**token, num_steps=3) - reference).abs().max() > 1e-4

    image = {**batch, "images": batch["images"].clone()}
    valid_slot = (masked_slot + 1) % 3
    image["images"][0, valid_slot] = image["images"][0, valid_slot].flip(-1)
    assert (model.sample_actions(**image, num_steps=3) - reference).abs().max() > 1e-4

    state = {**batch, "state": batch["state"] + 0.5}
    state_diff = (model.sample_actions(**state, num_steps=3) - reference).abs().max()
    if pi05:  # pi0.5 reads the state only through the prompt tokens
        assert state_diff == 0
    else:
        assert state_diff > 1e-4


@pytest.mark.parametrize("pi05", [True, False])
def test_batch_of_two_equals_two_of_one(pi05):
    model, config = _model(pi05, cameras=2, seed=5)
    batch = _random_batch(config, 2, seed=6, valid_tokens=(25, 9))
    batch["image_masks"][1, 1] = False
    both = model.sample_actions(**batch, num_steps=5)
    for b in range(2):
        single = model.sample_actions(**{k: v[b:b + 1] for k, v in batch.items()}, num_steps=5)
        _close(both[b:b + 1], single, BATCH_ATOL)


@pytest.mark.parametrize("pi05", [True, False])
def test_any_number_of_cameras_in_given_order(pi05):
    model, config = _model(pi05, cameras=1, seed=7)
    assert config.prefix_len() == 49 + config.max_token_len
    batch = _random_batch(config, 1, seed=8)
    assert torch.isfinite(model.sample_actions(**batch, num_steps=2)).all()
    model3, config3 = _model(pi05, cameras=3, seed=7)
    batch3 = _random_batch(config3, 1, seed=8)
    swapped = {**batch3, "images": batch3["images"][:, [1, 0, 2]]}
    assert (model3.sample_actions(**swapped, num_steps=2)
            - model3.sample_actions(**batch3, num_steps=2)).abs().max() > 1e-4


def test_noise_drawn_inside_is_seeded():
    model, config = _model(True, cameras=2, seed=9)
    batch = _random_batch(config, 1, seed=10)
    del batch["noise"]
    a = model.sample_actions(**batch, num_steps=2, generator=torch.Generator().manual_seed(3))
    b = model.sample_actions(**batch, num_steps=2, generator=torch.Generator().manual_seed(3))
    c = model.sample_actions(**batch, num_steps=2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("pi05", [True, False])
def test_bfloat16_close_to_float32(pi05):
    model, config = _model(pi05, cameras=2, seed=11)
    batch = _random_batch(config, 2, seed=12)
    reference = model.sample_actions(**batch, num_steps=10)
    model_bf16, _ = _model(pi05, cameras=2, seed=11)
    model_bf16.set_precision("bfloat16")
    assert model_bf16.dtype == torch.bfloat16
    # openpi's float32 islands (SEMANTICS §10)
    params = dict(model_bf16.named_parameters())
    assert params["vision.embeddings.patch_embedding.weight"].dtype == torch.float32
    assert params["lm.layers.0.input_layernorm.weight"].dtype == torch.float32
    assert params["action_in_proj.weight"].dtype == torch.float32
    assert params["lm.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert params["vision.layers.0.layer_norm1.weight"].dtype == torch.bfloat16
    actions = model_bf16.sample_actions(**batch, num_steps=10)
    assert actions.dtype == torch.float32
    limit = BF16_REL * max(1.0, reference.abs().max().item())
    diff = (actions - reference).abs().max().item()
    assert 0 < diff <= limit, f"bf16 vs f32 max |diff| {diff:.3g} (limit {limit:.3g})"


@pytest.mark.parametrize("pi05", [True, False])
def test_sampling_has_no_host_sync(pi05):
    """On the meta device any .item() / data-dependent branch raises: the stages are
    capture-safe (static shapes, no host synchronization)."""
    config = tiny_config(pi05=pi05, num_cameras=2)
    with torch.device("meta"):
        model = Pi0Model(config)
        batch = _random_batch_meta(config)
    cache = model.new_cache(2, 2)
    model.fill_prefix(cache, model.embed_images(batch["images"]), batch["image_masks"],
                      batch["tokens"], batch["token_mask"])
    ptr = cache.k.data_ptr()
    conds = model.time_conditioning(3)
    out = model.denoise(cache, batch["state"], batch["noise"], conds)
    assert out.shape == (2, config.action_horizon, config.action_dim)
    assert cache.k.data_ptr() == ptr  # the cache is written in place, never reallocated


def _random_batch_meta(config):
    n, s, length = config.num_cameras, config.vision.image_size, config.max_token_len
    return dict(images=torch.empty(2, n, 3, s, s), image_masks=torch.empty(2, n, dtype=torch.bool),
                tokens=torch.empty(2, length, dtype=torch.long),
                token_mask=torch.empty(2, length, dtype=torch.bool),
                state=torch.empty(2, config.action_dim),
                noise=torch.empty(2, config.action_horizon, config.action_dim))


def test_steps_reuse_one_cache_without_copies(monkeypatch):
    model, config = _model(True, cameras=2, seed=13)
    batch = _random_batch(config, 1, seed=14)
    _, cache = _prefix(model, batch)
    prefix_k = cache.k[:, :, :, :cache.prefix_len].clone()
    clones = []
    original = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: clones.append(t.shape)
                        or original(t, *a, **k))
    model.denoise(cache, batch["state"], batch["noise"], model.time_conditioning(3))
    monkeypatch.undo()
    assert not clones
    assert torch.equal(cache.k[:, :, :, :cache.prefix_len], prefix_k)  # prefix untouched


def test_time_grid_matches_openpi_loop():
    for n in (1, 2, 3, 5, 7, 10, 20, 33):
        dt, times = time_grid(n)
        t, dtt, ref = torch.tensor(1.0), torch.tensor(-1.0 / n), []
        while t >= -dtt / 2:  # openpi's loop, float32 tensors
            ref.append(t.item())
            t = t + dtt
        assert list(times) == ref and dt == dtt.item()
    with pytest.raises(ValueError, match="num_steps"):
        time_grid(0)


def test_full_size_openpi_cameras_default():
    assert Pi0Config.preset("pi05").cameras == OPENPI_CAMERAS
    assert Pi0Config.preset("pi0").max_token_len == 48
    assert Pi0Config.preset("pi05").max_token_len == 200
    assert Pi0Config.preset("pi05").prefix_len() == 968
    assert Pi0Config.preset("pi0").prefix_len() == 816
    assert math.isclose(Pi0Config.preset("pi0").expert.width, 1024)
