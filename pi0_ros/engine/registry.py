"""The one backend registry: which backends exist, where they run, in which numeric formats.

Every surface that names a backend or a format reads it from here: the policy node's parameters
(``ros/params.py``), the launch arguments, the config comments, ``pi0-ros-bench``,
``pi0-ros-replay`` (through the node's parameters) and ``pi0-ros-export``. A combination the
parameters accept is one :func:`build_backend` can build (test_engine_registry.py builds every
one the CPU can; the CUDA-only ones skip there with the reason).

    from pi0_ros.engine.registry import EngineOptions, build_backend
    opts = EngineOptions(backend="tensorrt", precision="float32", device="cpu",
                         engine_dir="engines/", runtime="onnxruntime")
    backend = build_backend(model, opts)       # model already loaded in its precision

Backends (``BACKENDS``):

* ``eager``: the model's stages op by op; CPU or CUDA; float32, bfloat16, fp8 (FP8 linears,
  ``engine/fp8.py``: native ``torch._scaled_mm`` where supported, its emulation elsewhere).
* ``cuda_graph``: the same stages captured once and replayed; CUDA only; bfloat16 / float32 /
  fp8.
* ``tensorrt``: ONNX stages built into TensorRT engines (``engine/tensorrt``), loaded from an
  engine directory; CUDA with TensorRT for bfloat16 / fp8 / float32; the ``onnxruntime`` runtime
  runs the same ONNX files in float32 on CPU (the tested seam, no TensorRT needed).

Numeric formats (``PRECISIONS``) are one setting for every backend: ``float32``, ``bfloat16``,
``fp8`` (FP8 e4m3 Gemma linears in a bfloat16 model). ``auto`` resolves to bfloat16 on CUDA and
float32 on CPU; the backend ``auto`` to ``cuda_graph`` on CUDA and ``eager`` on CPU.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

BACKENDS = ("eager", "cuda_graph", "tensorrt")
PRECISIONS = ("float32", "bfloat16", "fp8")
RUNTIMES = ("auto", "tensorrt", "onnxruntime")  # how a "tensorrt" backend runs its engines
AUTO = "auto"


@dataclass(frozen=True)
class BackendInfo:
    """What one backend supports: ``formats[device type]`` -> numeric formats."""

    name: str
    formats: Mapping[str, tuple[str, ...]]
    summary: str

    def check(self, device: str, precision: str, runtime: str = AUTO) -> None:
        dev = torch.device(device).type
        if dev not in self.formats:
            raise ValueError(f"model.backend '{self.name}' does not run on {dev} (runs on "
                             f"{sorted(self.formats)})")
        allowed = self.formats[dev]
        if self.name == "tensorrt" and dev == "cuda" and runtime == "onnxruntime":
            allowed = ("float32",)
        if precision not in allowed:
            raise ValueError(f"model.dtype '{precision}' is not supported by backend "
                             f"'{self.name}' on {dev}; expected one of {list(allowed)}")


REGISTRY: dict[str, BackendInfo] = {
    "eager": BackendInfo("eager", {"cpu": PRECISIONS, "cuda": PRECISIONS},
                         "op by op (CPU tests, the reference)"),
    "cuda_graph": BackendInfo("cuda_graph", {"cuda": PRECISIONS},
                              "stages captured as CUDA graphs and replayed"),
    # On CPU only the onnxruntime runtime exists, and it runs float32 graphs.
    "tensorrt": BackendInfo("tensorrt", {"cpu": ("float32",), "cuda": PRECISIONS},
                            "TensorRT engines from an engine directory (onnxruntime on CPU)"),
}
assert tuple(REGISTRY) == BACKENDS

# TensorRT's names for the formats (engine/tensorrt BuildOptions.precision).
TRT_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "fp8": "fp8"}


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> cuda:0 when available else cpu; ``cuda`` -> the indexed current device."""
    if str(device) == AUTO:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        dev = torch.device("cuda", index)
    return dev


def resolve_names(backend: str, precision: str, device: torch.device) -> tuple[str, str]:
    """``auto`` backend / format for a device, checked against the registry."""
    cuda = device.type == "cuda"
    if backend == AUTO:
        backend = "cuda_graph" if cuda else "eager"
    if precision == AUTO:
        precision = "bfloat16" if cuda else "float32"
    if backend not in REGISTRY:
        raise ValueError(f"model.backend: unknown backend '{backend}'; expected one of "
                         f"{[AUTO, *BACKENDS]}")
    if precision not in PRECISIONS:
        raise ValueError(f"model.dtype: unknown numeric format '{precision}'; expected one of "
                         f"{[AUTO, *PRECISIONS]}")
    return backend, precision


def model_dtype(precision: str) -> str:
    """The dtype the model is loaded in for a format (fp8 quantizes a bfloat16 model, or a
    float32 one on CPU where the emulation computes in float32)."""
    return "float32" if precision == "float32" else "bfloat16"


@dataclass(frozen=True)
class EngineOptions:
    """Everything needed to build a backend (frozen; validated against the registry).

    ``engine_dir``: where ``tensorrt`` engines live (``pi0-ros-export --build`` writes them);
    ``build_if_missing``: build engines that are not there (minutes on a Thor) instead of
    refusing; ``runtime``: ``tensorrt`` (needs the TensorRT Python package), ``onnxruntime``
    (float32 on CPU; the tested seam) or ``auto`` (tensorrt on CUDA, onnxruntime on CPU).
    ``compile``: ``torch.compile`` the stages before graph capture (cuda_graph only).
    """

    backend: str = AUTO
    precision: str = AUTO
    device: str = AUTO
    engine_dir: str = ""
    build_if_missing: bool = False
    runtime: str = AUTO
    compile: bool = False
    # torch.compile mode with ``compile``; "default" compiles in a fraction of the time of the
    # max-autotune modes (GEMM autotuning), see docs/ENGINE.md "compile".
    compile_mode: str = "max-autotune-no-cudagraphs"
    checkpoint: str = ""  # the checkpoint directory (tensorrt engines are keyed by its hash)

    def resolved(self) -> EngineOptions:
        device = resolve_device(self.device)
        backend, precision = resolve_names(self.backend, self.precision, device)
        if self.runtime not in RUNTIMES:
            raise ValueError(f"tensorrt.runtime: unknown runtime '{self.runtime}'; expected one "
                             f"of {list(RUNTIMES)}")
        runtime = self.runtime
        if runtime == AUTO:
            runtime = "tensorrt" if device.type == "cuda" else "onnxruntime"
        if backend == "tensorrt" and device.type == "cpu" and runtime != "onnxruntime":
            raise ValueError("tensorrt.runtime 'tensorrt' needs a CUDA device; on CPU the "
                             "engines run through runtime 'onnxruntime'")
        REGISTRY[backend].check(str(device), precision, runtime)
        if self.compile and backend != "cuda_graph":
            raise ValueError(f"model.compile is for backend 'cuda_graph', not '{backend}'")
        return dataclasses.replace(self, backend=backend, precision=precision,
                                   device=str(device), runtime=runtime)


def supported() -> list[tuple[str, str, str]]:
    """Every (backend, device type, format) the registry accepts."""
    return [(name, dev, fmt) for name, info in REGISTRY.items()
            for dev, fmts in info.formats.items() for fmt in fmts]


def prepare_model(model, precision: str, **fp8_options):
    """Put a loaded model into a format: ``set_precision`` and, for fp8, the FP8 linears
    (``fp8_options`` go to ``fp8.quantize_fp8``: act_scale, emulate, input_amax, ...)."""
    model.set_precision(model_dtype(precision))
    if precision == "fp8":
        from .fp8 import quantize_fp8

        quantize_fp8(model, **fp8_options)
    return model


def build_backend(model, options: EngineOptions):
    """The backend named by ``options`` (resolved), around a model already in its format."""
    opts = options.resolved()
    if opts.backend == "eager":
        from .eager import EagerBackend

        return EagerBackend(model, opts.device)
    if opts.backend == "cuda_graph":
        from .cuda_graph import CudaGraphBackend

        return CudaGraphBackend(model, opts.device, compile=opts.compile,
                                compile_mode=opts.compile_mode)
    from .tensorrt import BuildOptions, OnnxRuntimeRuntime, TensorRTBackend, TensorRTRuntime

    device = torch.device(opts.device)
    runtime = (OnnxRuntimeRuntime() if opts.runtime == "onnxruntime"
               else TensorRTRuntime(device))
    if not opts.engine_dir:
        raise ValueError("tensorrt.engine_dir: no engine directory given (build one with "
                         "pi0-ros-export --build --engine-dir DIR)")
    if not opts.build_if_missing and not os.path.isdir(opts.engine_dir):
        raise ValueError(f"tensorrt.engine_dir: '{opts.engine_dir}' does not exist (build "
                         "engines with pi0-ros-export, or set tensorrt.build_if_missing)")
    return TensorRTBackend(
        model, device, options=BuildOptions(precision=TRT_PRECISION[opts.precision]),
        runtime=runtime, cache_dir=opts.engine_dir, checkpoint=opts.checkpoint or None,
        allow_build=opts.build_if_missing)
