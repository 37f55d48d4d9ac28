"""TensorRT backend: the ONNX stages of ``onnx_export`` built into engines, served behind the
same ``Backend`` interface as eager and CUDA graphs.

Layers, from pure to device-bound (everything above the runtime seam is tested on CPU):

* ``builder_settings(options, device, shapes)`` - a pure function from the user's choice
  (precision, strong typing, optimization level, batch range) and the device to everything the
  TensorRT builder is told: network / builder flags, one optimization profile (min / opt / max
  batch), the optimization level, which ONNX dtype to export, and the warnings to print.
* ``fp32_island(layer_name)`` - which layers stay float32 in a weakly typed FP16 / BF16 build
  (norms, the attention cores: pure FP16 overflows in Gemma attention).
* ``summarize_layers(inspector_json, requested)`` - the precision each built layer actually
  runs in, from TensorRT's engine inspector; flags FP8 / FP16 that silently fell back to FP32
  (TensorRT issue #4590 on Thor).
* ``EngineKey`` / ``EngineCache`` - engines on disk keyed by checkpoint hash, geometry, stage,
  cameras, prompt bucket, steps, batch range, precision, typing, opt level, TensorRT version and
  GPU; a cached engine whose metadata disagrees is refused with the differing fields named.
* ``TrtRuntime`` - the seam: ``build(onnx, settings) -> bytes``, ``load(bytes) -> TrtEngine``
  (``run(inputs, outputs)`` on bound torch tensors), ``inspect(bytes)``. ``TensorRTRuntime``
  drives the TensorRT Python API; ``OnnxRuntimeRuntime`` runs the same ONNX files with
  onnxruntime (float32 only) so the backend plumbing is testable without TensorRT.
* ``EngineBuilder`` - cache lookup, else export + build + inspect + store.
* ``TensorRTBackend`` - ``StaticBackend`` whose stages run engines on static buffers.

Thor: optimization level defaults to 2 (a fused RMSNorm crashed at >= 3 in Turbo-Pi0.5's
notes). FP8: the bf16 graph with calibrated FP8 Q/DQ around every Gemma linear
(``onnx_export.quantize_fp8``), strongly typed; a graph without FP8 Q/DQ is refused rather than
silently built as something else. See docs/TENSORRT.md for what was and was not verified.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from ..model import Pi0Model
from ..model.weights import geometry_dict
from .base import StaticBackend
from .base import ModelInputs, dummy_inputs
from .onnx_export import (DEFAULT_OPSET, EXPORT_FORMAT, FP8_OPSET, StageExport, calibrate_fp8,
                          export_stage, quantize_fp8, stage_dtypes, stage_id, stage_io,
                          stage_shapes, step_conditioning)

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
DEFAULT_CACHE_DIR = Path(os.environ.get("PI0_ROS_ENGINE_CACHE",
                                        "~/.cache/pi0_ros/engines")).expanduser()
THOR_MAX_OPT_LEVEL = 2  # Turbo-Pi0.5: a fused RMSNorm crashed the Thor build at level >= 3
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default
Progress = Callable[[str], None]


# -- errors ---------------------------------------------------------------------------------------
class TensorRTError(RuntimeError):
    """Base class of every TensorRT backend error."""


class TensorRTUnavailable(TensorRTError):
    """The ``tensorrt`` Python package (or CUDA) is missing."""


class StaleEngineError(TensorRTError):
    """A cached engine was built for something else (TensorRT version, GPU, checkpoint...)."""


class EngineNotFoundError(TensorRTError):
    """No engine for this configuration and building is not allowed."""


class EngineBuildError(TensorRTError):
    """The ONNX parser or the builder failed; the message carries TensorRT's own errors."""


def require_tensorrt():
    """Import tensorrt or raise ``TensorRTUnavailable`` saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(
            "the tensorrt backend needs the TensorRT Python package: on Jetson Thor it comes with "
            "JetPack (apt install python3-libnvinfer; in a venv use --system-site-packages); on a "
            "desktop GPU `pip install tensorrt` (downloads from NVIDIA's index, needs network) "
            f"- see docs/TENSORRT.md ({e})") from None
    return trt


# -- device ---------------------------------------------------------------------------------------
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
    device = torch.device(device if device is not None else "cuda")
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

    ``shapes`` as ``onnx_export.stage_shapes`` (``"batch"`` marks the dynamic axis); one profile
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


# Layers kept in float32 in weakly typed reduced-precision builds: every RMSNorm / LayerNorm
# (statistics and scaling), every attention core (logits, softmax), the additive masks (-2.4e38
# is -inf in fp16: a fully masked row becomes NaN), the RoPE tables (angles of positions ~1000
# have a resolution of 0.5 rad in fp16), the final norms. TensorRT names a parsed layer after
# its ONNX node (``/lm.0/input_layernorm/ReduceMean``, ``/expert.2/attention_core/Softmax``),
# sometimes with a suffix; the export wrappers give these scopes their names.
FP32_ISLAND_SCOPES = ("input_layernorm", "post_attention_layernorm", "layer_norm",
                      "post_layernorm", "attention_core", "attention_mask", "rope_tables",
                      "/self_attn/MatMul", "/self_attn/Softmax", "/self_attn/Mul")
# The stacks' final norms: ``/norm/...``, ``/final_norm/...`` or ``/norm_1/...`` (the exporter
# de-duplicates scope names).
_FINAL_NORM = re.compile(r"(^|/)(final_)?norm(_\d+)?/")


def fp32_island(layer_name: str) -> bool:
    """True for a layer a weakly typed FP16 / BF16 build must keep in float32."""
    return (any(scope in layer_name for scope in FP32_ISLAND_SCOPES)
            or _FINAL_NORM.search(layer_name) is not None)


def check_onnx_for_precision(onnx_path: str | Path, settings: BuilderSettings) -> None:
    """FP8 needs explicit quantization: refuse a graph without FP8 Q/DQ nodes (a build would
    succeed and silently run everything in BF16/FP32)."""
    if settings.precision != "fp8":
        return
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    if not fp8_qdq_nodes(proto):
        raise EngineBuildError(
            f"fp8 requested but {onnx_path} has no FP8 QuantizeLinear/DequantizeLinear nodes: "
            "TensorRT builds FP8 only from explicitly quantized graphs (NVIDIA ModelOpt); "
            "pi0-ros-export does not quantize. Use bf16, or quantize the exported ONNX first.")


def fp8_qdq_nodes(proto) -> list[str]:
    """Names of QuantizeLinear nodes producing float8 (zero point or output_dtype FP8)."""
    import onnx

    fp8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2}
    inits = {t.name: t.data_type for t in proto.graph.initializer}
    found = []
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        zp = node.input[2] if len(node.input) > 2 else ""
        if attrs.get("output_dtype") in fp8 or inits.get(zp) in fp8:
            found.append(node.name)
    return found


# -- inspector report (pure) ---------------------------------------------------------------------
# Inspector "Format/Datatype" strings vary by version ("Row major linear FP16 format",
# "Half", "Float", "BFloat16", "N/A due to dynamic shapes"...): matched case-insensitively, in
# this order (bfloat16 / float16 before float).
_DTYPE_WORDS = (("fp8", "fp8"), ("float8", "fp8"), ("e4m3", "fp8"), ("bf16", "bf16"),
                ("bfloat16", "bf16"), ("fp16", "fp16"), ("float16", "fp16"), ("half", "fp16"),
                ("fp32", "fp32"), ("float", "fp32"), ("int8", "int8"), ("int32", "int32"),
                ("int64", "int64"), ("bool", "bool"))


def _dtype_of(format_string: str) -> str:
    text = format_string.lower()
    for word, dtype in _DTYPE_WORDS:
        if word in text:
            return dtype
    return "unknown"


@dataclass(frozen=True)
class LayerReport:
    """Built-engine layer precisions (output dtype of each layer, from the inspector)."""

    counts: Mapping[str, int]  # dtype -> number of layers
    matmul_counts: Mapping[str, int]  # same, for GEMM / convolution layers only
    fallback: bool  # requested reduced precision but no GEMM runs in it
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "matmul_counts": dict(self.matmul_counts),
                "fallback": self.fallback, "message": self.message}


_GEMM_TYPES = ("MatrixMultiply", "Convolution", "Gemm", "Myelin", "CaskGemm", "CaskConvolution")


def summarize_layers(info: Mapping[str, Any] | str | None, requested: str) -> LayerReport:
    """Count layer output dtypes in the engine inspector's JSON (``ProfilingVerbosity.DETAILED``
    builds: ``{"Layers": [{"Name", "LayerType", "Outputs": [{"Format/Datatype": ...}]}]}``;
    ``kLAYER_NAMES_ONLY`` builds give plain names and no dtypes). ``fallback`` is True when a
    reduced precision was requested and no GEMM-like layer produces it (TensorRT #4590)."""
    if info is None:
        return LayerReport({}, {}, False, "no inspector information")
    if isinstance(info, str):
        info = json.loads(info)
    counts: dict[str, int] = {}
    gemm: dict[str, int] = {}
    touched: set[str] = set()  # every dtype a layer reads or writes (an FP8 GEMM reads FP8)
    for layer in info.get("Layers", []):
        if not isinstance(layer, Mapping):
            continue
        outs = layer.get("Outputs") or []
        dtype = _dtype_of(str(outs[0].get("Format/Datatype", ""))) if outs else "unknown"
        counts[dtype] = counts.get(dtype, 0) + 1
        touched.update(_dtype_of(str(t.get("Format/Datatype", "")))
                       for t in list(outs) + list(layer.get("Inputs") or []))
        kind = str(layer.get("LayerType", "")) + " " + str(layer.get("TacticName", ""))
        if any(t in kind for t in _GEMM_TYPES):
            gemm[dtype] = gemm.get(dtype, 0) + 1
    want = {"fp32": None, "bf16": "bf16", "fp16": "fp16", "fp8": "fp8"}[requested]
    if set(counts) <= {"unknown"}:
        return LayerReport(counts, gemm, False, "inspector gave no per-layer dtypes (needs a "
                           "ProfilingVerbosity.DETAILED build and, with dynamic shapes, an "
                           "execution context with input shapes set)")
    if want == "fp8":  # FP8 GEMMs usually output bf16 / fp16: look at what layers read too
        fallback = want not in touched
    else:
        fallback = want is not None and (gemm or counts).get(want, 0) == 0
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    msg = f"layer output dtypes: {summary}"
    if fallback:
        msg += (f"; requested {requested} but no {'layer' if want == 'fp8' else 'GEMM'} runs in "
                f"{want}: the build fell back (TensorRT #4590 on Thor?)")
    return LayerReport(counts, gemm, fallback, msg)


# -- engine cache ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. ``digest`` names the file; the fields are stored next
    to it and compared on load."""

    checkpoint: str  # content hash of the weights (checkpoint_hash / model_hash)
    geometry: str  # hash of the model geometry (pi05, widths, cameras, horizon...)
    stage: str
    num_cameras: int
    prompt_len: int
    num_steps: int
    min_batch: int
    opt_batch: int
    max_batch: int
    precision: str
    strongly_typed: bool
    opt_level: int
    fp32_islands: bool
    tf32: bool
    opset: int
    tensorrt: str  # TensorRT (or runtime) version
    gpu: str
    capability: str
    calibration: str = ""  # fp8: identity of the calibration data
    export_format: int = EXPORT_FORMAT

    @property
    def digest(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def file_stem(self) -> str:
        return (f"{stage_id(self.stage, self.num_cameras, self.prompt_len, self.num_steps)}"
                f"-{self.precision}-b{self.max_batch}-{self.digest[:16]}")

    def diff(self, other: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Fields whose stored value differs: name -> (stored, wanted)."""
        mine = dataclasses.asdict(self)
        return {k: (other.get(k), v) for k, v in mine.items() if other.get(k) != v}


def geometry_hash(config) -> str:
    blob = json.dumps(geometry_dict(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_hash(model: torch.nn.Module) -> str:
    """Content hash of every parameter (name, dtype, shape, float32 bytes): for models that did
    not come from a checkpoint directory (tests, random init). Independent of the model's
    current precision, like a checkpoint hash."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]


def checkpoint_hash(path: str | os.PathLike) -> str:
    """SHA-256 over a checkpoint directory's *.safetensors and config.json (or one file), cached
    in ``<dir>/.pi0_ros_hash.json`` keyed by size and mtime (a full-size checkpoint is ~7 GB)."""
    path = Path(path)
    files = (sorted(path.glob("*.safetensors")) + sorted(path.glob("config.json"))
             if path.is_dir() else [path])
    if not files:
        raise FileNotFoundError(f"no *.safetensors under {path}")
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    memo = (path if path.is_dir() else path.parent) / ".pi0_ros_hash.json"
    try:
        cached = json.loads(memo.read_text())
        if cached.get("stamp") == stamp:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    digest = h.hexdigest()[:32]
    try:
        memo.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
    except OSError:  # read-only checkpoint directory: hash again next time
        pass
    return digest


@dataclass
class CachedEngine:
    key: EngineKey
    path: Path
    blob: bytes
    meta: dict[str, Any]
    built: bool = False


class EngineCache:
    """``<root>/<stage_id>-<precision>-b<max>-<digest>.engine`` + ``.json`` metadata."""

    def __init__(self, root: str | os.PathLike = DEFAULT_CACHE_DIR):
        self.root = Path(root).expanduser()

    def path(self, key: EngineKey) -> Path:
        return self.root / f"{key.file_stem}.engine"

    def load(self, key: EngineKey) -> CachedEngine | None:
        """The engine for ``key``, None if absent; ``StaleEngineError`` if its metadata
        disagrees with the key (edited file, or a digest collision)."""
        path = self.path(key)
        meta_path = path.with_suffix(".json")
        if not path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise StaleEngineError(f"{path}: unreadable metadata {meta_path} ({e}); delete "
                                   "both files to rebuild") from None
        diff = key.diff(meta.get("key", {}))
        if diff:
            raise StaleEngineError(f"{path} does not match this configuration: "
                                   f"{_format_diff(diff)}; delete it to rebuild")
        return CachedEngine(key, path, path.read_bytes(), meta)

    def stale(self, key: EngineKey) -> list[tuple[Path, dict[str, tuple[Any, Any]]]]:
        """Engines of the same stage configuration built for something else (other TensorRT,
        GPU, checkpoint, precision...): (path, differing fields)."""
        prefix = stage_id(key.stage, key.num_cameras, key.prompt_len, key.num_steps) + "-"
        found = []
        for meta_path in sorted(self.root.glob(prefix + "*.json")):
            try:
                stored = json.loads(meta_path.read_text()).get("key", {})
            except (OSError, ValueError):
                continue
            diff = key.diff(stored)
            if diff:
                found.append((meta_path.with_suffix(".engine"), diff))
        return found

    def store(self, key: EngineKey, blob: bytes, meta: Mapping[str, Any]) -> CachedEngine:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_suffix(".engine.tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)  # a crashed build never leaves a truncated engine behind
        full = {"key": dataclasses.asdict(key), **meta}
        path.with_suffix(".json").write_text(json.dumps(full, indent=1, sort_keys=True))
        return CachedEngine(key, path, blob, full, built=True)


def _format_diff(diff: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {a!r} (now {b!r})" for k, (a, b) in diff.items())


# -- the runtime seam -----------------------------------------------------------------------------
class TrtEngine(Protocol):
    """A deserialized engine with its execution context."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def run(self, inputs: Mapping[str, torch.Tensor],
            outputs: Mapping[str, torch.Tensor]) -> None:
        """Read ``inputs`` and write ``outputs`` (contiguous, engine dtypes), enqueued on the
        current CUDA stream (synchronous on CPU)."""


class TrtRuntime(Protocol):
    version: str

    def device_info(self) -> DeviceInfo: ...

    def build(self, onnx_path: Path, settings: BuilderSettings,
              progress: Progress | None = None) -> bytes: ...

    def load(self, blob: bytes) -> TrtEngine: ...

    def inspect(self, blob: bytes) -> Mapping[str, Any] | None: ...


def _trt_torch_dtypes(trt) -> dict[Any, torch.dtype]:
    pairs = [("float32", torch.float32), ("float16", torch.float16),
             ("bfloat16", torch.bfloat16), ("int64", torch.int64), ("int32", torch.int32),
             ("int8", torch.int8), ("bool", torch.bool), ("uint8", torch.uint8),
             ("fp8", torch.float8_e4m3fn)]
    return {getattr(trt, n): t for n, t in pairs if hasattr(trt, n)}


class TensorRTRuntime:
    """``TrtRuntime`` over the TensorRT Python API (TensorRT 10: named I/O tensors,
    ``execute_async_v3``). Unverified in the session that wrote it (no TensorRT there)."""

    def __init__(self, device: torch.device | str | None = None, verbose: bool = False):
        self.trt = trt = require_tensorrt()
        self.version = str(trt.__version__)
        self.device = torch.device(device if device is not None else "cuda")
        self._device_info = cuda_device_info(self.device)
        self.logger = _make_logger(trt, verbose)
        self._runtime = trt.Runtime(self.logger)
        self._dtypes = _trt_torch_dtypes(trt)

    def device_info(self) -> DeviceInfo:
        return self._device_info

    def build(self, onnx_path: Path, settings: BuilderSettings,
              progress: Progress | None = None) -> bytes:
        trt = self.trt
        self.logger.errors.clear()
        builder = trt.Builder(self.logger)
        flags = 0
        for name in settings.network_flags:
            flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}: "
                                   + "; ".join(errors or self.logger.errors))
        config = builder.create_builder_config()
        config.builder_optimization_level = settings.opt_level
        for name in settings.builder_flags:
            config.set_flag(getattr(trt.BuilderFlag, name))
        for name in settings.clear_flags:
            config.clear_flag(getattr(trt.BuilderFlag, name))
        if settings.workspace_bytes is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # inspector dtypes
        if settings.profiles:
            profile = builder.create_optimization_profile()
            for p in settings.profiles:
                profile.set_shape(p.name, p.min, p.opt, p.max)
            config.add_optimization_profile(profile)
        if settings.fp32_islands:
            pinned = pin_fp32_islands(trt, network)
            log.info("pinned %d layers to float32", pinned)
        if progress is not None and hasattr(trt, "IProgressMonitor"):
            config.progress_monitor = _make_progress_monitor(trt, progress)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise EngineBuildError(f"TensorRT failed to build {onnx_path}: "
                                   + ("; ".join(self.logger.errors) or "no error message"))
        return bytes(blob)

    def load(self, blob: bytes) -> _TensorRTEngine:
        engine = self._runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise StaleEngineError("TensorRT could not deserialize the engine (built by another "
                                   "TensorRT version or for another GPU?): "
                                   + "; ".join(self.logger.errors))
        return _TensorRTEngine(self.trt, engine, self._dtypes)

    def inspect(self, blob: bytes) -> Mapping[str, Any] | None:
        """Inspector JSON at the profile's max shapes (with dynamic shapes and no context the
        inspector reports "N/A due to dynamic shapes" instead of datatypes)."""
        trt = self.trt
        engine = self._runtime.deserialize_cuda_engine(blob)
        if engine is None:
            return None
        context = engine.create_execution_context()
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT and -1 in tuple(
                    engine.get_tensor_shape(name)):
                context.set_input_shape(name, tuple(engine.get_tensor_profile_shape(name, 0)[2]))
        inspector = engine.create_engine_inspector()
        inspector.execution_context = context
        return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def pin_fp32_islands(trt, network) -> int:
    """Set precision / output types of every ``fp32_island`` layer with float outputs."""
    floats = {trt.float32, trt.float16} | ({trt.bfloat16} if hasattr(trt, "bfloat16") else set())
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not fp32_island(layer.name):
            continue
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outs or any(o.dtype not in floats for o in outs):
            continue  # shape / index arithmetic: leave alone
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


class _TensorRTEngine:
    def __init__(self, trt, engine, dtypes):
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = tuple(n for n in names if engine.get_tensor_mode(n) == mode)
        self.outputs = tuple(n for n in names if engine.get_tensor_mode(n) != mode)
        self.dtypes = {n: dtypes.get(engine.get_tensor_dtype(n)) for n in names}

    def run(self, inputs: Mapping[str, torch.Tensor],
            outputs: Mapping[str, torch.Tensor]) -> None:
        ctx = self.context
        for name in self.inputs:
            t = _checked(name, inputs, self.dtypes[name])
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        for name in self.outputs:
            t = _checked(name, outputs, self.dtypes[name])
            want = tuple(ctx.get_tensor_shape(name))
            if want != tuple(t.shape):
                raise TensorRTError(f"engine output {name} has shape {want}, buffer "
                                    f"{tuple(t.shape)}")
            ctx.set_tensor_address(name, t.data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise TensorRTError("execute_async_v3 failed")


def _checked(name, tensors, dtype):
    if name not in tensors:
        raise TensorRTError(f"engine tensor {name!r} has no buffer (have {sorted(tensors)})")
    t = tensors[name]
    if dtype is not None and t.dtype != dtype:
        raise TensorRTError(f"engine tensor {name!r} is {dtype}, buffer is {t.dtype}")
    if not t.is_contiguous():
        raise TensorRTError(f"buffer for {name!r} is not contiguous")
    return t


def _make_logger(trt, verbose: bool):
    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = int(severity)  # INTERNAL_ERROR 0 < ERROR 1 < WARNING 2 < INFO 3 < VERBOSE 4
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif level <= int(trt.ILogger.Severity.WARNING):
                log.warning("TensorRT: %s", msg)
            elif verbose:
                log.info("TensorRT: %s", msg)

    return _Logger()


def _make_progress_monitor(trt, progress: Progress):
    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.t0 = time.perf_counter()

        def phase_start(self, phase_name, parent_phase, num_steps):
            indent = "  " if parent_phase else ""
            progress(f"    {indent}{phase_name} ({num_steps} steps) "
                     f"[{time.perf_counter() - self.t0:.0f} s]")

        def step_complete(self, phase_name, step):
            return True  # keep building

        def phase_finish(self, phase_name):
            pass

    return _Monitor()


class OnnxRuntimeRuntime:
    """``TrtRuntime`` stand-in that "builds" by keeping the ONNX bytes and runs them with
    onnxruntime on CPU (float32 only). Used to test the backend, the cache and the build flow
    without TensorRT, and as a float32 reference for the exported stages."""

    def __init__(self, threads: int = 0):
        import onnxruntime

        self.version = f"onnxruntime-{onnxruntime.__version__}"
        self.threads = threads
        self.builds: list[tuple[Path, BuilderSettings]] = []

    def device_info(self) -> DeviceInfo:
        return DeviceInfo("cpu (onnxruntime)", (0, 0))

    def build(self, onnx_path: Path, settings: BuilderSettings,
              progress: Progress | None = None) -> bytes:
        import onnx

        if settings.onnx_dtype != "float32":
            raise EngineBuildError("OnnxRuntimeRuntime runs float32 graphs only")
        self.builds.append((Path(onnx_path), settings))
        if progress:
            progress(f"    onnxruntime: loading {onnx_path}")
        return onnx.load(str(onnx_path)).SerializeToString()

    def load(self, blob: bytes) -> _OrtEngine:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        return _OrtEngine(ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"]))

    def inspect(self, blob: bytes) -> Mapping[str, Any] | None:
        return None


class _OrtEngine:
    def __init__(self, session):
        self.session = session
        self.inputs = tuple(i.name for i in session.get_inputs())
        self.outputs = tuple(o.name for o in session.get_outputs())

    def run(self, inputs: Mapping[str, torch.Tensor],
            outputs: Mapping[str, torch.Tensor]) -> None:
        feeds = {n: _checked(n, inputs, None).detach().cpu().numpy() for n in self.inputs}
        for name, value in zip(self.outputs, self.session.run(list(self.outputs), feeds)):
            out = _checked(name, outputs, None)
            if tuple(out.shape) != value.shape:
                raise TensorRTError(f"engine output {name} has shape {value.shape}, buffer "
                                    f"{tuple(out.shape)}")
            out.copy_(torch.from_numpy(value))


# -- export + build + cache -----------------------------------------------------------------------
@dataclass
class BuildRecord:
    """One stage engine as the builder produced or found it (the CLI's report rows)."""

    stage: str
    prompt_len: int
    key: EngineKey
    path: Path
    size: int
    built: bool
    build_s: float
    export_s: float
    layers: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


class EngineBuilder:
    """Cache lookup, else ONNX export + build + inspect + store, for one model and device."""

    def __init__(self, model: Pi0Model, runtime: TrtRuntime,
                 options: BuildOptions = BuildOptions(), *, cache: EngineCache | None = None,
                 checkpoint: str | None = None,
                 work_dir: str | os.PathLike | None = None, allow_build: bool = True,
                 progress: Progress | None = None,
                 calibration: Sequence[ModelInputs] | None = None):
        self.model = model
        self.runtime = runtime
        self.options = options
        self.cache = cache or EngineCache()
        if checkpoint is not None and Path(checkpoint).exists():  # a checkpoint directory
            checkpoint = checkpoint_hash(checkpoint)
        self.checkpoint = checkpoint or model_hash(model)
        self.geometry = geometry_hash(model.config)
        self.work_dir = Path(work_dir) if work_dir else self.cache.root / "onnx"
        self.allow_build = allow_build
        self.progress = progress or (lambda msg: log.info("%s", msg))
        self.device = runtime.device_info()
        self._export_models: dict[str, Pi0Model] = {}
        self._exports: dict[tuple, StageExport] = {}
        self.calibration = list(calibration) if calibration is not None else None
        self.calibration_id = (_inputs_hash(self.calibration) if self.calibration is not None
                               else "random")
        self._amax: dict[int, dict[str, float]] = {}

    def add_exports(self, exports: Iterable[StageExport]) -> None:
        """Reuse stages already exported (the CLI exports once for the onnxruntime check)."""
        for ex in exports:
            self._exports[(ex.stage, ex.num_cameras, ex.prompt_len, ex.num_steps, ex.dtype,
                           ex.opset)] = ex

    def settings(self, stage: str, prompt_len: int, num_cameras: int, *, min_batch: int,
                 max_batch: int) -> BuilderSettings:
        cfg = self.model.config
        shapes = stage_shapes(cfg, stage, prompt_len, num_cameras)
        inputs, _ = stage_io(stage, cfg.pi05)
        options = self.options
        if options.precision == "fp8" and stage == "vision":  # SigLIP stays bf16 (as fp8.py)
            options = dataclasses.replace(options, precision="bf16")
        return builder_settings(options, self.device, shapes, inputs, min_batch=min_batch,
                                max_batch=max_batch)

    def key(self, stage: str, prompt_len: int, num_cameras: int, num_steps: int,
            settings: BuilderSettings) -> EngineKey:
        p = settings.profiles[0] if settings.profiles else None
        batch = (p.min, p.opt, p.max) if p else ((1,), (1,), (1,))
        axis = 1 if p and p.name in ("prefix_k", "prefix_v") else 0
        return EngineKey(
            checkpoint=self.checkpoint, geometry=self.geometry, stage=stage,
            num_cameras=num_cameras, prompt_len=0 if stage == "vision" else prompt_len,
            num_steps=num_steps if stage == "denoise" else 0, min_batch=batch[0][axis],
            opt_batch=batch[1][axis], max_batch=batch[2][axis], precision=settings.precision,
            strongly_typed=settings.strongly_typed, opt_level=settings.opt_level,
            fp32_islands=settings.fp32_islands, tf32="TF32" not in settings.clear_flags,
            opset=settings.opset, tensorrt=self.runtime.version, gpu=self.device.name,
            capability=".".join(map(str, self.device.capability)),
            calibration=self.calibration_id if settings.precision == "fp8" else "")

    def engine(self, stage: str, *, prompt_len: int, num_cameras: int, num_steps: int,
               min_batch: int, max_batch: int) -> tuple[CachedEngine, BuildRecord]:
        settings = self.settings(stage, prompt_len, num_cameras, min_batch=min_batch,
                                 max_batch=max_batch)
        key = self.key(stage, prompt_len, num_cameras, num_steps, settings)
        label = stage_id(stage, num_cameras, key.prompt_len, key.num_steps)
        cached = self.cache.load(key)
        if cached is not None:
            self.progress(f"{label}: cached engine {cached.path}")
            return cached, BuildRecord(stage, key.prompt_len, key, cached.path, len(cached.blob),
                                       False, float(cached.meta.get("build_s", 0.0)), 0.0,
                                       dict(cached.meta.get("layers", {})), settings.warnings)
        stale = self.cache.stale(key)
        if not self.allow_build:
            if stale:
                path, diff = stale[0]
                raise StaleEngineError(f"{label}: the cached engine {path} is stale: "
                                       f"{_format_diff(diff)}; rebuild it (pi0-ros-export "
                                       "--build) or allow building")
            raise EngineNotFoundError(f"{label}: no engine in {self.cache.root} and building is "
                                      "disabled")
        for path, diff in stale:
            self.progress(f"{label}: ignoring stale {path.name} ({_format_diff(diff)})")
        for w in settings.warnings:
            self.progress(f"{label}: warning: {w}")
        export = self._export(stage, prompt_len, num_cameras, num_steps, settings)
        check_onnx_for_precision(export.path, settings)
        self.progress(f"{label}: building {settings.precision} engine "
                      f"(strongly typed={settings.strongly_typed}, opt level "
                      f"{settings.opt_level}, batch {key.min_batch}..{key.max_batch})")
        t0 = time.perf_counter()
        blob = self.runtime.build(export.path, settings, self.progress)
        build_s = time.perf_counter() - t0
        report = summarize_layers(self.runtime.inspect(blob), settings.precision)
        if report.fallback:
            log.warning("%s: %s", label, report.message)
        stored = self.cache.store(key, blob, {"build_s": build_s, "export_s": export.seconds,
                                              "onnx": str(export.path),
                                              "layers": report.to_json(),
                                              "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.progress(f"{label}: built in {build_s:.1f} s, {len(blob) / 2**20:.1f} MiB; "
                      f"{report.message}")
        return stored, BuildRecord(stage, key.prompt_len, key, stored.path, len(blob), True,
                                   build_s, export.seconds, report.to_json(), settings.warnings)

    def _export(self, stage, prompt_len, num_cameras, num_steps,
                settings: BuilderSettings) -> StageExport:
        dtype, opset = settings.onnx_dtype, settings.opset
        label = stage_id(stage, num_cameras, prompt_len, num_steps)
        export = self._exports.get((stage, num_cameras, 0 if stage == "vision" else prompt_len,
                                    num_steps if stage == "denoise" else 0, dtype, opset))
        if export is None:
            model = self._export_model(dtype)
            self.progress(f"{label}: exporting ONNX ({dtype}, opset {opset})")
            export = export_stage(model, stage, self.work_dir / f"{dtype}_opset{opset}",
                                  num_cameras=num_cameras, prompt_len=prompt_len,
                                  num_steps=num_steps, opset=opset)
        if settings.precision != "fp8":
            return export
        amax = self._calibrate(num_steps)
        path = self.work_dir / f"{dtype}_fp8" / export.path.parent.name / "model.onnx"
        count = quantize_fp8(export.path, path, self._export_model(dtype), amax)
        self.progress(f"{label}: FP8 Q/DQ on {count} Gemma matmuls ({path})")
        return dataclasses.replace(export, path=path)

    def _export_model(self, dtype: str) -> Pi0Model:
        model = self._export_models.get(dtype)
        if model is None:
            if dtype == str(self.model.dtype).removeprefix("torch."):
                model = self.model
            else:  # e.g. the bf16 graph for a strongly typed BF16 build of a float32 model
                model = copy.deepcopy(self.model).set_precision(dtype)
            self._export_models[dtype] = model
        return model

    def _calibrate(self, num_steps: int) -> dict[str, float]:
        """FP8 activation ranges from the calibration requests (or random ones, with a
        warning), measured on the float32 model over ``num_steps`` denoising steps."""
        if num_steps not in self._amax:
            requests = self.calibration
            if requests is None:
                self.progress("warning: FP8 calibrated on random inputs; pass real observations "
                              "(pi0-ros-export --calib, TensorRTBackend(calibration=...))")
                cfg = self.model.config
                requests = [dummy_inputs(cfg, 2, cfg.num_cameras, cfg.max_token_len // 2,
                                         seed=i) for i in range(4)]
            self.progress(f"calibrating FP8 activation ranges on {len(requests)} request(s)")
            self._amax[num_steps] = calibrate_fp8(self.model, requests, num_steps)
        return self._amax[num_steps]


def _inputs_hash(requests: Sequence[ModelInputs]) -> str:
    h = hashlib.sha256()
    for r in requests:
        for f in dataclasses.fields(r):
            t = getattr(r, f.name)
            if t is not None:
                h.update(f.name.encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# -- the backend ----------------------------------------------------------------------------------
_TORCH_DTYPES = {"FLOAT": torch.float32, "BFLOAT16": torch.bfloat16, "INT64": torch.int64,
                 "BOOL": torch.bool}


class TensorRTBackend(StaticBackend):
    """Engines for vision, prefix and denoising on the static buffers of ``StaticBackend``.

    The model stays where it is (CPU is fine: it is used for the export and the time
    conditioning only); buffers live on ``device``. Per prompt bucket one prefix and one denoise
    engine, one vision engine, each with the batch profile 1..max_batch (opt = max_batch, the
    profile ``pi0-ros-export --max-batch`` builds). ``checkpoint``: the checkpoint directory (or
    its ``checkpoint_hash``) the engines were built from; default: a hash of the weights.
    Intermediate tensors (image tokens, K/V, masks, RoPE tables) sit in flat buffers sized for
    max batch and are viewed at the batch a request runs at, so every engine binding is a
    contiguous tensor whatever the batch. ``denoise="step"`` runs the one-step engine in a loop
    (the Euler update in torch) instead of the unrolled loop engine."""

    name = "tensorrt"

    def __init__(self, model: Pi0Model, device: str | torch.device | None = None, *,
                 options: BuildOptions = BuildOptions(), runtime: TrtRuntime | None = None,
                 cache_dir: str | os.PathLike | None = None, checkpoint: str | None = None,
                 allow_build: bool = True, denoise: str = "loop",
                 progress: Progress | None = None,
                 calibration: Sequence[ModelInputs] | None = None):
        if denoise not in ("loop", "step"):
            raise ValueError(f"denoise must be 'loop' or 'step', got {denoise!r}")
        target = torch.device(device) if device is not None else (
            model.device if runtime is not None else torch.device("cuda"))
        if runtime is None:
            runtime = TensorRTRuntime(target)
        super().__init__(model, model.device)
        self.device, self._cuda = target, target.type == "cuda"
        self.runtime = runtime
        self.builder = EngineBuilder(model, runtime, options, cache=EngineCache(
            cache_dir or DEFAULT_CACHE_DIR), checkpoint=checkpoint, allow_build=allow_build,
            progress=progress, calibration=calibration)
        self.denoise_mode = denoise
        self.records: list[BuildRecord] = []
        self._engines: dict[tuple[str, int], TrtEngine] = {}
        self._bufs: list[dict[str, torch.Tensor]] = []
        self._step_conds: list[torch.Tensor] = []

    def _after_prepare(self) -> None:
        spec, cfg = self.spec, self.config
        self.records = []
        jobs = [("vision", 0)] + [(s, L) for L in spec.prompt_buckets
                                  for s in ("prefix", "denoise" if self.denoise_mode == "loop"
                                            else "denoise_step")]
        for stage, L in jobs:
            cached, record = self.builder.engine(
                stage, prompt_len=L or spec.prompt_buckets[-1], num_cameras=spec.num_cameras,
                num_steps=spec.num_steps, min_batch=1, max_batch=spec.max_batch)
            self._engines[(stage, L)] = self.runtime.load(cached.blob)
            self.records.append(record)
        dtype = self.builder.settings("prefix", spec.prompt_buckets[-1], spec.num_cameras,
                                      min_batch=1, max_batch=spec.max_batch).onnx_dtype
        self._dtypes = {}
        for stage, _ in jobs:
            self._dtypes.update({k: _TORCH_DTYPES[v]
                                 for k, v in stage_dtypes(cfg, stage, dtype).items()})
        self._bufs = [self._alloc_intermediates() for _ in self._slots]
        for slot in self._slots:
            slot.caches = {}  # the eager cache buffers are unused here
        if self.denoise_mode == "step":
            self._step_conds = [step_conditioning(self.model, self.conds, i).to(self.device)
                                for i in range(spec.num_steps)]
        self.infer(self.warmup_inputs())

    def _alloc_intermediates(self) -> dict[str, torch.Tensor]:
        """Flat buffers at max batch for every tensor passed between engines."""
        spec, cfg = self.spec, self.config
        sizes: dict[str, int] = {}
        names = ["image_tokens", "prefix_k", "prefix_v", "suffix_mask", "suffix_cos",
                 "suffix_sin"] + (["x_t", "velocity"] if self.denoise_mode == "step" else [])
        for L in spec.prompt_buckets:
            shapes = stage_shapes(cfg, "prefix", L, spec.num_cameras)
            shapes["x_t"] = shapes["velocity"] = ("batch", cfg.action_horizon, cfg.action_dim)
            for name in names:
                n = math.prod(spec.max_batch if d == "batch" else d for d in shapes[name])
                sizes[name] = max(sizes.get(name, 0), n)
        return {name: torch.empty(n, dtype=self._dtypes.get(name, torch.float32),
                                  device=self.device) for name, n in sizes.items()}

    def _view(self, slot: int, name: str, bucket: int, batch: int) -> torch.Tensor:
        cfg, spec = self.config, self.spec
        if name in ("x_t", "velocity"):
            shape = (batch, cfg.action_horizon, cfg.action_dim)
        else:
            shape = tuple(batch if d == "batch" else d for d in stage_shapes(
                cfg, "prefix", bucket or spec.prompt_buckets[-1], spec.num_cameras)[name])
        return self._bufs[slot][name][:math.prod(shape)].view(shape)

    def _release_stages(self) -> None:
        self._engines, self._bufs, self._step_conds = {}, [], []

    def _run_stage(self, stage: str, slot: int, bucket: int, batch: int) -> None:
        s = self._slots[slot]
        view = lambda name: self._view(slot, name, bucket, batch)  # noqa: E731
        if stage == "vision":
            self._engines[("vision", 0)].run({"images": s.images[:batch]},
                                             {"image_tokens": view("image_tokens")})
            return
        cache = {n: view(n) for n in ("prefix_k", "prefix_v", "suffix_mask", "suffix_cos",
                                      "suffix_sin")}
        if stage == "prefix":
            self._engines[("prefix", bucket)].run(
                {"image_tokens": view("image_tokens"), "image_masks": s.image_masks[:batch],
                 "tokens": s.tokens[bucket][:batch], "token_mask": s.token_mask[bucket][:batch]},
                cache)
        elif stage == "denoise" and self.denoise_mode == "loop":
            self._engines[("denoise", bucket)].run(
                dict(cache, state=s.state[:batch], noise=s.noise[:batch]),
                {"actions": s.actions[:batch]})
        elif stage == "denoise":
            engine = self._engines[("denoise_step", bucket)]
            x, v = view("x_t"), view("velocity")
            x.copy_(s.noise[:batch])
            cond = "modulation" if self.config.pi05 else "time_emb"
            for step in range(self.spec.num_steps):
                engine.run(dict(cache, state=s.state[:batch], x_t=x,
                                **{cond: self._step_conds[step]}), {"velocity": v})
                x.add_(v, alpha=self.conds.dt)  # x + dt * v (openpi's Euler step)
            s.actions[:batch].copy_(x)
        else:
            raise ValueError(f"unknown stage {stage!r}")


def build_report(records: Iterable[BuildRecord]) -> list[dict[str, Any]]:
    """JSON-able rows of a build (``pi0-ros-export`` prints and saves them)."""
    return [{"stage": r.stage, "prompt_len": r.prompt_len, "engine": str(r.path),
             "size_bytes": r.size, "built": r.built, "build_s": round(r.build_s, 2),
             "export_s": round(r.export_s, 2), "precision": r.key.precision,
             "strongly_typed": r.key.strongly_typed, "opt_level": r.key.opt_level,
             "batch": [r.key.min_batch, r.key.opt_batch, r.key.max_batch],
             "tensorrt": r.key.tensorrt, "gpu": r.key.gpu, "layers": r.layers,
             "warnings": list(r.warnings)} for r in records]


__all__ = ["BuildOptions", "BuilderSettings", "DeviceInfo", "EngineBuildError", "EngineBuilder",
           "EngineCache", "EngineKey", "EngineNotFoundError", "LayerReport",
           "OnnxRuntimeRuntime", "PRECISIONS", "Profile", "StaleEngineError", "TensorRTBackend",
           "TensorRTError", "TensorRTRuntime", "TensorRTUnavailable", "TrtEngine", "TrtRuntime",
           "build_report", "builder_settings", "check_onnx_for_precision", "checkpoint_hash",
           "cuda_device_info", "fp32_island", "fp8_qdq_nodes", "geometry_hash", "model_hash",
           "pin_fp32_islands", "require_tensorrt", "summarize_layers"]

