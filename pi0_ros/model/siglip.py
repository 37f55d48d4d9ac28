"""SigLIP vision tower (So400m/14 in the real model) and the PaliGemma projector.

Pre-LN ViT: conv patchify -> + learned position embedding -> blocks of
``x += attn(LN1(x)); x += fc2(gelu_tanh(fc1(LN2(x))))`` -> final LayerNorm -> ``Linear(Wv -> W)``.
No scaling of the projected image tokens (openpi deletes HF PaliGemma's division by sqrt(W)).
Module names follow the checkpoint's leaf names; ``weights.py`` maps the prefixes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.width, cfg.patch_size,
                                         stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.tokens_per_image, cfg.width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images (n, 3, S, S) float32 -> (n, T, Wv) float32. openpi keeps the patch embedding and
        # position table in float32 even in bf16 mode (SEMANTICS §10); patches are row-major.
        x = self.patch_embedding(images.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        split = (n, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(split).transpose(1, 2)  # (n, heads, T, hd)
        k = self.k_proj(x).view(split).transpose(1, 2)
        v = self.v_proj(x).view(split).transpose(1, 2)
        logits = torch.matmul(q, k.transpose(2, 3)) * self.head_dim**-0.5
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(n, t, -1)
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipVision(nn.Module):
    """Images (n, 3, S, S) in [-1, 1] -> image tokens (n, T, Wv) after the final LayerNorm."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.layers = nn.ModuleList(SiglipLayer(cfg) for _ in range(cfg.depth))
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Patch embeddings are float32; the encoder runs in its own parameter dtype (bf16 or f32).
        x = self.embeddings(images).to(self.post_layernorm.weight.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)
