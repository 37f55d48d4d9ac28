"""What the TensorRT builder is told, as a pure function of the user's choice and the device.

``BuildOptions`` is the user's choice (precision, strong typing, optimization level, TF32,
workspace, opset); ``DeviceInfo`` the GPU (name, compute capability: part of the engine cache
key); ``builder_settings(options, device, shapes, inputs)`` turns both plus a stage's shapes into
``BuilderSettings``: network / builder flags, one optimization profile (min / opt / max batch),
the optimization level, which ONNX export to parse (float32 or bfloat16) and the warnings to
print. Nothing here imports tensorrt; ``runtime.TensorRTRuntime`` applies the settings.

Thor: optimization level defaults to 2 (a fused RMSNorm crashed at >= 3 in Turbo-Pi0.5's
notes). FP8: the bf16 graph with calibrated FP8 Q/DQ around every Gemma linear (``qdq.py``),
strongly typed.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping, Sequence

import torch

from ..registry import resolve_device
from .errors import TensorRTUnavailable
from .qdq import FP8_OPSET
from .stages import DEFAULT_OPSET

PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
THOR_MAX_OPT_LEVEL = 2  # Turbo-Pi0.5: a fused RMSNorm crashed the Thor build at level >= 3
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default


@dataclass(frozen=True)
class DeviceInfo:
    """What the build depends on: GPU name and compute capability (part of the cache key)."""

    name: str
    capability: tuple[int, int]

    @property
    def is_thor(self) -> bool:
        # Jetson Thor: sm_110 with CUDA 13 (reported as sm_101 by CUDA 12.8 / 12.9).
        return "thor" in self.name.lower() or self.capability in ((10, 1), (11, 0))

    @property
    def supports_bf16(self) -> bool:
        return self.capability >= (8, 0)

    @property
    def supports_fp8(self) -> bool:
        return self.capability >= (8, 9)


def cuda_device_info(device: torch.device | str | None = None) -> DeviceInfo:
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("the tensorrt backend needs CUDA; torch.cuda.is_available() is "
                                  "False")
    device = resolve_device(device if device is not None else "cuda")
    return DeviceInfo(torch.cuda.get_device_name(device),
                      tuple(torch.cuda.get_device_capability(device)))


# -- builder configuration (pure) ---------------------------------------------------------------
@dataclass(frozen=True)
class BuildOptions:
    """What the user chooses. ``None`` fields are resolved per device by ``builder_settings``.

    precision: ``bf16`` (recommended), ``fp16`` (float32 islands for norms / attention), ``fp32``
    or ``fp8`` (Gemma linears with calibrated FP8 Q/DQ in a bf16 graph; SigLIP stays bf16).
    strongly_typed: default True except for fp16 (a strongly typed network takes every type from
    the ONNX graph: the bf16 export carries openpi's float32 islands as casts; there is no fp16
    export). opt_level: TensorRT builder optimization level 0..5 (default 3, 2 on Thor). tf32:
    allow TF32 for float32 matmuls (openpi sets matmul precision "high"). workspace_gib: cap on
    builder scratch memory (None: TensorRT's default, the device memory)."""

    precision: str = "bf16"
    strongly_typed: bool | None = None
    opt_level: int | None = None
    fp32_islands: bool = True
    tf32: bool = True
    workspace_gib: float | None = None
    opset: int = DEFAULT_OPSET

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"BuildOptions.precision must be one of {PRECISIONS}, got "
                             f"{self.precision!r}")
        if self.opt_level is not None and self.opt_level not in range(6):
            raise ValueError(f"BuildOptions.opt_level must be 0..5, got {self.opt_level!r}")
        if self.workspace_gib is not None and not self.workspace_gib > 0:
            raise ValueError(f"BuildOptions.workspace_gib must be > 0, got {self.workspace_gib}")
        if self.precision == "fp16" and self.strongly_typed:
            raise ValueError("fp16 cannot be strongly typed: the exported graphs are float32 / "
                             "bfloat16; use precision='bf16' or strongly_typed=False")


@dataclass(frozen=True)
class Profile:
    """One optimization-profile entry: an input's min / opt / max shapes."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class BuilderSettings:
    """Everything the TensorRT builder is told for one stage (``builder_settings``)."""

    precision: str
    strongly_typed: bool
    network_flags: tuple[str, ...]  # trt.NetworkDefinitionCreationFlag names
    builder_flags: tuple[str, ...]  # trt.BuilderFlag names to set
    clear_flags: tuple[str, ...]  # trt.BuilderFlag names to clear
    opt_level: int
    profiles: tuple[Profile, ...]
    fp32_islands: bool  # pin fp32_island() layers to float32 (weakly typed reduced precision)
    onnx_dtype: str  # which export to parse: "float32" or "bfloat16"
    workspace_bytes: int | None
    opset: int = DEFAULT_OPSET  # >= 19 for fp8 (float8 Q/DQ)
    warnings: tuple[str, ...] = ()


def builder_settings(options: BuildOptions, device: DeviceInfo,
                     shapes: Mapping[str, Sequence[int | str]], inputs: Sequence[str], *,
                     min_batch: int = 1, opt_batch: int | None = None,
                     max_batch: int = 1) -> BuilderSettings:
    """Pure: user options + device + a stage's shapes -> the builder configuration.

    ``shapes`` as ``stages.stage_shapes`` (``"batch"`` marks the dynamic axis); one profile
    entry per input with a batch axis: batch ``min_batch`` / ``opt_batch`` (default max) /
    ``max_batch``. Raises ``ValueError`` for a precision the device cannot run."""
    if not 1 <= min_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= max_batch, got {min_batch}, {max_batch}")
    opt_batch = max_batch if opt_batch is None else opt_batch
    if not min_batch <= opt_batch <= max_batch:
        raise ValueError(f"opt_batch {opt_batch} outside [{min_batch}, {max_batch}]")
    p = options.precision
    if p in ("bf16", "fp8") and not device.supports_bf16:
        raise ValueError(f"{p} needs compute capability >= 8.0; {device.name} has "
                         f"{device.capability}")
    if p == "fp8" and not device.supports_fp8:
        raise ValueError(f"fp8 needs compute capability >= 8.9; {device.name} has "
                         f"{device.capability}")
    strongly = options.strongly_typed if options.strongly_typed is not None else p != "fp16"
    warnings = []
    if strongly:
        # Types come from the graph; TensorRT rejects precision flags on a strongly typed network.
        # fp8: the bf16 graph with FP8 Q/DQ around the Gemma linears.
        network_flags, flags = ("STRONGLY_TYPED",), ()
        onnx_dtype = "bfloat16" if p in ("bf16", "fp8") else "float32"
        islands = False
        if p == "fp16":  # guarded in BuildOptions; kept for callers building settings directly
            raise ValueError("fp16 cannot be strongly typed")
    else:
        network_flags = ()
        flags = {"fp32": (), "bf16": ("BF16",), "fp16": ("FP16",),
                 "fp8": ("FP8", "BF16")}[p]
        islands = options.fp32_islands and p != "fp32"
        if islands:
            flags += ("OBEY_PRECISION_CONSTRAINTS",)
        onnx_dtype = "float32"
        if p == "fp16" and not options.fp32_islands:
            warnings.append("fp16 without float32 islands: Gemma attention / RMSNorm overflow "
                            "in pure FP16 (NVIDIA's finding); expect inf / NaN actions")
    if p == "fp8":
        warnings.append("fp8: check the built layer precisions (TensorRT #4590: silent FP32 "
                        "fallback on Thor)")
    clear = () if options.tf32 else ("TF32",)
    level = options.opt_level
    if level is None:
        level = THOR_MAX_OPT_LEVEL if device.is_thor else DEFAULT_OPT_LEVEL
    elif device.is_thor and level > THOR_MAX_OPT_LEVEL:
        warnings.append(f"optimization level {level} on Thor: a fused RMSNorm crashed at >= 3 "
                        f"(Turbo-Pi0.5); use <= {THOR_MAX_OPT_LEVEL} if the build fails")
    profiles = []
    for name in inputs:
        shape = tuple(shapes[name])
        if "batch" not in shape:
            continue
        profiles.append(Profile(name, *(tuple(b if d == "batch" else int(d) for d in shape)
                                        for b in (min_batch, opt_batch, max_batch))))
    workspace = (None if options.workspace_gib is None
                 else int(options.workspace_gib * 2**30))
    opset = max(options.opset, FP8_OPSET) if p == "fp8" else options.opset
    return BuilderSettings(p, strongly, network_flags, tuple(flags), clear, level,
                           tuple(profiles), islands, onnx_dtype, workspace, opset,
                           tuple(warnings))
