"""Frozen model configuration: geometry presets and the pi0 / pi0.5 switch.

Everything a shape depends on lives here, so a configuration fixes every static shape a CUDA
graph or an exported engine will see. Geometry overrides use the layout of an openpi fixture's
``config.json["geometry"]`` (see ``Pi0Config.from_geometry``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Mapping

# openpi's three model camera slots, in token order (openpi `model.IMAGE_KEYS`).
OPENPI_CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
DTYPES = ("float32", "bfloat16")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower + linear projector into the LM width."""

    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _positive(self, "image_size", "patch_size", "num_channels", "width", "depth", "mlp_dim",
                  "num_heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"VisionConfig.image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"VisionConfig.width {self.width} is not divisible by num_heads "
                             f"{self.num_heads}")

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclass(frozen=True)
class GemmaConfig:
    """One Gemma stack (the PaliGemma LM or the action expert)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    vocab_size: int = 257152
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        _positive(self, "width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim",
                  "vocab_size")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"GemmaConfig.num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"GemmaConfig.head_dim must be even for RoPE, got {self.head_dim}")


# Named presets (SEMANTICS §11 "Variant geometries").
GEMMA_PRESETS: dict[str, GemmaConfig] = {
    "gemma_2b": GemmaConfig(width=2048, depth=18, mlp_dim=16384),
    "gemma_300m": GemmaConfig(width=1024, depth=18, mlp_dim=4096),
}
VISION_PRESETS: dict[str, VisionConfig] = {"siglip_so400m_14_224": VisionConfig()}


@dataclass(frozen=True)
class Pi0Config:
    """Geometry and behaviour of one pi0 / pi0.5 model.

    ``pi05`` is the single flag that separates the two models (openpi ``Pi0Config.pi05``):
      * pi0:   the suffix is [state token, H action tokens]; the time embedding is mixed into the
               action tokens by ``action_time_mlp_*``; every norm is a plain Gemma RMSNorm.
      * pi0.5: the suffix is the H action tokens only; the time embedding goes through
               ``time_mlp_*`` into the adaRMSNorm of every expert norm; the state reaches the model
               through the prompt (``discrete_state_input``) or not at all.
    """

    pi05: bool
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: GemmaConfig = field(default_factory=lambda: GEMMA_PRESETS["gemma_2b"])
    expert: GemmaConfig = field(default_factory=lambda: GEMMA_PRESETS["gemma_300m"])
    action_dim: int = 32
    action_horizon: int = 50
    max_token_len: int = 0  # 0: openpi default, 48 for pi0 and 200 for pi0.5
    cameras: tuple[str, ...] = OPENPI_CAMERAS
    discrete_state_input: bool | None = None  # None: openpi default (= pi05)
    min_period: float = 4e-3
    max_period: float = 4.0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.pi05, bool):
            raise ValueError(f"Pi0Config.pi05 must be a bool, got {self.pi05!r}")
        _positive(self, "action_dim", "action_horizon")
        if self.max_token_len == 0:
            object.__setattr__(self, "max_token_len", 200 if self.pi05 else 48)
        _positive(self, "max_token_len")
        if self.discrete_state_input is None:
            object.__setattr__(self, "discrete_state_input", self.pi05)
        object.__setattr__(self, "cameras", tuple(self.cameras))
        if not self.cameras or len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"Pi0Config.cameras must be non-empty and unique, got {self.cameras}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Pi0Config.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if (self.lm.num_heads, self.lm.num_kv_heads, self.lm.head_dim, self.lm.depth) != (
            self.expert.num_heads, self.expert.num_kv_heads, self.expert.head_dim,
            self.expert.depth):
            raise ValueError("the LM and the expert share attention: heads, kv heads, head_dim "
                             f"and depth must match, got lm={self.lm} expert={self.expert}")
        if self.expert.width % 2:
            raise ValueError(f"expert width must be even (sin/cos time embedding), got "
                             f"{self.expert.width}")

    # -- derived sizes ---------------------------------------------------------------------------
    @property
    def num_cameras(self) -> int:
        return len(self.cameras)

    @property
    def suffix_len(self) -> int:
        """Expert tokens: pi0 adds one state token before the H action tokens."""
        return self.action_horizon + (0 if self.pi05 else 1)

    def prefix_len(self, prompt_len: int | None = None, num_cameras: int | None = None) -> int:
        n = self.num_cameras if num_cameras is None else num_cameras
        return n * self.vision.tokens_per_image + (prompt_len or self.max_token_len)

    @property
    def num_adarms_norms(self) -> int:
        """Expert norms that take the time condition in pi0.5: 2 per layer + the final norm."""
        return 2 * self.expert.depth + 1

    def replace(self, **changes: Any) -> Pi0Config:
        return dataclasses.replace(self, **changes)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Pi0Config:
        """Full-size openpi models: ``"pi0"`` or ``"pi05"`` (gemma_2b + gemma_300m + So400m/14)."""
        if name not in ("pi0", "pi05"):
            raise ValueError(f"unknown preset {name!r}; expected 'pi0' or 'pi05'")
        return cls(pi05=name == "pi05", **overrides)

    @classmethod
    def from_geometry(cls, geometry: Mapping[str, Any], **overrides: Any) -> Pi0Config:
        """Build from the layout of an openpi fixture ``config.json["geometry"]``."""
        try:
            v, lm, ex = geometry["vision"], geometry["lm"], geometry["expert"]
            vision = VisionConfig(
                image_size=int(v["image_size"]), patch_size=int(v["patch_size"]),
                num_channels=int(v.get("num_channels", 3)), width=int(v["hidden"]),
                depth=int(v["layers"]), mlp_dim=int(v["mlp"]), num_heads=int(v["heads"]),
                layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)))
            if "head_dim" in v and int(v["head_dim"]) != vision.head_dim:
                raise ValueError(f"geometry.vision.head_dim {v['head_dim']} != hidden/heads "
                                 f"{vision.head_dim}")
            kwargs: dict[str, Any] = dict(
                vision=vision, lm=_gemma_from_geometry(lm), expert=_gemma_from_geometry(ex))
            for key in ("action_dim", "action_horizon", "max_token_len"):
                if key in geometry:
                    kwargs[key] = int(geometry[key])
            if "pi05" in geometry:
                kwargs["pi05"] = bool(geometry["pi05"])
            if "cameras" in geometry:
                kwargs["cameras"] = tuple(geometry["cameras"])
            te = geometry.get("time_embedding", {})
            if "min_period" in te:
                kwargs["min_period"] = float(te["min_period"])
            if "max_period" in te:
                kwargs["max_period"] = float(te["max_period"])
        except KeyError as e:
            raise ValueError(f"geometry is missing the field {e.args[0]!r}") from None
        kwargs.update(overrides)
        if "pi05" not in kwargs:
            kwargs["pi05"] = bool(ex.get("adarms", False))
        return cls(**kwargs)


def _gemma_from_geometry(g: Mapping[str, Any]) -> GemmaConfig:
    return GemmaConfig(
        width=int(g["width"]), depth=int(g["depth"]), mlp_dim=int(g["mlp_dim"]),
        num_heads=int(g["num_heads"]), num_kv_heads=int(g["num_kv_heads"]),
        head_dim=int(g["head_dim"]), vocab_size=int(g.get("vocab_size", 257152)),
        rms_norm_eps=float(g.get("rms_norm_eps", 1e-6)),
        rope_theta=float(g.get("rope_theta", 10000.0)))


def tiny_config(pi05: bool = True, num_cameras: int = 2, **overrides: Any) -> Pi0Config:
    """Random-weight test geometry with the shape quirks of the real model kept.

    Same sizes as the openpi tiny fixtures: SigLIP 98x98 / patch 14 (49 tokens), LM width 64,
    expert width 32, 8 query heads of 16 over 1 KV head (so Nh*Dh = 128 differs from both widths).
    """
    base = dict(
        pi05=pi05,
        vision=VisionConfig(image_size=98, patch_size=14, width=32, depth=2, mlp_dim=80,
                            num_heads=4),
        lm=GemmaConfig(width=64, depth=3, mlp_dim=128, num_heads=8, num_kv_heads=1,
                       head_dim=16, vocab_size=512),
        expert=GemmaConfig(width=32, depth=3, mlp_dim=64, num_heads=8, num_kv_heads=1,
                           head_dim=16, vocab_size=512),
        cameras=OPENPI_CAMERAS[:num_cameras],
    )
    base.update(overrides)
    return Pi0Config(**base)
