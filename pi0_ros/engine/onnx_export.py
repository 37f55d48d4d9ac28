"""ONNX export of the three inference stages (the input of the TensorRT backend).

Stages, each a small ``nn.Module`` around the model's own submodules, exported with a dynamic
batch axis (``batch``) and every other shape fixed by the configuration (``stage_shapes``):

    vision        images (B, N, 3, S, S) f32                    -> image_tokens (B, N*T, W)
    prefix        image_tokens, image_masks (B, N) bool,
                  tokens (B, L) i64, token_mask (B, L) bool      -> prefix_k, prefix_v
                                                                    (depth, B, Nkv, P, Dh),
                                                                    suffix_mask (B, 1, S', P+S')
                                                                    f32 additive, suffix_cos,
                                                                    suffix_sin (B, S', Dh)
    denoise       prefix_k, prefix_v, suffix_mask, suffix_cos,
                  suffix_sin, noise (B, H, A) f32 [, state]      -> actions (B, H, A) f32
    denoise_step  the cache tensors, x_t (B, H, A) f32, the
                  step's conditioning [, state]                  -> velocity (B, H, A) f32

``denoise`` is the Euler loop unrolled for a fixed step count (the time conditioning of every
step is a graph constant); ``denoise_step`` is one velocity evaluation for a run-time loop, its
conditioning an input (pi0 ``time_emb`` (We,), pi0.5 ``modulation`` (2*depth+1, 3, We)).
``state`` (B, A) f32 is an input of pi0 only (pi0.5 has no state token). Activations (image
tokens, K/V, RoPE tables) are in the model's stack dtype: float32, or bfloat16 after
``model.set_precision("bfloat16")`` (openpi's float32 islands are kept as explicit casts).

The prefix outputs are exactly what ``PrefixCache`` holds for the denoising steps (``k[:P]``,
``v[:P]``, ``suffix_mask``, ``suffix_cos``, ``suffix_sin``).

Why wrappers instead of exporting ``fill_prefix`` / ``denoise`` as they are: the eager model writes
K/V into slices of static buffers (``copy_``); traced, those become scatter / slice-update ops on
buffers that are not graph outputs, and an engine would have to copy the cache to feed them. The
wrappers call the same submodules (norms, projections, RoPE, MLP, embeddings) functionally and
return fresh tensors. Two differences in the code, none in the math: ``AttentionCore`` is
``gemma.attend`` with the head counts and the 1/sqrt(Dh) scale as Python constants, and the
suffix attention takes its logits against the cached prefix and against the suffix as two
matmuls and its output as two matmuls summed, instead of one matmul over the concatenated buffer,
so the prefix K/V are never copied per step inside the engine (summation order only; checked
against eager at 1e-4 in test/test_onnx_export.py).

Named scopes matter: ONNX node names follow the wrapper modules, e.g.
``/lm.0/input_layernorm/ReduceMean``, ``/expert.2/attention_core/Softmax``,
``/vision/layers.0/layer_norm1/...``, ``/norm_1/...`` (the expert's final norm),
``/attention_mask/...`` and ``/rope_tables/...`` (mask value and RoPE angles need float32).
``tensorrt.fp32_island`` pins those to float32 in weakly typed FP16 / BF16 builds.

The exporter is the TorchScript one (``torch.onnx.export(..., dynamo=False)``): it works offline
with torch alone; the dynamo exporter needs ``onnxscript``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..model import Pi0Model, TimeConditioning
from ..model.gemma import MASK_VALUE, apply_rope, rope_tables
from .base import ModelInputs, dummy_inputs

log = logging.getLogger(__name__)

STAGES = ("vision", "prefix", "denoise", "denoise_step")
DEFAULT_OPSET = 17  # LayerNormalization; accepted by TensorRT 8.6+ and every JetPack 6/7 release
EXPORT_FORMAT = 1  # bump when the stage I/O contract changes (part of the engine cache key)
EXPORT_BATCH = 2  # example batch for tracing (not 1: a traced 1 is easily baked as a constant)

_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vision": (("images",), ("image_tokens",)),
    "prefix": (("image_tokens", "image_masks", "tokens", "token_mask"),
               ("prefix_k", "prefix_v", "suffix_mask", "suffix_cos", "suffix_sin")),
    "denoise": (("prefix_k", "prefix_v", "suffix_mask", "suffix_cos", "suffix_sin", "noise"),
                ("actions",)),
    "denoise_step": (("prefix_k", "prefix_v", "suffix_mask", "suffix_cos", "suffix_sin", "x_t"),
                     ("velocity",)),
}
# Every stage tensor is batch-first except the stacked per-layer K/V.
BATCH_AXIS = {"prefix_k": 1, "prefix_v": 1}
# Step conditioning inputs: no batch axis.
UNBATCHED = ("time_emb", "modulation")


def stage_io(stage: str, pi05: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input names, output names) of a stage, in call order.

    ``denoise_step`` takes the step's conditioning (pi0 ``time_emb``, pi0.5 ``modulation``);
    the denoising stages of pi0 take ``state`` last (pi0.5 has no state token: its state, if
    any, is in the prompt)."""
    if stage not in _IO:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    inputs, outputs = _IO[stage]
    if stage == "denoise_step":
        inputs = inputs + (("modulation",) if pi05 else ("time_emb",))
    if stage in ("denoise", "denoise_step") and not pi05:
        inputs = inputs + ("state",)
    return inputs, outputs


def stage_shapes(config, stage: str, prompt_len: int,
                 num_cameras: int | None = None) -> dict[str, tuple[int | str, ...]]:
    """Every input / output shape of a stage; the batch axis is the string ``"batch"``."""
    cfg, B = config, "batch"
    n = num_cameras or cfg.num_cameras
    lm, v = cfg.lm, cfg.vision
    p = n * v.tokens_per_image + prompt_len
    s, h, a = cfg.suffix_len, cfg.action_horizon, cfg.action_dim
    kv = (lm.depth, B, lm.num_kv_heads, p, lm.head_dim)
    cache = {"prefix_k": kv, "prefix_v": kv, "suffix_mask": (B, 1, s, p + s),
             "suffix_cos": (B, s, lm.head_dim), "suffix_sin": (B, s, lm.head_dim)}
    known = {
        "images": (B, n, v.num_channels, v.image_size, v.image_size),
        "image_tokens": (B, n * v.tokens_per_image, lm.width),
        "image_masks": (B, n), "tokens": (B, prompt_len), "token_mask": (B, prompt_len),
        **cache, "state": (B, a), "noise": (B, h, a), "x_t": (B, h, a), "actions": (B, h, a),
        "velocity": (B, h, a), "time_emb": (cfg.expert.width,),
        "modulation": (cfg.num_adarms_norms, 3, cfg.expert.width),
    }
    inputs, outputs = stage_io(stage, cfg.pi05)
    return {name: known[name] for name in inputs + outputs}


def stage_dtypes(config, stage: str, activation: str = "float32") -> dict[str, str]:
    """ONNX element type of every input / output (``activation``: the model's stack dtype)."""
    act = {"float32": "FLOAT", "bfloat16": "BFLOAT16"}[activation]
    special = {"image_masks": "BOOL", "token_mask": "BOOL", "tokens": "INT64",
               "image_tokens": act, "prefix_k": act, "prefix_v": act, "suffix_cos": act,
               "suffix_sin": act}
    inputs, outputs = stage_io(stage, config.pi05)
    return {name: special.get(name, "FLOAT") for name in inputs + outputs}


def batch_axis(name: str) -> int | None:
    return None if name in UNBATCHED else BATCH_AXIS.get(name, 0)


# -- export modules -------------------------------------------------------------------------------
class AttentionCore(nn.Module):
    """Grouped-query attention core (no parameters): a named scope for the float32 islands.

    ``gemma.attend`` with the head counts and the 1/sqrt(Dh) scale as Python constants (the
    TorchScript exporter computes a scale taken from a traced shape in the graph and casts it to
    the wrong type for bfloat16). With ``k2``/``v2`` (the suffix's own keys/values) the logits
    against the cached prefix and against the suffix are concatenated before one float32 softmax
    and the output is the sum of the two probability-weighted value products: the math of
    attending ``cat(k, k2)`` without copying the cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.nh, self.nkv, self.dh = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5

    def forward(self, q, k, v, mask, k2=None, v2=None):
        # q (B, Nh, S, Dh); k, v (B, Nkv, P, Dh); k2, v2 (B, Nkv, S, Dh); mask (B, 1, S, K)
        nkv, g, dh = self.nkv, self.nh // self.nkv, self.dh
        s, p = int(q.shape[2]), int(k.shape[2])
        qg = q.reshape(-1, nkv, g * s, dh)
        logits = torch.matmul(qg, k.transpose(2, 3))
        if k2 is not None:
            logits = torch.cat([logits, torch.matmul(qg, k2.transpose(2, 3))], dim=-1)
        logits = logits * self.scale
        kl = int(logits.shape[-1])
        logits = logits.view(-1, nkv, g, s, kl) + mask[:, :, None]  # promotes to float32
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype)
        probs = probs.view(-1, nkv, g * s, kl)
        if k2 is None:
            out = torch.matmul(probs, v)
        else:
            out = torch.matmul(probs[..., :p], v) + torch.matmul(probs[..., p:], v2)
        return out.view(-1, self.nh, s, dh).transpose(1, 2).reshape(-1, s, self.nh * dh)


class AttentionMask(nn.Module):
    """bool "may attend" -> additive float32 mask (0 / -2.38e38): a named scope, because the mask
    value is -inf in FP16 and a fully masked row would then turn into NaN."""

    def forward(self, allowed):
        return _additive(allowed)


class RopeTables(nn.Module):
    """``gemma.rope_tables`` as a named scope: angles of positions up to ~1000 need float32."""

    def __init__(self, head_dim: int, theta: float, dtype: torch.dtype):
        super().__init__()
        self.head_dim, self.theta, self.dtype = head_dim, theta, dtype

    def forward(self, positions):
        return rope_tables(positions, self.head_dim, self.theta, self.dtype)


class _Layer(nn.Module):
    """The submodules of one ``GemmaLayer`` under the export wrapper (ONNX node names
    ``/<stack>.<i>/input_layernorm/...``, ``/<stack>.<i>/attention_core/...``)."""

    def __init__(self, layer, cfg):
        super().__init__()
        self.input_layernorm = layer.input_layernorm
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
            layer.self_attn.o_proj)
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.mlp = layer.mlp
        self.attention_core = AttentionCore(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

    def project(self, h, cos, sin):
        """h (B, S, W) -> q (B, Nh, S, Dh), k, v (B, Nkv, S, Dh); q and k after RoPE."""
        nh, nkv, dh = self.heads
        s = int(h.shape[1])
        q = self.q_proj(h).view(-1, s, nh, dh).transpose(1, 2)
        k = self.k_proj(h).view(-1, s, nkv, dh).transpose(1, 2)
        v = self.v_proj(h).view(-1, s, nkv, dh).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class _PrefixLayer(_Layer):
    def __init__(self, layer, cfg, last: bool):
        super().__init__(layer, cfg)
        self.last = last

    def forward(self, x, cos, sin, mask):
        """``GemmaLayer.forward`` / ``write_kv_only`` -> (x, k, v); x is None after the last."""
        h, _ = self.input_layernorm(x)
        q, k, v = self.project(h, cos, sin)
        if self.last:  # only the last layer's keys/values are ever read
            return None, k, v
        x = x + self.o_proj(self.attention_core(q, k, v, mask))
        h, _ = self.post_attention_layernorm(x)
        return x + self.mlp(h), k, v


class _SuffixLayer(_Layer):
    def forward(self, x, cos, sin, k, v, mask, mods=None):
        """``GemmaLayer.forward`` for the suffix over the cached prefix k, v (B, Nkv, P, Dh)."""
        h, gate = self.input_layernorm(x, None if mods is None else mods[0])
        q, ks, vs = self.project(h, cos, sin)
        x = _residual(x, self.o_proj(self.attention_core(q, k, v, mask, ks, vs)), gate)
        h, gate = self.post_attention_layernorm(x, None if mods is None else mods[1])
        return _residual(x, self.mlp(h), gate)


def _residual(x, y, gate):
    # pi0.5 expert: the adaRMS gate scales the residual branch (openpi `_gated_residual`).
    return x + y if gate is None else x + y * gate


class VisionStage(nn.Module):
    def __init__(self, model: Pi0Model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.embed_images(images)  # (B, N*T, W)


class PrefixStage(nn.Module):
    """``fill_prefix`` without buffers: LM pass over the prefix -> the cache tensors."""

    def __init__(self, model: Pi0Model):
        super().__init__()
        self.model = model
        cfg = model.config
        last = cfg.lm.depth - 1
        self.lm = nn.ModuleList(_PrefixLayer(layer, cfg.lm, i == last)
                                for i, layer in enumerate(model.lm.layers))
        # Suffix block flags (§5): pi0 [1 (state), 1, 0...], pi0.5 [1, 0...]; fixed by the config.
        s = cfg.suffix_len
        flags = torch.zeros(s, dtype=torch.long)
        flags[: 1 if cfg.pi05 else 2] = 1
        c = torch.cumsum(flags, 0)
        self.register_buffer("suffix_allowed", c[None, :] <= c[:, None], persistent=False)
        self.register_buffer("suffix_offsets", torch.arange(s, dtype=torch.int32),
                             persistent=False)
        self.attention_mask = AttentionMask()
        self.rope_tables = RopeTables(cfg.lm.head_dim, cfg.lm.rope_theta, model.dtype)
        self.suffix_rope_tables = RopeTables(cfg.expert.head_dim, cfg.expert.rope_theta,
                                             model.dtype)

    def forward(self, image_tokens, image_masks, tokens, token_mask):
        m = self.model
        embs, pad = m.embed_prefix(image_tokens, image_masks, tokens, token_mask)
        # Padding and masked cameras do not advance the position counter (§5). int32 counts are
        # exact here and friendlier to TensorRT than int64.
        positions = torch.cumsum(pad.int(), dim=1) - 1
        mask = self.attention_mask(pad[:, None, :, None] & pad[:, None, None, :])  # (B,1,P,P)
        cos, sin = self.rope_tables(positions)
        ks, vs = [], []
        x = embs
        for layer in self.lm:
            x, k, v = layer(x, cos, sin, mask)
            ks.append(k)
            vs.append(v)
        suffix_mask, suffix_cos, suffix_sin = self._suffix_tables(pad)
        return torch.stack(ks), torch.stack(vs), suffix_mask, suffix_cos, suffix_sin

    def _suffix_tables(self, pad):
        """``Pi0Model._prepare_suffix`` without buffers: the suffix mask and RoPE tables."""
        s, p = self.suffix_allowed.shape[0], int(pad.shape[1])
        prefix_allowed = pad[:, None, None, :].expand(-1, 1, s, p)
        suffix_allowed = self.suffix_allowed[None, None].expand(pad.shape[0], 1, s, s)
        mask = self.attention_mask(torch.cat([prefix_allowed, suffix_allowed], dim=-1))
        # Suffix positions continue after the valid prefix tokens of each sample.
        positions = pad.int().sum(dim=1, keepdim=True) + self.suffix_offsets
        cos, sin = self.suffix_rope_tables(positions)
        return mask, cos, sin  # (B, 1, S, P+S), (B, S, Dh) x 2


class _SuffixBase(nn.Module):
    def __init__(self, model: Pi0Model):
        super().__init__()
        self.model = model
        self.expert = nn.ModuleList(_SuffixLayer(layer, model.config.expert)
                                    for layer in model.expert.layers)
        self.final_norm = model.expert.norm

    def velocity(self, k, v, mask, cos, sin, state, x_t, conds: TimeConditioning, step: int):
        """``denoise_step`` over the stacked prefix K/V: (B, H, A) float32."""
        m = self.model
        x = m.embed_suffix(state, x_t, conds, step).to(m.dtype)
        mods = None if conds.modulation is None else conds.modulation[step]
        for i, layer in enumerate(self.expert):
            x = layer(x, cos, sin, k[i], v[i], mask,
                      None if mods is None else mods[2 * i:2 * i + 2])
        out, _ = self.final_norm(x, None if mods is None else mods[-1])
        return m.action_out_proj(out[:, -m.config.action_horizon:].float())


class DenoiseStage(_SuffixBase):
    """``denoise``: the Euler loop unrolled for ``num_steps`` (openpi schedule, §8)."""

    def __init__(self, model: Pi0Model, num_steps: int):
        super().__init__(model)
        self.conds = model.time_conditioning(num_steps)

    def forward(self, prefix_k, prefix_v, suffix_mask, suffix_cos, suffix_sin, noise,
                state=None):
        x = noise.float()
        for step in range(self.conds.num_steps):
            x = x + self.conds.dt * self.velocity(prefix_k, prefix_v, suffix_mask, suffix_cos,
                                                  suffix_sin, state, x, self.conds, step)
        return x


class DenoiseStepStage(_SuffixBase):
    """One velocity evaluation; the time conditioning of the step is an input (run-time loop)."""

    def forward(self, prefix_k, prefix_v, suffix_mask, suffix_cos, suffix_sin, x_t, cond,
                state=None):
        pi05 = self.model.config.pi05
        conds = TimeConditioning(num_steps=1, dt=0.0, times=(0.0,),
                                 time_emb=None if pi05 else cond[None], cond=None,
                                 modulation=cond[None] if pi05 else None)
        return self.velocity(prefix_k, prefix_v, suffix_mask, suffix_cos, suffix_sin, state,
                             x_t, conds, 0)


def step_conditioning(model: Pi0Model, conds: TimeConditioning, step: int) -> torch.Tensor:
    """The ``denoise_step`` conditioning input of one step: time_emb (We,) for pi0,
    modulation (2*depth+1, 3, We) for pi0.5 (both float32)."""
    return conds.modulation[step] if model.config.pi05 else conds.time_emb[step]


def stage_module(model: Pi0Model, stage: str, num_steps: int = 10) -> nn.Module:
    if stage == "vision":
        return VisionStage(model)
    if stage == "prefix":
        return PrefixStage(model)
    if stage == "denoise":
        return DenoiseStage(model, num_steps)
    if stage == "denoise_step":
        return DenoiseStepStage(model)
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.where(allowed, 0.0, MASK_VALUE).to(torch.float32)


# -- eager references of each stage ---------------------------------------------------------------
@torch.no_grad()
def eager_stage(model: Pi0Model, stage: str, feeds: Mapping[str, torch.Tensor],
                num_steps: int = 10, step: int = 0) -> dict[str, torch.Tensor]:
    """What the model's own (in-place, buffer-based) stage functions produce for ``feeds``;
    names as in ``stage_io``. ``denoise_step`` evaluates ``step`` of a ``num_steps`` schedule."""
    if stage == "vision":
        return {"image_tokens": model.embed_images(feeds["images"])}
    if stage == "prefix":
        tokens = feeds["tokens"]
        cache = model.new_cache(tokens.shape[0], feeds["image_masks"].shape[1], tokens.shape[1])
        model.fill_prefix(cache, feeds["image_tokens"], feeds["image_masks"], tokens,
                          feeds["token_mask"])
        return cache_outputs(cache)
    cache = cache_from_outputs(model, feeds)
    conds = model.time_conditioning(num_steps)
    if stage == "denoise":
        return {"actions": model.denoise(cache, feeds["state"], feeds["noise"], conds)}
    if stage == "denoise_step":
        return {"velocity": model.denoise_step(cache, feeds["state"], feeds["x_t"], conds, step)}
    raise ValueError(f"unknown stage {stage!r}")


def cache_outputs(cache) -> dict[str, torch.Tensor]:
    """A filled ``PrefixCache`` as the prefix stage's outputs."""
    p = cache.prefix_len
    return {"prefix_k": cache.k[:, :, :, :p].contiguous(),
            "prefix_v": cache.v[:, :, :, :p].contiguous(),
            "suffix_mask": cache.suffix_mask.clone(), "suffix_cos": cache.suffix_cos.clone(),
            "suffix_sin": cache.suffix_sin.clone()}


def cache_from_outputs(model: Pi0Model, feeds: Mapping[str, torch.Tensor]):
    """The prefix stage's outputs as a ``PrefixCache`` the eager ``denoise`` can read."""
    k = feeds["prefix_k"]  # (depth, B, Nkv, P, Dh)
    cfg = model.config
    b, p = k.shape[1], k.shape[3]
    cache = model.new_cache(b, cfg.num_cameras, p - cfg.num_cameras * cfg.vision.tokens_per_image)
    cache.k[:, :, :, :p] = k
    cache.v[:, :, :, :p] = feeds["prefix_v"]
    cache.suffix_mask.copy_(feeds["suffix_mask"])
    cache.suffix_cos.copy_(feeds["suffix_cos"])
    cache.suffix_sin.copy_(feeds["suffix_sin"])
    return cache


@torch.no_grad()
def example_feeds(model: Pi0Model, stage: str, inputs: ModelInputs,
                  num_steps: int = 10) -> dict[str, torch.Tensor]:
    """Realistic inputs of ``stage`` for a request: upstream stages run eagerly."""
    feeds: dict[str, torch.Tensor] = {"images": inputs.images.float()}
    if stage == "vision":
        return feeds
    feeds = {"image_tokens": model.embed_images(inputs.images.float()),
             "image_masks": inputs.image_masks.bool(), "tokens": inputs.tokens.long(),
             "token_mask": inputs.token_mask.bool()}
    if stage == "prefix":
        return feeds
    feeds = dict(eager_stage(model, "prefix", feeds))
    feeds["state"] = inputs.state.float()
    if stage == "denoise":
        feeds["noise"] = inputs.noise.float()
        return feeds
    if stage == "denoise_step":
        conds = model.time_conditioning(num_steps)
        feeds["x_t"] = inputs.noise.float()
        feeds["modulation" if model.config.pi05 else "time_emb"] = step_conditioning(
            model, conds, 0)
        return feeds
    raise ValueError(f"unknown stage {stage!r}")


# -- export ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageExport:
    """One exported stage: where it is and the configuration its static shapes come from."""

    stage: str
    path: Path
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    num_cameras: int
    prompt_len: int  # 0 for vision
    num_steps: int  # 0 unless stage == "denoise"
    dtype: str  # the model's activation dtype at export ("float32" / "bfloat16")
    opset: int
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return stage_id(self.stage, self.num_cameras, self.prompt_len, self.num_steps)


def stage_id(stage: str, num_cameras: int, prompt_len: int = 0, num_steps: int = 0) -> str:
    """File-system name of a stage configuration, e.g. ``prefix_n3_L200``."""
    name = f"{stage}_n{num_cameras}"
    if stage != "vision":
        name += f"_L{prompt_len}"
    if stage == "denoise":
        name += f"_s{num_steps}"
    return name


@torch.no_grad()
def export_stage(model: Pi0Model, stage: str, out_dir: str | Path, *,
                 num_cameras: int | None = None, prompt_len: int | None = None,
                 num_steps: int = 10, opset: int = DEFAULT_OPSET,
                 batch: int = EXPORT_BATCH) -> StageExport:
    """Export one stage to ``out_dir/<stage_id>/model.onnx`` (large weights go to external data
    files in that folder; TensorRT's parser and onnxruntime read them from there).

    The batch axis is dynamic; everything else is fixed by (cameras, prompt length, steps)."""
    if opset < 17:
        raise ValueError(f"opset {opset} < 17 (LayerNormalization needs 17)")
    cfg = model.config
    n = num_cameras or cfg.num_cameras
    L = prompt_len or cfg.max_token_len
    steps = num_steps if stage == "denoise" else 0
    inputs_io, outputs_io = stage_io(stage, cfg.pi05)
    model = model.eval()
    if n != cfg.num_cameras:
        raise ValueError(f"the model is configured for {cfg.num_cameras} cameras, asked to export "
                         f"{n}; build it with cameras=... for that camera set")
    request = dummy_inputs(cfg, batch, n, L, prompt_len=L, seed=0)
    feeds = example_feeds(model, stage, request, num_steps)
    args = tuple(feeds[name] for name in inputs_io)
    module = stage_module(model, stage, num_steps).eval()
    dynamic_axes = {name: {batch_axis(name): "batch"} for name in inputs_io + outputs_io
                    if batch_axis(name) is not None}
    folder = Path(out_dir) / stage_id(stage, n, L if stage != "vision" else 0, steps)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # Tracer warnings about Python ints (shapes fixed by the config) and the legacy exporter.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                          input_names=list(inputs_io), output_names=list(outputs_io),
                          dynamic_axes=dynamic_axes, do_constant_folding=True)
    seconds = time.perf_counter() - t0
    _set_io_shapes(path, stage_shapes(cfg, stage, L, n))
    log.info("exported %s in %.1f s -> %s", stage, seconds, path)
    return StageExport(stage, path, inputs_io, outputs_io, n, 0 if stage == "vision" else L,
                       steps, str(model.dtype).removeprefix("torch."), opset, seconds)


def _set_io_shapes(path: Path, shapes: Mapping[str, tuple[int | str, ...]]) -> None:
    """Write the known static output shapes into the graph (the tracer leaves generated symbolic
    names such as ``Reshapeimage_tokens_dim_1``); skipped when the onnx package is missing."""
    try:
        import onnx
    except ImportError:
        return
    proto = onnx.load(str(path), load_external_data=False)
    for value in list(proto.graph.input) + list(proto.graph.output):
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(shapes[value.name]):
            raise RuntimeError(f"exported {value.name} has rank {len(dims)}, expected "
                               f"{shapes[value.name]}")
        for dim, size in zip(dims, shapes[value.name]):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
    onnx.save(proto, str(path))


def export_all(model: Pi0Model, out_dir: str | Path, *, prompt_buckets: Sequence[int],
               num_steps: int = 10, opset: int = DEFAULT_OPSET, step_stage: bool = False,
               progress=None) -> list[StageExport]:
    """vision once; prefix and denoise (and optionally denoise_step) per prompt bucket."""
    jobs = [("vision", 0)]
    for L in prompt_buckets:
        jobs += [("prefix", L), ("denoise", L)] + ([("denoise_step", L)] if step_stage else [])
    done = []
    for i, (stage, L) in enumerate(jobs):
        if progress:
            progress(f"[{i + 1}/{len(jobs)}] exporting {stage}" + (f" (L={L})" if L else ""))
        done.append(export_stage(model, stage, out_dir, prompt_len=L or None,
                                 num_steps=num_steps, opset=opset))
        if progress:
            progress(f"    {done[-1].path} ({file_size(done[-1].path) / 2**20:.1f} MiB, "
                     f"{done[-1].seconds:.1f} s)")
    return done


def file_size(onnx_path: str | Path) -> int:
    """Bytes of an exported stage: the .onnx file plus its external data files."""
    return sum(f.stat().st_size for f in Path(onnx_path).parent.iterdir() if f.is_file())


# -- FP8: explicit quantization (Q/DQ) for TensorRT ----------------------------------------------
FP8_OPSET = 19  # QuantizeLinear / DequantizeLinear with float8 types
FP8_MAX = 448.0  # largest float8_e4m3fn
FP8_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_MIN_SCALE = 1e-12


def fp8_linear_names(model: Pi0Model, targets: Sequence[str] = ("lm", "expert")) -> list[str]:
    """Module names of the Gemma linears that get FP8 Q/DQ (SigLIP and the top-level
    projections stay in the graph's dtype, as ``engine/fp8.py`` does by default)."""
    return [f"{stack}.layers.{i}.{leaf}" for stack in targets
            for i in range(len(getattr(model, stack).layers)) for leaf in FP8_LINEARS]


@torch.no_grad()
def calibrate_fp8(model: Pi0Model, requests: Sequence[ModelInputs], num_steps: int = 10,
                  seed: int = 0) -> dict[str, float]:
    """Static activation ranges for FP8: max |input| of every Gemma linear over full
    ``sample_actions`` runs on ``requests`` (every denoising step included). Linears that never
    run (the last LM layer's q / o / MLP) are left out. Use real observations: ranges from random
    inputs are a placeholder."""
    modules = dict(model.named_modules())
    amax: dict[str, float] = {}

    def hook(name):
        def record(_module, args):
            amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().max()))
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in fp8_linear_names(model)]
    try:
        for i, r in enumerate(requests):
            gen = torch.Generator(device=model.device).manual_seed(seed + i)
            model.sample_actions(r.images.to(model.device), r.image_masks.to(model.device),
                                 r.tokens.to(model.device), r.token_mask.to(model.device),
                                 r.state.to(model.device),
                                 noise=None if r.noise is None else r.noise.to(model.device),
                                 num_steps=num_steps, generator=gen)
    finally:
        for h in handles:
            h.remove()
    return amax


def quantize_fp8(src: str | Path, dst: str | Path, model: Pi0Model,
                 act_amax: Mapping[str, float]) -> int:
    """Rewrite an exported stage with FP8 (e4m3) Q/DQ around every Gemma linear's MatMul:
    weights per output channel (scale = amax(|W[:, j]|) / 448, axis 1 of the [in, out]
    initializer), activations per tensor with the static calibrated scale amax / 448. Scales are
    in the graph's dtype (float32 or bfloat16). The graph must be exported at opset >= 19.
    Weights are matched to modules by content, so node naming does not matter. Returns the
    number of quantized MatMuls."""
    import hashlib

    import onnx
    from onnx import helper

    proto = onnx.load(str(src))
    opset = {o.domain: o.version for o in proto.opset_import}.get("", 0)
    if opset < FP8_OPSET:
        raise ValueError(f"{src} has opset {opset}; FP8 Q/DQ needs >= {FP8_OPSET}")
    modules = dict(model.named_modules())
    by_content = {}
    for name, amax in act_amax.items():
        if amax > 0:
            w = modules[name].weight.detach().t().contiguous()  # the exported [in, out] layout
            by_content[(tuple(w.shape), hashlib.sha1(_raw(w)).hexdigest())] = name
    weight_module = {}
    for init in proto.graph.initializer:
        if init.raw_data and len(init.dims) == 2:
            key = (tuple(init.dims), hashlib.sha1(init.raw_data).hexdigest())
            if key in by_content:
                weight_module[init.name] = by_content[key]
    # The exporter feeds a weight shared by several calls (the unrolled steps) through Identity.
    alias = {}
    for node in proto.graph.node:
        if node.op_type == "Identity":
            src_name = alias.get(node.input[0], node.input[0])
            if src_name in weight_module:
                alias[node.output[0]] = src_name
    new_inits, nodes, dq_weight, count = [], [], {}, 0
    for node in proto.graph.node:
        w_name = alias.get(node.input[1], node.input[1]) if node.op_type == "MatMul" else None
        if w_name in weight_module:
            module = modules[weight_module[w_name]]
            dtype = module.weight.dtype
            if w_name not in dq_weight:
                w = module.weight.detach().float()  # (out, in)
                scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(_MIN_SCALE).to(dtype)
                zero = torch.zeros(scale.shape, dtype=torch.float8_e4m3fn)
                new_inits += [_proto(f"{w_name}_fp8_scale", scale), _proto(f"{w_name}_fp8_zero",
                                                                           zero)]
                nodes += [helper.make_node("QuantizeLinear",
                                           [w_name, f"{w_name}_fp8_scale", f"{w_name}_fp8_zero"],
                                           [f"{w_name}_fp8"], name=f"{w_name}_fp8_q", axis=1),
                          helper.make_node("DequantizeLinear",
                                           [f"{w_name}_fp8", f"{w_name}_fp8_scale",
                                            f"{w_name}_fp8_zero"],
                                           [f"{w_name}_fp8_dq"], name=f"{w_name}_fp8_dq", axis=1)]
                dq_weight[w_name] = f"{w_name}_fp8_dq"
            a = node.name or f"matmul{count}"
            scale = torch.tensor(max(act_amax[weight_module[w_name]] / FP8_MAX, _MIN_SCALE),
                                 dtype=dtype)
            new_inits += [_proto(f"{a}_act_scale", scale),
                          _proto(f"{a}_act_zero", torch.zeros((), dtype=torch.float8_e4m3fn))]
            nodes += [helper.make_node("QuantizeLinear", [node.input[0], f"{a}_act_scale",
                                                          f"{a}_act_zero"], [f"{a}_act_fp8"],
                                       name=f"{a}_act_q"),
                      helper.make_node("DequantizeLinear", [f"{a}_act_fp8", f"{a}_act_scale",
                                                            f"{a}_act_zero"], [f"{a}_act_dq"],
                                       name=f"{a}_act_dq")]
            node.input[0], node.input[1] = f"{a}_act_dq", dq_weight[w_name]
            count += 1
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(new_inits)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    big = proto.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit
    onnx.save(proto, str(dst), save_as_external_data=big, all_tensors_to_one_file=True,
              location=dst.name + ".data")
    return count


@contextlib.contextmanager
def fp8_emulation(model: Pi0Model, act_amax: Mapping[str, float]):
    """Within the block, the calibrated Gemma linears of ``model`` compute what the Q/DQ graph of
    ``quantize_fp8`` computes (weights per output channel, activations with the static scale,
    e4m3 round-to-nearest with saturation, float32 math): the reference the quantized ONNX is
    checked against, and a way to see FP8's accuracy cost on CPU before building anything."""
    modules = dict(model.named_modules())
    patched = []
    for name, amax in act_amax.items():
        if amax <= 0:
            continue
        module = modules[name]
        w = module.weight.detach().float()
        w_scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(_MIN_SCALE)
        w_scale = w_scale.to(module.weight.dtype).float()
        wq = _fake_fp8(w, w_scale).to(module.weight.dtype)
        a_scale = float(torch.tensor(max(amax / FP8_MAX, _MIN_SCALE),
                                     dtype=module.weight.dtype).float())

        def forward(x, wq=wq, a_scale=a_scale):
            return torch.nn.functional.linear(_fake_fp8(x.float(), a_scale).to(x.dtype), wq)

        patched.append(module)
        module.forward = forward
    try:
        yield model
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


def _fake_fp8(x: torch.Tensor, scale) -> torch.Tensor:
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _proto(name: str, t: torch.Tensor):
    from onnx import TensorProto, helper

    kind = {torch.float32: TensorProto.FLOAT, torch.bfloat16: TensorProto.BFLOAT16,
            torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN}[t.dtype]
    return helper.make_tensor(name, kind, list(t.shape), _raw(t), raw=True)


# -- inspection (needs the onnx package) ----------------------------------------------------------
@dataclass(frozen=True)
class TensorDesc:
    name: str
    dtype: str  # onnx element type name: FLOAT, BFLOAT16, INT64, BOOL...
    shape: tuple[int | str, ...]  # ints, or the symbolic name of a dynamic axis


def onnx_io(path_or_model: Any) -> tuple[dict[str, TensorDesc], dict[str, TensorDesc]]:
    """(inputs, outputs) of an ONNX graph: dtype names and shapes with symbolic axes."""
    import onnx

    proto = path_or_model
    if not isinstance(proto, onnx.ModelProto):
        proto = onnx.load(str(path_or_model), load_external_data=False)

    def desc(value) -> TensorDesc:
        t = value.type.tensor_type
        dims = tuple(d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim)
        return TensorDesc(value.name, onnx.TensorProto.DataType.Name(t.elem_type), dims)

    initializers = {i.name for i in proto.graph.initializer}
    inputs = {v.name: desc(v) for v in proto.graph.input if v.name not in initializers}
    outputs = {v.name: desc(v) for v in proto.graph.output}
    return inputs, outputs


# -- onnxruntime checks ---------------------------------------------------------------------------
def ort_session(path: str | Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_session(session, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = [i.name for i in session.get_inputs()]
    out = session.run(None, {k: feeds[k].detach().cpu().numpy() for k in names})
    return {o.name: torch.from_numpy(v) for o, v in zip(session.get_outputs(), out)}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.double(), b.double()
    same = a == b  # equal entries (mask constants included) differ by 0, not inf - inf
    return float(torch.where(same, 0.0, (a - b).abs()).max()) if a.numel() else 0.0


@torch.no_grad()
def check_stages(model: Pi0Model, exports: Sequence[StageExport], inputs: ModelInputs,
                 threads: int = 0) -> dict[str, float]:
    """Max |onnxruntime - eager| of every output of every exported stage (float32 exports),
    each stage fed the eager upstream values; keys ``<stage_id>/<output>``."""
    diffs = {}
    for ex in exports:
        num_steps = ex.num_steps or 10
        request = _fit_prompt(inputs, ex.prompt_len) if ex.prompt_len else inputs
        feeds = example_feeds(model, ex.stage, request, num_steps)
        expected = eager_stage(model, ex.stage, feeds, num_steps)
        got = run_session(ort_session(ex.path, threads), feeds)
        for name in ex.outputs:
            diffs[f"{ex.name}/{name}"] = max_abs_diff(got[name], expected[name].float())
    return diffs


@torch.no_grad()
def onnx_sample_actions(sessions: Mapping[str, Any], inputs: ModelInputs,
                        model: Pi0Model | None = None, num_steps: int = 10) -> torch.Tensor:
    """Actions through the ONNX stages only (vision -> prefix -> denoise), or through
    ``denoise_step`` in a Python loop when ``sessions`` has no ``denoise`` (then ``model``
    supplies the per-step conditioning)."""
    tokens = run_session(sessions["vision"], {"images": inputs.images.float()})["image_tokens"]
    cache = run_session(sessions["prefix"], {
        "image_tokens": tokens, "image_masks": inputs.image_masks.bool(),
        "tokens": inputs.tokens.long(), "token_mask": inputs.token_mask.bool()})
    feeds = dict(cache, state=inputs.state.float())
    if "denoise" in sessions:
        return run_session(sessions["denoise"], dict(feeds, noise=inputs.noise.float()))["actions"]
    conds = model.time_conditioning(num_steps)
    x = inputs.noise.float()
    cond_name = "modulation" if model.config.pi05 else "time_emb"
    for step in range(num_steps):
        v = run_session(sessions["denoise_step"], dict(
            feeds, x_t=x, **{cond_name: step_conditioning(model, conds, step)}))["velocity"]
        x = x + conds.dt * v
    return x


def _fit_prompt(inputs: ModelInputs, prompt_len: int) -> ModelInputs:
    """Cut (or zero-pad) a request's prompt to ``prompt_len`` columns (a bucket)."""
    L = inputs.tokens.shape[1]
    if L == prompt_len:
        return inputs
    if L > prompt_len:
        return dataclasses.replace(inputs, tokens=inputs.tokens[:, :prompt_len],
                                   token_mask=inputs.token_mask[:, :prompt_len])
    pad = (0, prompt_len - L)
    return dataclasses.replace(
        inputs, tokens=torch.nn.functional.pad(inputs.tokens, pad),
        token_mask=torch.nn.functional.pad(inputs.token_mask, pad))


def num_parameters_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


__all__ = ["AttentionCore", "DEFAULT_OPSET", "EXPORT_FORMAT", "FP8_OPSET", "STAGES", "StageExport",
           "calibrate_fp8", "fp8_emulation", "fp8_linear_names", "quantize_fp8",
           "TensorDesc", "batch_axis", "check_stages", "eager_stage", "example_feeds",
           "export_all", "export_stage", "file_size", "max_abs_diff", "onnx_io",
           "onnx_sample_actions", "ort_session", "run_session", "stage_id", "stage_io",
           "stage_module", "step_conditioning"]
