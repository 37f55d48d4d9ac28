"""Gemma stacks: the PaliGemma LM (prefix) and the action expert (suffix).

Both stacks share one attention per layer in openpi (SEMANTICS §6). Here that joint attention is
split into the two passes openpi's inference path runs (§9): the LM writes the prefix keys/values
into a static buffer once per observation, and every denoising step runs only the expert, whose
queries attend to the buffer in place (the suffix K/V are written into the buffer's tail, so the
prefix is never copied).

Numerics follow openpi's patched HF Gemma: RMSNorm statistics and scaling in float32 with the
weight stored as an offset from 1; grouped-query attention with logits scaled by Dh^-0.5, an
additive float32 mask and a float32 softmax; half-split RoPE with float32 tables; gelu_tanh MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import GemmaConfig

# openpi fills disallowed attention entries with this (SEMANTICS §5); exp() of it underflows to 0,
# so masked keys contribute exactly nothing and fully masked rows become uniform, never NaN.
MASK_VALUE = -2.3819763e38


class RMSNorm(nn.Module):
    """Gemma RMSNorm, or the pi0.5 expert's adaRMSNorm when ``cond_dim`` is given.

    Plain:   y = x_hat * (1 + w)                         (w stored as the offset from 1)
    adaRMS:  y = x_hat * (1 + scale) + shift, and ``gate`` is returned for the residual branch,
             with (scale, shift, gate) = split(dense(cond)) precomputed per denoising step by
             ``modulation`` (it depends only on t, so never per layer call).
    """

    def __init__(self, width: int, eps: float, cond_dim: int | None = None):
        super().__init__()
        self.eps = eps
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(width))
            self.dense = None
        else:
            self.dense = nn.Linear(cond_dim, 3 * width)

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """cond (n, C) float32 -> (n, 3, width) float32: scale, shift, gate."""
        return self.dense(cond).unflatten(-1, (3, -1))

    def forward(self, x: torch.Tensor, mod: torch.Tensor | None = None):
        # mean of squares and normalization in float32 (openpi GemmaRMSNorm._norm)
        var = torch.mean(torch.square(x.float()), dim=-1, keepdim=True)
        normed = x * torch.rsqrt(var + self.eps)
        if self.dense is None:
            return (normed * (1.0 + self.weight.float())).to(x.dtype), None
        scale, shift, gate = mod.unbind(-2)  # each (..., width), broadcast over the sequence
        return (normed * (1 + scale.float()) + shift.float()).to(x.dtype), gate.to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions (B, S) int -> cos, sin (B, S, Dh) in ``dtype`` (tables computed in float32)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
    inv_freq = 1.0 / (theta ** (exponent.float() / head_dim))
    freqs = positions[..., None].float() * inv_freq  # (B, S, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split ("rotate_half") RoPE. x (B, heads, S, Dh), cos/sin (B, S, Dh)."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention without materializing repeated K/V.

    q (B, Nh, S, Dh); k, v (B, Nkv, K, Dh) (may be views of the cache); mask (B, 1, S, K) additive
    float32 -> (B, S, Nh*Dh). Query head h uses KV head h // (Nh/Nkv), as HF's repeat_kv.
    """
    b, nh, s, dh = q.shape
    nkv, kl = k.shape[1], k.shape[2]
    g = nh // nkv
    logits = torch.matmul(q.reshape(b, nkv, g * s, dh), k.transpose(2, 3)) * dh**-0.5
    logits = logits.view(b, nkv, g, s, kl) + mask[:, :, None]  # promotes to float32
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.matmul(probs.view(b, nkv, g * s, kl), v)  # (B, Nkv, G*S, Dh)
    return out.view(b, nh, s, dh).transpose(1, 2).reshape(b, s, nh * dh)


def attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """``attend`` through ``F.scaled_dot_product_attention``: one fused kernel where the device
    has one for an additive mask (CUDA memory-efficient attention), the math path elsewhere.

    Same shapes and semantics. GQA the way ``attend`` does it: the G query heads of a KV head
    become G*S query rows of one head, so K/V are never repeated; ``enable_gqa`` is not used
    because with a mask it sends CUDA to the unfused math kernel. The additive mask is taken in
    q's dtype with its rows repeated per group, (B, 1, G*S, K) (``expand_mask``, done once per
    stack call by ``GemmaStack``); ``MASK_VALUE`` is finite in bf16 too, so fully masked rows stay
    uniform, never NaN. Within 1e-5 of ``attend`` in float32 (test_model_sdpa.py).
    """
    b, nh, s, dh = q.shape
    nkv = k.shape[1]
    g = nh // nkv
    if mask.shape[-2] != g * s:  # not yet expanded by GemmaStack
        mask = expand_mask(mask, g, q.dtype)
    out = F.scaled_dot_product_attention(q.reshape(b, nkv, g * s, dh), k, v, attn_mask=mask)
    return out.view(b, nh, s, dh).transpose(1, 2).reshape(b, s, nh * dh)


def expand_mask(mask: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, S, K) additive mask -> (B, 1, G*S, K) in ``dtype``, row g*S + i being row i."""
    if groups > 1:
        b, _, rows, kl = mask.shape
        mask = mask[:, :, None].expand(b, 1, groups, rows, kl).reshape(b, 1, groups * rows, kl)
    return mask.to(dtype)


ATTENTION = {"eager": attend, "sdpa": attend_sdpa}


def set_attention(model: nn.Module, impl: str) -> nn.Module:
    """Choose the attention kernel of every Gemma attention in ``model``: ``eager`` (matmul +
    float32 mask + float32 softmax, openpi's HF "eager" path; the default) or ``sdpa``."""
    if impl not in ATTENTION:
        raise ValueError(f"attention must be one of {sorted(ATTENTION)}, got {impl!r}")
    for m in model.modules():
        if isinstance(m, GemmaAttention):
            m.attention = impl
    return model


class GemmaAttention(nn.Module):
    attention = "eager"  # or "sdpa" (set_attention)

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_heads, cfg.num_kv_heads,
                                                            cfg.head_dim)
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)

    def write_kv(self, h, cos, sin, k_buf, v_buf, start: int) -> None:
        """Project h (B, S, W) to keys (after RoPE) / values and write them at [start:start+S]."""
        b, s, _ = h.shape
        k = self.k_proj(h).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        k_buf[:, :, start:start + s].copy_(apply_rope(k, cos, sin))
        v_buf[:, :, start:start + s].copy_(v)

    def forward(self, h, cos, sin, k_buf, v_buf, start: int, mask) -> torch.Tensor:
        """h (B, S, W); k_buf/v_buf (B, Nkv, K, Dh) with this stream's slots at [start:start+S]
        and everything it may attend before them; mask (B, 1, S, start+S) -> (B, S, W)."""
        b, s, _ = h.shape
        self.write_kv(h, cos, sin, k_buf, v_buf, start)
        q = self.q_proj(h).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        end = start + s
        out = ATTENTION[self.attention](apply_rope(q, cos, sin), k_buf[:, :, :end],
                                        v_buf[:, :, :end], mask)
        return self.o_proj(out)


class GemmaMLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


def _residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    # pi0.5 expert: the adaRMS gate scales the residual branch (openpi `_gated_residual`).
    return x + y if gate is None else x + y * gate


class GemmaLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, cond_dim: int | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.width, cfg.rms_norm_eps, cond_dim)
        self.self_attn = GemmaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.rms_norm_eps, cond_dim)
        self.mlp = GemmaMLP(cfg)

    def forward(self, x, cos, sin, k_buf, v_buf, start, mask, mods=None) -> torch.Tensor:
        """mods: None, or (2, 3, W) adaRMS modulation for (input, post-attention) norms."""
        h, gate = self.input_layernorm(x, None if mods is None else mods[0])
        x = _residual(x, self.self_attn(h, cos, sin, k_buf, v_buf, start, mask), gate)
        h, gate = self.post_attention_layernorm(x, None if mods is None else mods[1])
        return _residual(x, self.mlp(h), gate)

    def write_kv_only(self, x, cos, sin, k_buf, v_buf, start) -> None:
        """The last LM layer: only its keys/values are ever read (its output is unused)."""
        h, _ = self.input_layernorm(x)
        self.self_attn.write_kv(h, cos, sin, k_buf, v_buf, start)


class GemmaStack(nn.Module):
    """Decoder layers + final norm. ``cond_dim`` turns every norm into an adaRMSNorm (pi0.5
    expert). Inputs are already embedded: openpi's patch removes Gemma's input scaling."""

    def __init__(self, cfg: GemmaConfig, cond_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(GemmaLayer(cfg, cond_dim) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.rms_norm_eps, cond_dim)

    def modulations(self, cond: torch.Tensor) -> torch.Tensor:
        """cond (n, C) -> (n, 2*depth+1, 3, W): per layer (input, post-attention), then final."""
        mods = [norm.modulation(cond) for layer in self.layers
                for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
        mods.append(self.norm.modulation(cond))
        return torch.stack(mods, dim=1)

    def _attention_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # sdpa takes the mask in the activation dtype with its rows repeated per query group:
        # build that once per stack call, not once per layer.
        if self.layers and self.layers[0].self_attn.attention == "sdpa":
            return expand_mask(mask, self.cfg.num_heads // self.cfg.num_kv_heads, dtype)
        return mask

    def fill_kv(self, x, cos, sin, k_cache, v_cache, mask) -> None:
        """Prefix pass: x (B, P, W) -> keys/values of every layer into k/v_cache[l][:, :, :P]."""
        last = len(self.layers) - 1
        mask = self._attention_mask(mask, x.dtype)
        for i, layer in enumerate(self.layers):
            if i == last:
                layer.write_kv_only(x, cos, sin, k_cache[i], v_cache[i], 0)
            else:
                x = layer(x, cos, sin, k_cache[i], v_cache[i], 0, mask)

    def forward_suffix(self, x, cos, sin, k_cache, v_cache, start, mask, mods=None):
        """Suffix pass over the cached prefix: x (B, S, W) -> final-normed (B, S, W)."""
        mask = self._attention_mask(mask, x.dtype)
        for i, layer in enumerate(self.layers):
            layer_mods = None if mods is None else mods[2 * i:2 * i + 2]
            x = layer(x, cos, sin, k_cache[i], v_cache[i], start, mask, layer_mods)
        out, _ = self.norm(x, None if mods is None else mods[-1])
        return out
