"""TensorRT backend: the inference stages exported to ONNX, built into engines, served behind the
same ``Backend`` interface as eager and CUDA graphs.

Modules, from the stage contract to the backend (everything above the runtime seam is pure or
runs on CPU; the tests cover it without TensorRT):

* ``stages``    the stage contract: names, shapes, dtypes, batch axes, file names
                (``stage_io``, ``stage_shapes``, ``stage_id``).
* ``modules``   each stage as an ``nn.Module`` around the model's own submodules (what is traced).
* ``export``    ONNX export (``export_stage``, ``export_all``), the eager reference of each stage
                (``eager_stage``, ``example_feeds``), reading a graph's I/O (``onnx_io``).
* ``check``     onnxruntime vs eager (``check_stages``, ``onnx_sample_actions``).
* ``qdq``       FP8 for TensorRT: calibration, Q/DQ insertion (``insert_fp8_qdq``) and its torch
                emulation, on the quantization defined in ``engine/fp8.py``.
* ``settings``  ``BuildOptions`` + ``DeviceInfo`` -> ``BuilderSettings`` (pure).
* ``layers``    float32 islands (``fp32_island``) and the built engine's layer precisions
                (``summarize_layers``).
* ``cache``     ``EngineKey`` / ``EngineCache``: engines on disk, stale ones refused by field.
* ``runtime``   the seam: ``TrtRuntime``; ``TensorRTRuntime`` (TensorRT Python API) and
                ``OnnxRuntimeRuntime`` (the same ONNX files on CPU, float32).
* ``builder``   ``EngineBuilder``: cache lookup, else export + build + inspect + store.
* ``backend``   ``TensorRTBackend``: a ``StaticBackend`` whose stages run engines.
* ``errors``    the error classes and ``require_tensorrt``.

The names below are the package's public API (``pi0_ros.engine.registry`` builds the backend
from ``BuildOptions``, ``OnnxRuntimeRuntime``, ``TensorRTBackend`` and ``TensorRTRuntime``).
See docs/TENSORRT.md for what was and was not verified.
"""

from __future__ import annotations

from .backend import TensorRTBackend
from .builder import BuildRecord, EngineBuilder, build_report, check_onnx_for_precision
from .cache import (DEFAULT_CACHE_DIR, CachedEngine, EngineCache, EngineKey, checkpoint_hash,
                    geometry_hash, model_hash)
from .check import check_stages, max_abs_diff, onnx_sample_actions, ort_session, run_session
from .errors import (EngineBuildError, EngineNotFoundError, StaleEngineError, TensorRTError,
                     TensorRTUnavailable, require_tensorrt)
from .export import (StageExport, TensorDesc, eager_stage, example_feeds, export_all,
                     export_stage, file_size, onnx_io)
from .layers import LayerReport, fp32_island, summarize_layers
from .modules import AttentionCore, stage_module
from .qdq import FP8_OPSET, calibrate_fp8, fp8_emulation, fp8_qdq_nodes, insert_fp8_qdq
from .runtime import (OnnxRuntimeRuntime, TensorRTRuntime, TrtEngine, TrtRuntime,
                      pin_fp32_islands)
from .settings import (DEFAULT_OPT_LEVEL, PRECISIONS, THOR_MAX_OPT_LEVEL, BuilderSettings,
                       BuildOptions, DeviceInfo, Profile, builder_settings, cuda_device_info)
from .stages import (DEFAULT_OPSET, EXPORT_FORMAT, STAGES, UNBATCHED, batch_axis, stage_dtypes,
                     stage_id, stage_io, stage_shapes, step_conditioning)

__all__ = [
    "AttentionCore", "BuildOptions", "BuildRecord", "BuilderSettings", "CachedEngine",
    "DEFAULT_CACHE_DIR", "DEFAULT_OPSET", "DEFAULT_OPT_LEVEL", "DeviceInfo", "EXPORT_FORMAT",
    "EngineBuildError", "EngineBuilder", "EngineCache", "EngineKey", "EngineNotFoundError",
    "FP8_OPSET", "LayerReport", "OnnxRuntimeRuntime", "PRECISIONS", "Profile", "STAGES",
    "StageExport", "StaleEngineError", "THOR_MAX_OPT_LEVEL", "TensorDesc", "TensorRTBackend",
    "TensorRTError", "TensorRTRuntime", "TensorRTUnavailable", "TrtEngine", "TrtRuntime",
    "UNBATCHED", "batch_axis", "build_report", "builder_settings", "calibrate_fp8",
    "check_onnx_for_precision", "check_stages", "checkpoint_hash", "cuda_device_info",
    "eager_stage", "example_feeds", "export_all", "export_stage", "file_size", "fp32_island",
    "fp8_emulation", "fp8_qdq_nodes", "geometry_hash", "insert_fp8_qdq", "max_abs_diff",
    "model_hash", "onnx_io", "onnx_sample_actions", "ort_session", "pin_fp32_islands",
    "require_tensorrt", "run_session", "stage_dtypes", "stage_id", "stage_io", "stage_module",
    "stage_shapes", "step_conditioning", "summarize_layers",
]
