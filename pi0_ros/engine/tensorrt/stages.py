"""The stage contract: what each exported inference stage takes and returns (pure, no torch
modules, no onnx).

Each stage has a dynamic batch axis (``batch``); every other shape is fixed by the configuration:

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
``model.set_precision("bfloat16")``. The prefix outputs are exactly what ``PrefixCache`` holds
for the denoising steps (``k[:P]``, ``v[:P]``, ``suffix_mask``, ``suffix_cos``, ``suffix_sin``).
"""

from __future__ import annotations

import torch

from ...model import Pi0Model, TimeConditioning

STAGES = ("vision", "prefix", "denoise", "denoise_step")
DEFAULT_OPSET = 17  # LayerNormalization; accepted by TensorRT 8.6+ and every JetPack 6/7 release
EXPORT_FORMAT = 1  # bump when the stage I/O contract changes (part of the engine cache key)

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
    """The batch axis of a stage tensor (None for the unbatched step conditioning)."""
    return None if name in UNBATCHED else BATCH_AXIS.get(name, 0)


def stage_id(stage: str, num_cameras: int, prompt_len: int = 0, num_steps: int = 0) -> str:
    """File-system name of a stage configuration, e.g. ``prefix_n3_L200``."""
    name = f"{stage}_n{num_cameras}"
    if stage != "vision":
        name += f"_L{prompt_len}"
    if stage == "denoise":
        name += f"_s{num_steps}"
    return name


def step_conditioning(model: Pi0Model, conds: TimeConditioning, step: int) -> torch.Tensor:
    """The ``denoise_step`` conditioning input of one step: time_emb (We,) for pi0,
    modulation (2*depth+1, 3, We) for pi0.5 (both float32)."""
    return conds.modulation[step] if model.config.pi05 else conds.time_emb[step]
