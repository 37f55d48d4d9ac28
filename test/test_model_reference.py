"""Independent float64 reference of the pi0 / pi0.5 forward pass, checked against the model.

The reference below is written only from SEMANTICS.md (sections 3, 5-9, 11) and works directly on
a state dict keyed by the openpi checkpoint names; it shares no code with ``pi0_ros.model``
(which is used only to build random tiny models, write them with ``save_checkpoint`` and run the
model under test). It is one joint prefix+suffix pass per denoising step (no KV cache), with the
big_vision cumsum mask rule and the position ids of §5.

1. The reference is validated against the openpi fixture (actions_10, actions_3, v_t1).
2. The float32 model under test is compared with it on random tiny pi0 / pi0.5 configurations
   (batch, cameras, masked cameras, prompt padding, state, steps, token length, horizon).
3. Perturbed references (one weight, one RoPE position, the mask rule) must disagree, so the
   comparison can fail.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pi0_ros.model import Pi0Model, load_checkpoint, random_init_, save_checkpoint, tiny_config

OPENPI = Path(__file__).parent / "fixtures" / "openpi_tiny_pi05"

REF_VS_OPENPI_ATOL = 1e-5  # float64 reference vs openpi's float32 fixture values
MODEL_VS_REF_ATOL = 1e-4  # float32 model under test vs the float64 reference (SEMANTICS §12)
PERTURBED_MIN_DIFF = 10 * MODEL_VS_REF_ATOL  # a perturbed reference must be at least this far off

MASK_VALUE = -2.3819763e38  # additive mask value (§5)
P = "paligemma_with_expert."
VIS = P + "paligemma.model.vision_tower.vision_model."
LM = P + "paligemma.model.language_model."
EXPERT = P + "gemma_expert.model."

torch.set_grad_enabled(False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 matmuls: intra-op threads only add latency, and under CPU contention (other
    test processes on a 2-core machine) they make this module several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ================================================================================================
# Reference (float64, plain torch, from SEMANTICS.md only)
# ================================================================================================
def _linear(sd, name, x, bias=True):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"] if bias else None)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _swish(x):
    return x * torch.sigmoid(x)


def _layer_norm(sd, name, x, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def _rms(x, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _siglip(sd, geo, images):
    """images (n, 3, S, S) -> (n, T, W_vision) (§5 'Image tokens')."""
    v = geo["vision"]
    p, heads, eps = v["patch_size"], v["heads"], v["layer_norm_eps"]
    n, c, s, _ = images.shape
    g = s // p
    # Patchify by hand: (n, c, g, p, g, p) -> (n, g*g, c*p*p), row-major over (row, col).
    patches = images.reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)
    w = sd[VIS + "embeddings.patch_embedding.weight"]
    x = patches @ w.reshape(w.shape[0], -1).T + sd[VIS + "embeddings.patch_embedding.bias"]
    x = x + sd[VIS + "embeddings.position_embedding.weight"]
    width = x.shape[-1]
    hd = width // heads
    for i in range(v["layers"]):
        pre = VIS + f"encoder.layers.{i}."
        h = _layer_norm(sd, pre + "layer_norm1", x, eps)
        q, k, val = (_linear(sd, pre + f"self_attn.{m}_proj", h).reshape(n, -1, heads, hd)
                     .transpose(1, 2) for m in ("q", "k", "v"))
        att = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5, dim=-1)
        o = (att @ val).transpose(1, 2).reshape(n, -1, width)
        x = x + _linear(sd, pre + "self_attn.out_proj", o)
        h = _layer_norm(sd, pre + "layer_norm2", x, eps)
        x = x + _linear(sd, pre + "mlp.fc2", _gelu_tanh(_linear(sd, pre + "mlp.fc1", h)))
    return _layer_norm(sd, VIS + "post_layernorm", x, eps)


def _time_embedding(t, dim, min_period, max_period):
    """Scalar t -> (dim,) float64: all sines, then all cosines (§7)."""
    half = dim // 2
    frac = torch.tensor([j / (half - 1) for j in range(half)], dtype=torch.float64)
    period = min_period * (max_period / min_period) ** frac
    a = t * 2.0 * math.pi / period
    return torch.cat([torch.sin(a), torch.cos(a)])


def _rope(x, pos, theta):
    """x (B, heads, T, Dh), pos (B, T) -> rotate_half RoPE (§6)."""
    dh = x.shape[-1]
    inv_freq = theta ** (-2.0 * torch.arange(dh // 2, dtype=torch.float64) / dh)
    ang = pos.to(torch.float64)[:, None, :, None] * inv_freq  # (B, 1, T, Dh/2)
    cos, sin = torch.cos(ang), torch.sin(ang)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclass
class Mutation:
    """Deliberate deviations from the semantics, to show the comparison can fail."""

    suffix_position_shift: int = 0  # added to every suffix RoPE position
    position_edits: tuple = ()  # (row, index in the joint sequence, delta) for single positions
    state_attends_actions: bool = False  # pi0: suffix flags [1, 0, ...] instead of [1, 1, 0, ...]
    weights: dict = field(default_factory=dict)  # key -> (flat index, delta)


def reference_sample(sd, geo, images, image_masks, tokens, token_mask, state, noise, num_steps,
                     mutation: Mutation | None = None):
    """openpi ``sample_actions`` in float64 -> (actions (B, H, A), [v of each step]).

    sd: openpi-keyed float64 tensors; geo: a fixture-layout geometry dict; images (B, N, 3, S, S)
    in [-1, 1]; image_masks (B, N) bool; tokens / token_mask (B, L); state (B, A); noise (B, H, A).
    """
    mut = mutation or Mutation()
    if mut.weights:
        sd = dict(sd)
        for key, (idx, delta) in mut.weights.items():
            t = sd[key].clone()
            t.view(-1)[idx] += delta
            sd[key] = t
    pi05 = "time_mlp_in.weight" in sd
    assert pi05 == bool(geo.get("pi05", pi05))
    lm, ex = geo["lm"], geo["expert"]
    nh, nkv, dh = lm["num_heads"], lm["num_kv_heads"], lm["head_dim"]
    depth, theta = lm["depth"], lm["rope_theta"]
    te = geo.get("time_embedding", {})
    min_period, max_period = te.get("min_period", 4e-3), te.get("max_period", 4.0)
    f64 = torch.float64
    b, n_cam = image_masks.shape
    h_len = noise.shape[1]

    # -- prefix (§5) -----------------------------------------------------------------------------
    img = _siglip(sd, geo, images.to(f64).flatten(0, 1))
    img = _linear(sd, P + "paligemma.model.multi_modal_projector.linear", img)
    tpi = img.shape[1]
    img = img.reshape(b, n_cam * tpi, -1)
    table = sd[P + "paligemma.lm_head.weight"]
    lang = table[tokens.long()] * math.sqrt(table.shape[1])
    prefix = torch.cat([img, lang], dim=1)
    prefix_pad = torch.cat([image_masks.bool().repeat_interleave(tpi, dim=1),
                            token_mask.bool()], dim=1)
    n_prefix = prefix.shape[1]
    prefix_pos = torch.cumsum(prefix_pad.long(), dim=1) - 1

    # -- suffix layout, joint mask and positions (§5) --------------------------------------------
    s_len = h_len if pi05 else h_len + 1
    suffix_flags = torch.zeros(s_len, dtype=torch.long)
    suffix_flags[0] = 1
    if not pi05 and not mut.state_attends_actions:
        suffix_flags[1] = 1
    flags = torch.cat([torch.zeros(n_prefix, dtype=torch.long), suffix_flags])
    pad = torch.cat([prefix_pad, torch.ones(b, s_len, dtype=torch.bool)], dim=1)
    c = torch.cumsum(flags, 0)
    allowed = (c[None, :] <= c[:, None])[None] & pad[:, :, None] & pad[:, None, :]
    mask = torch.where(allowed, 0.0, MASK_VALUE).to(f64)[:, None]  # (B, 1, T, T)
    n_valid = prefix_pad.sum(dim=1, keepdim=True)
    suffix_pos = n_valid + torch.arange(s_len) + mut.suffix_position_shift
    pos = torch.cat([prefix_pos, suffix_pos], dim=1)
    for row, idx, delta in mut.position_edits:
        pos[row, idx] += delta

    lm_keys = [LM + f"layers.{i}." for i in range(depth)]
    ex_keys = [EXPERT + f"layers.{i}." for i in range(depth)]

    def norm(stream_key, x, cond, eps):
        """-> (normalized x, gate or None)."""
        if cond is None:
            return _rms(x, eps) * (1.0 + sd[stream_key + ".weight"]), None
        mod = _linear(sd, stream_key + ".dense", cond)  # (B, 3*We): scale, shift, gate
        scale, shift, gate = mod.chunk(3, dim=-1)
        return _rms(x, eps) * (1.0 + scale[:, None]) + shift[:, None], gate[:, None]

    def velocity(x_t, t):
        # Suffix embedding (§7).
        temb = _time_embedding(torch.tensor(t, dtype=f64), ex["width"], min_period, max_period)
        act = _linear(sd, "action_in_proj", x_t)
        if pi05:
            cond = _swish(_linear(sd, "time_mlp_out", _swish(_linear(sd, "time_mlp_in", temb))))
            cond = cond.expand(b, -1)
            suffix = act
        else:
            cond = None
            mixed = torch.cat([act, temb.expand(b, h_len, -1)], dim=-1)
            act = _linear(sd, "action_time_mlp_out",
                          _swish(_linear(sd, "action_time_mlp_in", mixed)))
            st = _linear(sd, "state_proj", state.to(f64))[:, None]
            suffix = torch.cat([st, act], dim=1)

        xs = [prefix, suffix]
        streams = [(lm_keys, None, lm["rms_norm_eps"]), (ex_keys, cond, ex["rms_norm_eps"])]
        for li in range(depth):
            hs, gates, qs, ks, vs = [], [], [], [], []
            for x, (keys, cnd, eps) in zip(xs, streams):
                pre = keys[li]
                h, g1 = norm(pre + "input_layernorm", x, cnd, eps)
                hs.append(h)
                gates.append(g1)
                t_len = x.shape[1]
                qs.append(_linear(sd, pre + "self_attn.q_proj", h, False)
                          .reshape(b, t_len, nh, dh).transpose(1, 2))
                ks.append(_linear(sd, pre + "self_attn.k_proj", h, False)
                          .reshape(b, t_len, nkv, dh).transpose(1, 2))
                vs.append(_linear(sd, pre + "self_attn.v_proj", h, False)
                          .reshape(b, t_len, nkv, dh).transpose(1, 2))
            q = _rope(torch.cat(qs, dim=2), pos, theta)
            k = _rope(torch.cat(ks, dim=2), pos, theta)
            v = torch.cat(vs, dim=2)
            # Grouped queries: query head i uses KV head i // (Nh / Nkv).
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
            logits = q @ k.transpose(-1, -2) * dh ** -0.5 + mask
            out = torch.softmax(logits, dim=-1) @ v  # (B, Nh, T, Dh)
            out = out.transpose(1, 2).reshape(b, -1, nh * dh)
            new_xs, start = [], 0
            for x, (keys, cnd, eps), g1 in zip(xs, streams, gates):
                pre = keys[li]
                o = _linear(sd, pre + "self_attn.o_proj", out[:, start:start + x.shape[1]], False)
                start += x.shape[1]
                x = x + (o if g1 is None else o * g1)
                h, g2 = norm(pre + "post_attention_layernorm", x, cnd, eps)
                m = _linear(sd, pre + "mlp.down_proj",
                            _gelu_tanh(_linear(sd, pre + "mlp.gate_proj", h, False))
                            * _linear(sd, pre + "mlp.up_proj", h, False), False)
                new_xs.append(x + (m if g2 is None else m * g2))
            xs = new_xs
        out, _ = norm(EXPERT + "norm", xs[1], cond, ex["rms_norm_eps"])
        return _linear(sd, "action_out_proj", out[:, -h_len:])

    # -- Euler loop (§8) -------------------------------------------------------------------------
    dt = np.float32(-1.0 / num_steps)
    t = np.float32(1.0)
    x = noise.to(f64)
    vels = []
    while t >= -dt / 2:
        v_t = velocity(x, float(t))
        vels.append(v_t)
        x = x + float(dt) * v_t
        t = np.float32(t + dt)
    assert len(vels) == num_steps
    return x, vels


# ================================================================================================
# Helpers
# ================================================================================================
def _max_diff(a, b):
    return (a.to(torch.float64) - b.to(torch.float64)).abs().max().item()


def _load_sd(path):
    return {k: v.to(torch.float64) for k, v in load_file(str(path)).items()}


@pytest.fixture(scope="module")
def fixture_data():
    sd = _load_sd(OPENPI / "model.safetensors")
    geo = json.loads((OPENPI / "config.json").read_text())["geometry"]
    inputs = load_file(str(OPENPI / "inputs.safetensors"))
    expected = load_file(str(OPENPI / "expected.safetensors"))
    cams = geo["cameras"]
    batch = dict(
        images=torch.stack([inputs[f"image.{c}"] for c in cams], dim=1),
        image_masks=torch.stack([inputs[f"image_mask.{c}"] for c in cams], dim=1),
        tokens=inputs["tokenized_prompt"].long(),
        token_mask=inputs["tokenized_prompt_mask"],
        state=inputs["state"],
        noise=inputs["noise"],
    )
    return sd, geo, batch, expected


# ================================================================================================
# 1. The reference reproduces openpi's fixture
# ================================================================================================
@pytest.mark.parametrize("steps", [10, 3])
def test_reference_matches_openpi_fixture(fixture_data, steps):
    sd, geo, batch, expected = fixture_data
    actions, vels = reference_sample(sd, geo, **batch, num_steps=steps)
    diff = _max_diff(actions, expected[f"actions_{steps}"])
    assert diff <= REF_VS_OPENPI_ATOL, f"actions_{steps}: max |diff| = {diff:.3g}"
    diff = _max_diff(vels[0], expected["v_t1"])
    assert diff <= REF_VS_OPENPI_ATOL, f"v_t1: max |diff| = {diff:.3g}"
    if steps == 10:
        diff = _max_diff(torch.stack(vels), expected["velocities_10"])
        assert diff <= REF_VS_OPENPI_ATOL, f"velocities_10: max |diff| = {diff:.3g}"


# ================================================================================================
# 2. The model under test matches the reference
# ================================================================================================
@dataclass(frozen=True)
class Case:
    pi05: bool
    masks: tuple  # per row: camera mask tuple (its length is the number of cameras)
    prompt_lens: tuple  # per row: number of valid prompt tokens (BOS first, then right-padded)
    steps: int
    max_token_len: int = 0  # 0: the config default (48 pi0, 200 pi0.5)
    action_horizon: int = 50
    seed: int = 0
    garbage_padding: bool = False  # random ids (not 0) under token_mask False


CASES = {
    # pi0.5 (the state input is non-zero but must be ignored)
    "pi05-b1-cam1-fullprompt-s10": Case(True, ((True,),), (200,), 10),
    "pi05-b2-cam2-mask0|mask1-s3": Case(True, ((False, True), (True, False)), (7, 200), 3),
    "pi05-b2-cam3-mask1|only2-s10-L17": Case(
        True, ((True, False, True), (False, False, True)), (17, 1), 10, max_token_len=17),
    "pi05-b1-cam3-mask2-s1-L17": Case(True, ((True, True, False),), (5,), 1, max_token_len=17,
                                      seed=3),
    "pi05-b2-cam2-H10-s3-garbagepad": Case(True, ((True, True), (False, True)), (3, 40), 3,
                                           action_horizon=10, seed=4, garbage_padding=True),
    # pi0 (non-zero state)
    "pi0-b1-cam1-fullprompt-s10": Case(False, ((True,),), (48,), 10, seed=1),
    "pi0-b2-cam2-mask0|mask1-s3": Case(False, ((False, True), (True, False)), (2, 48), 3, seed=1),
    "pi0-b2-cam3-mask1|only0-s10-L17": Case(
        False, ((True, False, True), (True, False, False)), (1, 17), 10, max_token_len=17,
        seed=2),
    "pi0-b1-cam3-mask2-s1": Case(False, ((True, True, False),), (11,), 1, seed=2),
    "pi0-b2-cam3-H7-s3-garbagepad": Case(
        False, ((False, True, True), (True, True, True)), (20, 48), 3, action_horizon=7, seed=5,
        garbage_padding=True),
}


def _case_inputs(case: Case, config, seed: int):
    gen = torch.Generator().manual_seed(1000 + seed)
    b, n = len(case.masks), len(case.masks[0])
    s, L = config.vision.image_size, config.max_token_len
    # Masked cameras keep random content: anything leaking from them would show up.
    images = torch.rand(b, n, 3, s, s, generator=gen) * 2 - 1
    image_masks = torch.tensor(case.masks, dtype=torch.bool)
    tokens = torch.zeros(b, L, dtype=torch.long)
    token_mask = torch.zeros(b, L, dtype=torch.bool)
    if case.garbage_padding:
        tokens = torch.randint(3, config.lm.vocab_size, (b, L), generator=gen)
    for r, m in enumerate(case.prompt_lens):
        assert 1 <= m <= L
        tokens[r, :m] = torch.randint(3, config.lm.vocab_size, (m,), generator=gen)
        tokens[r, 0] = 2  # BOS
        token_mask[r, :m] = True
    state = torch.randn(b, config.action_dim, generator=gen)
    noise = torch.randn(b, config.action_horizon, config.action_dim, generator=gen)
    return dict(images=images, image_masks=image_masks, tokens=tokens, token_mask=token_mask,
                state=state, noise=noise)


def _build(case: Case, tmp_path):
    """-> (model under test loaded from the checkpoint, float64 openpi-keyed sd, geometry)."""
    config = tiny_config(pi05=case.pi05, num_cameras=len(case.masks[0]),
                         max_token_len=case.max_token_len, action_horizon=case.action_horizon)
    model = random_init_(Pi0Model(config), seed=case.seed).eval()
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    loaded, loaded_cfg = load_checkpoint(ckpt)
    assert loaded_cfg.max_token_len == config.max_token_len
    assert loaded_cfg.action_horizon == case.action_horizon
    geo = json.loads((ckpt / "config.json").read_text())["geometry"]
    return loaded, config, _load_sd(ckpt / "model.safetensors"), geo


def _run_both(case, tmp_path, mutation=None):
    model, config, sd, geo = _build(case, tmp_path)
    batch = _case_inputs(case, config, case.seed)
    actual = model.sample_actions(batch["images"], batch["image_masks"], batch["tokens"],
                                  batch["token_mask"], batch["state"], noise=batch["noise"],
                                  num_steps=case.steps)
    expected, _ = reference_sample(sd, geo, **batch, num_steps=case.steps, mutation=mutation)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    return actual, expected


@pytest.mark.parametrize("name", list(CASES))
def test_model_matches_reference(name, tmp_path):
    actual, expected = _run_both(CASES[name], tmp_path)
    diff = _max_diff(actual, expected)
    print(f"{name}: max |diff| = {diff:.3g}")
    assert diff <= MODEL_VS_REF_ATOL, f"{name}: max |actions diff| = {diff:.3g}"


# ================================================================================================
# 3. The comparison can fail
# ================================================================================================
PERTURBATIONS = {
    "pi05-lm-k-weight": (
        "pi05-b2-cam2-mask0|mask1-s3",
        Mutation(weights={LM + "layers.1.self_attn.k_proj.weight": (5, 0.5)})),
    "pi0-expert-norm-weight": (
        "pi0-b1-cam3-mask2-s1",
        Mutation(weights={EXPERT + "layers.2.post_attention_layernorm.weight": (3, 0.5)})),
    "pi05-suffix-rope-position+1": ("pi05-b1-cam3-mask2-s1-L17",
                                    Mutation(suffix_position_shift=1)),
    "pi0-one-text-rope-position+1": ("pi0-b1-cam3-mask2-s1",
                                     Mutation(position_edits=((0, 3 * 49 + 4, 1),))),
    "pi0-state-attends-actions": ("pi0-b1-cam3-mask2-s1", Mutation(state_attends_actions=True)),
}


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_perturbed_reference_disagrees(name, tmp_path):
    case_name, mutation = PERTURBATIONS[name]
    actual, expected = _run_both(CASES[case_name], tmp_path, mutation)
    diff = _max_diff(actual, expected)
    print(f"{name}: max |diff| = {diff:.3g}")
    assert diff >= PERTURBED_MIN_DIFF, f"{name}: perturbation only moved actions by {diff:.3g}"
