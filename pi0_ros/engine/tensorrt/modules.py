"""The export modules: each stage as a small ``nn.Module`` around the model's own submodules.

Why wrappers instead of exporting ``fill_prefix`` / ``denoise`` as they are: the eager model writes
K/V into slices of static buffers (``copy_``); traced, those become scatter / slice-update ops on
buffers that are not graph outputs, and an engine would have to copy the cache to feed them. The
wrappers call the same submodules (norms, projections, RoPE, MLP, embeddings) functionally and
return fresh tensors. Two differences in the code, none in the math: ``AttentionCore`` is
``gemma.attend`` with the head counts and the 1/sqrt(Dh) scale as Python constants, and the
suffix attention takes its logits against the cached prefix and against the suffix as two
matmuls and its output as two matmuls summed, instead of one matmul over the concatenated buffer,
so the prefix K/V are never copied per step inside the engine (summation order only; checked
against eager at 1e-4 in test/test_onnx_export.py). openpi's float32 islands of a bfloat16 model
are kept as explicit casts.

Named scopes matter: ONNX node names follow the wrapper modules, e.g.
``/lm.0/input_layernorm/ReduceMean``, ``/expert.2/attention_core/Softmax``,
``/vision/layers.0/layer_norm1/...``, ``/norm_1/...`` (the expert's final norm),
``/attention_mask/...`` and ``/rope_tables/...`` (mask value and RoPE angles need float32).
``settings.fp32_island`` pins those to float32 in weakly typed FP16 / BF16 builds.
"""

from __future__ import annotations

import torch
from torch import nn

from ...model import Pi0Model, TimeConditioning
from ...model.gemma import MASK_VALUE, apply_rope, rope_tables
from .stages import STAGES


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


def stage_module(model: Pi0Model, stage: str, num_steps: int = 10) -> nn.Module:
    """The export wrapper of ``stage`` (``num_steps``: the unrolled loop of ``denoise``)."""
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
