"""pi0 / pi0.5: SigLIP + PaliGemma prefix, Gemma action expert, Euler flow-matching sampler.

Inference is three stages with static shapes for a fixed (batch, cameras, prompt length):

    tokens = model.embed_images(images)                   # vision, all cameras in one call
    model.fill_prefix(cache, tokens, image_masks, prompt, prompt_mask)   # KV cache in place
    actions = model.denoise(cache, state, noise, conds)   # `conds` from time_conditioning(steps)

The loop over denoising steps has a Python-int trip count and no host synchronization, so the
whole thing can be captured in a CUDA graph. Semantics: openpi `pi0_pytorch.py` at commit 15a9616
(SEMANTICS.md; section numbers below refer to it). Flow-matching convention: t = 1 is noise,
t = 0 is data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import Pi0Config
from .gemma import MASK_VALUE, GemmaStack, rope_tables
from .siglip import SiglipVision


@dataclass
class PrefixCache:
    """Static per-observation state read by every denoising step (never copied per step).

    ``k``/``v`` (depth, B, Nkv, P+S, Dh): slots [:P] hold the LM keys (after RoPE) / values of
    the prefix; slots [P:] are scratch the expert overwrites with its suffix keys/values at every
    step, so the suffix attends ``buffer[:P+S]`` without a concatenation.
    """

    k: torch.Tensor
    v: torch.Tensor
    prefix_len: int
    pad_mask: torch.Tensor  # (B, P) bool: valid prefix tokens
    positions: torch.Tensor  # (B, P) int64: RoPE positions of the prefix
    prefix_mask: torch.Tensor  # (B, 1, P, P) float32 additive
    suffix_mask: torch.Tensor  # (B, 1, S, P+S) float32 additive
    suffix_cos: torch.Tensor  # (B, S, Dh) activation dtype
    suffix_sin: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.pad_mask.shape[0]


@dataclass
class TimeConditioning:
    """Everything of a denoising schedule that depends only on t (prepared once per step count).

    ``times``: the t of each velocity evaluation on the ``grid`` of ``time_grid`` (openpi:
    accumulated in float32, 1.0, 0.9, 0.79999995, ...; LeRobot: 1.0, 0.9, 0.8, ...).
    ``time_emb`` (steps, We) float32 sinusoidal embeddings (pi0); ``cond`` (steps, We) float32
    adaRMS condition = swish(time_mlp_out(swish(time_mlp_in(emb)))) and ``modulation``
    (steps, 2*depth+1, 3, We) float32 adaRMS scale/shift/gate (pi0.5).
    """

    num_steps: int
    dt: float
    times: tuple[float, ...]
    time_emb: torch.Tensor
    cond: torch.Tensor | None
    modulation: torch.Tensor | None
    grid: str = "openpi"


# Denoising time grids (``time_grid``): which framework's t values the sampler evaluates at.
TIME_GRIDS: tuple[str, ...] = ("openpi", "lerobot")


def time_grid(num_steps: int, grid: str = "openpi") -> tuple[float, tuple[float, ...]]:
    """The Euler schedule -> (dt, times).  Both grids step x by dt = float32(-1/N) (a Python
    float applied to a float32 tensor is used as float32) over the Python-int trip count N.

    ``"openpi"``: t starts at 1.0 and accumulates ``t += dt`` in float32 (openpi's
    ``while t >= -dt/2`` loop gives the same N): 1.0, 0.9, 0.79999995, ...
    ``"lerobot"``: LeRobot's ``euler_integrate`` (0.5+; 0.4.x inline): t_k = 1.0 + k * (-1/N)
    in Python float64, then a float32 tensor: 1.0, 0.9, 0.8, ... (differs from openpi's by up to
    a few float32 ulps, which moves the actions of the tiny fixture by ~8e-5).
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps <= 0:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if grid not in TIME_GRIDS:
        raise ValueError(f"time grid: expected one of {list(TIME_GRIDS)}, found {grid!r}")
    dt = np.float32(-1.0 / num_steps)
    if grid == "lerobot":
        step = -1.0 / num_steps  # float64, as LeRobot's Python `dt`
        return float(dt), tuple(float(np.float32(1.0 + k * step)) for k in range(num_steps))
    t, times = np.float32(1.0), []
    for _ in range(num_steps):
        times.append(float(t))
        t = np.float32(t + dt)
    return float(dt), tuple(times)


def sinusoidal_embedding(t: torch.Tensor, dim: int, min_period: float, max_period: float):
    """t (n,) -> (n, dim) float32: [sin(a), cos(a)], a_j = t * 2pi / period_j, in float64 (§7)."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    scaling = 1.0 / period * 2 * math.pi
    angles = scaling[None, :] * t[:, None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).to(torch.float32)


class Pi0Model(nn.Module):
    def __init__(self, config: Pi0Config):
        super().__init__()
        self.config = config
        cfg, we = config, config.expert.width
        # The time grid ``time_conditioning`` uses by default (``TIME_GRIDS``; the policy sets it
        # from its semantics before the engine prepares).
        self.time_grid = "openpi"
        self.vision = SiglipVision(cfg.vision)
        self.projector = nn.Linear(cfg.vision.width, cfg.lm.width)
        # Tied PaliGemma embedding (stored as `paligemma.lm_head.weight`).
        self.embed_tokens = nn.Embedding(cfg.lm.vocab_size, cfg.lm.width)
        self.lm = GemmaStack(cfg.lm)
        self.expert = GemmaStack(cfg.expert, cond_dim=we if cfg.pi05 else None)
        self.action_in_proj = nn.Linear(cfg.action_dim, we)
        self.action_out_proj = nn.Linear(we, cfg.action_dim)
        if cfg.pi05:
            self.time_mlp_in = nn.Linear(we, we)
            self.time_mlp_out = nn.Linear(we, we)
        else:
            self.state_proj = nn.Linear(cfg.action_dim, we)
            self.action_time_mlp_in = nn.Linear(2 * we, we)
            self.action_time_mlp_out = nn.Linear(we, we)

    # -- precision --------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype of the transformer stacks (that of the token embedding table, which
        no engine-side weight swap such as FP8 linear layers changes)."""
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.action_in_proj.weight.device

    def set_precision(self, dtype: str | torch.dtype) -> Pi0Model:
        """float32 everywhere, or openpi's bfloat16 inference mode with its float32 islands (§10):
        SigLIP patch/position embeddings, every Gemma RMSNorm / adaRMS `dense`, and the top-level
        projections stay float32; everything else in the stacks becomes bfloat16."""
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"model dtype must be float32 or bfloat16, got {dtype}")
        for name, param in self.named_parameters():
            param.data = param.data.to(dtype if _stack_param(name) else torch.float32)
        return self

    # -- stage 1: vision --------------------------------------------------------------------------
    def embed_images(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """images (B, N, 3, S, S) float in [-1, 1] (or N tensors (B, 3, S, S), token order)
        -> image tokens (B, N*T, W). Every camera and batch row goes through SigLIP at once."""
        if not isinstance(images, torch.Tensor):
            images = torch.stack(list(images), dim=1)
        b, n = images.shape[:2]
        tokens = self.projector(self.vision(images.flatten(0, 1)))  # (B*N, T, W), no scaling
        return tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])

    def embed_language(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, W) embeddings * sqrt(W), in the activation dtype (§5)."""
        emb = F.embedding(tokens, self.embed_tokens.weight).to(self.dtype)
        return emb * math.sqrt(emb.shape[-1])

    # -- stage 2: prefix --------------------------------------------------------------------------
    def new_cache(self, batch_size: int, num_cameras: int | None = None,
                  prompt_len: int | None = None) -> PrefixCache:
        """Allocate the static buffers for one (batch, cameras, prompt length) configuration."""
        cfg, dev = self.config, self.device
        p = cfg.prefix_len(prompt_len, num_cameras)
        s, lm = cfg.suffix_len, cfg.lm
        kv_shape = (lm.depth, batch_size, lm.num_kv_heads, p + s, lm.head_dim)
        return PrefixCache(
            k=torch.zeros(kv_shape, dtype=self.dtype, device=dev),
            v=torch.zeros(kv_shape, dtype=self.dtype, device=dev),
            prefix_len=p,
            pad_mask=torch.zeros(batch_size, p, dtype=torch.bool, device=dev),
            positions=torch.zeros(batch_size, p, dtype=torch.int64, device=dev),
            prefix_mask=torch.zeros(batch_size, 1, p, p, device=dev),
            suffix_mask=torch.zeros(batch_size, 1, s, p + s, device=dev),
            suffix_cos=torch.zeros(batch_size, s, lm.head_dim, dtype=self.dtype, device=dev),
            suffix_sin=torch.zeros(batch_size, s, lm.head_dim, dtype=self.dtype, device=dev),
        )

    def embed_prefix(self, image_tokens, image_masks, tokens, token_mask):
        """-> prefix embeddings (B, P, W), pad mask (B, P) bool (§5; all block flags are 0)."""
        per_image = self.config.vision.tokens_per_image
        embs = torch.cat([image_tokens.to(self.dtype), self.embed_language(tokens)], dim=1)
        pad = torch.cat([image_masks.bool().repeat_interleave(per_image, dim=1),
                         token_mask.bool()], dim=1)
        return embs, pad

    def fill_prefix(self, cache: PrefixCache, image_tokens: torch.Tensor,
                    image_masks: torch.Tensor, tokens: torch.Tensor,
                    token_mask: torch.Tensor) -> None:
        """Run the prefix through the LM once and write everything the steps read into ``cache``.

        image_tokens (B, N*T, W), image_masks (B, N) bool, tokens (B, L) int, token_mask (B, L)."""
        embs, pad = self.embed_prefix(image_tokens, image_masks, tokens, token_mask)
        if embs.shape[1] != cache.prefix_len:
            raise ValueError(f"prefix length {embs.shape[1]} does not match the cache's "
                             f"{cache.prefix_len} (cameras / prompt length changed?)")
        cache.pad_mask.copy_(pad)
        # Padding and masked cameras do not advance the position counter (§5).
        cache.positions.copy_(torch.cumsum(pad.long(), dim=1) - 1)
        allowed = pad[:, None, :, None] & pad[:, None, None, :]  # (B, 1, P, P)
        cache.prefix_mask.copy_(_additive(allowed))
        self._prepare_suffix(cache, pad)
        cos, sin = rope_tables(cache.positions, self.config.lm.head_dim,
                               self.config.lm.rope_theta, self.dtype)
        self.lm.fill_kv(embs, cos, sin, cache.k, cache.v, cache.prefix_mask)

    def _prepare_suffix(self, cache: PrefixCache, pad: torch.Tensor) -> None:
        """Suffix mask and positions, fixed for the observation (§5, §9)."""
        cfg, b = self.config, pad.shape[0]
        s = cfg.suffix_len
        # Block flags: pi0 [1 (state), 1, 0, ...], pi0.5 [1, 0, ...]; query i may attend key j
        # of the suffix iff cumsum(flags)[j] <= cumsum(flags)[i]. Every suffix token is valid.
        flags = torch.zeros(s, dtype=torch.long, device=pad.device)
        flags[: 1 if cfg.pi05 else 2] = 1
        c = torch.cumsum(flags, 0)
        suffix_allowed = (c[None, :] <= c[:, None]).expand(b, 1, s, s)
        prefix_allowed = pad[:, None, None, :].expand(b, 1, s, pad.shape[1])
        cache.suffix_mask.copy_(_additive(torch.cat([prefix_allowed, suffix_allowed], dim=-1)))
        # Suffix positions continue after the valid prefix tokens of each sample.
        positions = pad.sum(dim=1, keepdim=True) + torch.arange(s, device=pad.device)
        cos, sin = rope_tables(positions, cfg.expert.head_dim, cfg.expert.rope_theta, self.dtype)
        cache.suffix_cos.copy_(cos)
        cache.suffix_sin.copy_(sin)

    # -- stage 3: denoising -----------------------------------------------------------------------
    @torch.no_grad()
    def time_conditioning(self, num_steps: int, grid: str | None = None) -> TimeConditioning:
        """Precompute, once per step count, what each step needs from t alone (§7).
        ``grid``: a ``TIME_GRIDS`` name; None: ``self.time_grid`` ("openpi" unless set)."""
        grid = self.time_grid if grid is None else grid
        dt, times = time_grid(num_steps, grid)
        cfg = self.config
        t = torch.tensor(times, dtype=torch.float32, device=self.device)
        emb = sinusoidal_embedding(t, cfg.expert.width, cfg.min_period, cfg.max_period)
        cond = modulation = None
        if cfg.pi05:
            # Where the prepare-only weights live (host memory after release_unread_weights).
            home = self.time_mlp_in.weight.device
            if home.type == "meta" and self.device.type != "meta":
                raise RuntimeError("the time-conditioning weights were dropped "
                                   "(release_unread_weights(to=None)); reload the model to "
                                   "prepare another step count")
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(emb.to(home)))))
            modulation = self.expert.modulations(cond).to(self.device)  # (steps, 2d+1, 3, We)
            cond = cond.to(self.device)
        return TimeConditioning(num_steps, dt, times, emb, cond, modulation, grid)

    def unread_modules(self) -> dict[str, list[str]]:
        """Modules the served stages never run: ``prepare`` ones (pi0.5: the adaRMS ``dense``
        layers and the time MLP, read only by ``time_conditioning``) and ``never`` ones (the last
        LM layer's q / o / MLP / post-attention norm and the LM's final norm: only the last
        layer's keys / values are read, SEMANTICS §9)."""
        last = f"lm.layers.{len(self.lm.layers) - 1}"
        never = [f"{last}.self_attn.q_proj", f"{last}.self_attn.o_proj", f"{last}.mlp",
                 f"{last}.post_attention_layernorm", "lm.norm"]
        prepare = []
        if self.config.pi05:
            prepare = ["time_mlp_in", "time_mlp_out", "expert.norm.dense"]
            prepare += [f"expert.layers.{i}.{norm}.dense" for i in range(len(self.expert.layers))
                        for norm in ("input_layernorm", "post_attention_layernorm")]
        return {"prepare": prepare, "never": never}

    def release_unread_weights(self, to: str | torch.device | None = "cpu") -> int:
        """Move the ``unread_modules`` off the device (``to="cpu"``: host memory, and
        ``time_conditioning`` keeps working there) or drop them (``to=None``: the meta device,
        for unified-memory devices such as Jetson Thor where host memory is the same DRAM).
        Returns the bytes released from the model's device. Call after ``time_conditioning``
        (the engine does, in ``prepare``); idempotent."""
        target = torch.device("meta" if to is None else to)
        freed = 0
        for names in self.unread_modules().values():
            for name in names:
                module = self.get_submodule(name)
                tensors = list(module.parameters()) + list(module.buffers())
                freed += sum(t.numel() * t.element_size() for t in tensors
                             if t.device == self.device and t.device != target)
                module.to(target)
        return freed

    def embed_suffix(self, state: torch.Tensor, x_t: torch.Tensor, conds: TimeConditioning,
                     step: int) -> torch.Tensor:
        """-> expert input tokens (B, S, We) float32 (§7)."""
        action_emb = self.action_in_proj(x_t)  # (B, H, We)
        if self.config.pi05:
            return action_emb
        time_emb = conds.time_emb[step].expand_as(action_emb)
        mixed = self.action_time_mlp_in(torch.cat([action_emb, time_emb], dim=-1))
        action_time = self.action_time_mlp_out(F.silu(mixed))
        state_emb = self.state_proj(state.to(self.state_proj.weight.dtype))[:, None]
        return torch.cat([state_emb, action_time], dim=1)

    def denoise_step(self, cache: PrefixCache, state: torch.Tensor, x_t: torch.Tensor,
                     conds: TimeConditioning, step: int) -> torch.Tensor:
        """Velocity v_t (B, H, A) float32 at t = conds.times[step] for x_t (B, H, A)."""
        x = self.embed_suffix(state, x_t, conds, step).to(self.dtype)
        mods = None if conds.modulation is None else conds.modulation[step]
        out = self.expert.forward_suffix(x, cache.suffix_cos, cache.suffix_sin, cache.k, cache.v,
                                         cache.prefix_len, cache.suffix_mask, mods)
        return self.action_out_proj(out[:, -self.config.action_horizon:].float())

    def denoise(self, cache: PrefixCache, state: torch.Tensor, noise: torch.Tensor,
                conds: TimeConditioning) -> torch.Tensor:
        """Euler integration from x_1 = noise (B, H, A) to x_0 = normalized actions (§8)."""
        x = noise.float()
        for step in range(conds.num_steps):
            x = x + conds.dt * self.denoise_step(cache, state, x, conds, step)
        return x

    # -- all stages -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_actions(self, images, image_masks, tokens, token_mask, state, noise=None,
                       num_steps: int = 10, generator: torch.Generator | None = None):
        """images (B, N, 3, S, S) or a list of N (B, 3, S, S); image_masks (B, N) bool;
        tokens / token_mask (B, L); state (B, A) float32 (zero-padded to A); noise (B, H, A)
        or None to draw it from ``generator`` -> normalized actions (B, H, A) float32."""
        image_tokens = self.embed_images(images)
        b = image_tokens.shape[0]
        if not isinstance(image_masks, torch.Tensor):
            image_masks = torch.stack(list(image_masks), dim=1)
        cache = self.new_cache(b, image_masks.shape[1], tokens.shape[1])
        self.fill_prefix(cache, image_tokens, image_masks, tokens, token_mask)
        if noise is None:
            cfg = self.config
            noise = torch.randn((b, cfg.action_horizon, cfg.action_dim), generator=generator,
                                device=self.device, dtype=torch.float32)
        return self.denoise(cache, state, noise, self.time_conditioning(num_steps))


@torch.no_grad()
def random_init_(model: Pi0Model, seed: int = 0) -> Pi0Model:
    """Deterministic random weights that exercise every path (tests, demo, benchmarks).

    Unlike a fresh module (zero RMSNorm offsets and, as in JAX, zero adaRMS layers, whose zero
    gates would cut the expert off from the prefix), every tensor gets a seeded random value:
    matrices N(0, clip(1/sqrt(fan_in), 0.02, 0.2)), biases N(0, 0.05), norm offsets N(0, 0.1),
    LayerNorm scales 1 + N(0, 0.1), adaRMS dense N(0, 0.1) + bias N(0, 0.1).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        shape = param.shape
        if ".dense." in name:
            std = 0.1
        elif param.ndim >= 2:
            std = min(max(1.0 / math.sqrt(math.prod(shape[1:])), 0.02), 0.2)
        elif "layernorm" in name or name.endswith("norm.weight"):
            std = 0.1
        else:
            std = 0.05
        value = torch.randn(shape, generator=gen) * std
        if param.ndim == 1 and ("layer_norm" in name or "post_layernorm" in name) and (
                name.endswith(".weight")):
            value += 1.0
        param.data = value.to(param.dtype).to(param.device)
    return model


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.where(allowed, 0.0, MASK_VALUE).to(torch.float32)


_STACK_PREFIXES = ("vision.", "projector.", "embed_tokens.", "lm.", "expert.")
_FLOAT32_ISLANDS = ("patch_embedding", "position_embedding", "input_layernorm",
                    "post_attention_layernorm", "expert.norm.", "lm.norm.")


def _stack_param(name: str) -> bool:
    """True for parameters openpi casts to bf16 (inside `paligemma_with_expert`, §10)."""
    return name.startswith(_STACK_PREFIXES) and not any(s in name for s in _FLOAT32_ISLANDS)
