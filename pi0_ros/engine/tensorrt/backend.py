"""``TensorRTBackend``: the ``StaticBackend`` whose vision, prefix and denoise stages run engines
on its static buffers (the same interface, request path and pipeline slots as eager and CUDA
graphs; only the stage launches differ).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from ...model import Pi0Model
from ..base import ModelInputs, StaticBackend
from ..registry import resolve_device
from .builder import BuildRecord, EngineBuilder
from .cache import DEFAULT_CACHE_DIR, EngineCache
from .runtime import Progress, TensorRTRuntime, TrtEngine, TrtRuntime
from .settings import BuildOptions
from .stages import stage_dtypes, stage_shapes, step_conditioning

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
    (the Euler update in torch) instead of the unrolled loop engine. ``device`` default: the
    model's device with a given ``runtime``, else the current CUDA device; ``"cuda"`` resolves
    to the indexed current device."""

    name = "tensorrt"

    def __init__(self, model: Pi0Model, device: str | torch.device | None = None, *,
                 options: BuildOptions | None = None, runtime: TrtRuntime | None = None,
                 cache_dir: str | os.PathLike | None = None, checkpoint: str | None = None,
                 allow_build: bool = True, denoise: str = "loop",
                 progress: Progress | None = None,
                 calibration: Sequence[ModelInputs] | None = None):
        if denoise not in ("loop", "step"):
            raise ValueError(f"denoise must be 'loop' or 'step', got {denoise!r}")
        if device is None:
            device = model.device if runtime is not None else "cuda"
        # "cuda" -> "cuda:<current>": the base class pins the worker thread to device.index.
        target = resolve_device(device)
        if runtime is None:
            runtime = TensorRTRuntime(target)
        # The buffers live on ``target``, wherever the model is: its CUDA runtime, not the
        # model's, drives the streams / events / staging of the base class.
        super().__init__(model, model.device,
                         runtime=torch.cuda if target.type == "cuda" else None)
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
