"""One engine per stage configuration: cache lookup, else ONNX export (+ FP8 Q/DQ) + build +
inspect + store (``EngineBuilder.engine``), and the report rows of a build (``build_report``,
what ``pi0-ros-export`` prints and saves).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Sequence

from ...model import Pi0Model
from ..base import ModelInputs, dummy_inputs
from .cache import (CachedEngine, EngineCache, EngineKey, checkpoint_hash, format_diff,
                    geometry_hash, model_hash)
from .errors import EngineBuildError, EngineNotFoundError, StaleEngineError
from .export import StageExport, export_stage
from .layers import summarize_layers
from .qdq import calibrate_fp8, fp8_qdq_nodes, insert_fp8_qdq
from .runtime import Progress, TrtRuntime
from .settings import BuilderSettings, BuildOptions, builder_settings
from .stages import stage_id, stage_io, stage_shapes

log = logging.getLogger(__name__)


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
            "TensorRT builds FP8 only from explicitly quantized graphs; quantize it with "
            "qdq.insert_fp8_qdq (what pi0-ros-export --precision fp8 does) or use bf16.")


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
                 options: BuildOptions | None = None, *, cache: EngineCache | None = None,
                 checkpoint: str | None = None,
                 work_dir: str | os.PathLike | None = None, allow_build: bool = True,
                 progress: Progress | None = None,
                 calibration: Sequence[ModelInputs] | None = None):
        self.model = model
        self.runtime = runtime
        self.options = options or BuildOptions()
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
            calibration=self.calibration_id if settings.precision == "fp8" else "",
            time_grid=getattr(self.model, "time_grid", "openpi") if stage == "denoise" else "")

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
                                       f"{format_diff(diff)}; rebuild it (pi0-ros-export "
                                       "--build) or allow building")
            raise EngineNotFoundError(f"{label}: no engine in {self.cache.root} and building is "
                                      "disabled")
        for path, diff in stale:
            self.progress(f"{label}: ignoring stale {path.name} ({format_diff(diff)})")
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
        count = insert_fp8_qdq(export.path, path, self._export_model(dtype), amax)
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



def build_report(records: Iterable[BuildRecord]) -> list[dict[str, Any]]:
    """JSON-able rows of a build (``pi0-ros-export`` prints and saves them)."""
    return [{"stage": r.stage, "prompt_len": r.prompt_len, "engine": str(r.path),
             "size_bytes": r.size, "built": r.built, "build_s": round(r.build_s, 2),
             "export_s": round(r.export_s, 2), "precision": r.key.precision,
             "strongly_typed": r.key.strongly_typed, "opt_level": r.key.opt_level,
             "batch": [r.key.min_batch, r.key.opt_batch, r.key.max_batch],
             "tensorrt": r.key.tensorrt, "gpu": r.key.gpu, "layers": r.layers,
             "warnings": list(r.warnings)} for r in records]
