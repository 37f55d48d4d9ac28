"""pi0_ros.engine: backends behind one interface, FP8 layers, the roofline, the GPU thread.

    from pi0_ros.engine import EngineSpec, ModelInputs, make_backend, InferenceWorker
    backend = make_backend("cuda_graph", model)          # or "eager"
    backend.prepare(EngineSpec(num_cameras=2, num_steps=10, max_batch=1))
    result = backend.infer(ModelInputs(...))             # .actions (B, H, A) host, .timing ms

See docs/ENGINE.md.
"""

from __future__ import annotations

from typing import Any

from .base import (Backend, EngineSpec, InferResult, ModelInputs, StaticBackend,
                   default_buckets, dummy_inputs)
from .eager import EagerBackend
from .worker import InferenceWorker, WorkerError, WorkerResult

BACKENDS = ("eager", "cuda_graph")


def make_backend(name: str, model, device=None, **options: Any) -> Backend:
    """``"eager"`` (CPU or CUDA) or ``"cuda_graph"`` (CUDA; options: warmup, compile)."""
    if name == "eager":
        return EagerBackend(model, device, **options)
    if name == "cuda_graph":
        from .cuda_graph import CudaGraphBackend

        return CudaGraphBackend(model, device, **options)
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


__all__ = [
    "BACKENDS", "Backend", "EagerBackend", "EngineSpec", "InferResult", "InferenceWorker",
    "ModelInputs", "StaticBackend", "WorkerError", "WorkerResult", "default_buckets",
    "dummy_inputs", "make_backend",
]
