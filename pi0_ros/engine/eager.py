"""Eager backend: the stage functions run op by op (CPU or CUDA).

The reference the CUDA graph backend is checked against, and the CPU path. It shares every
static buffer, the bucket / padding logic and the timing with the graph backend (``base.py``),
so the only difference between the two is "launch the ops" vs "replay the recorded ops".
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model import Pi0Model
from .base import StaticBackend


class EagerBackend(StaticBackend):
    name = "eager"

    def __init__(self, model: Pi0Model, device: str | torch.device | None = None, *,
                 warmup: int = 1, runtime=None):
        super().__init__(model, device, runtime=runtime)
        self.warmup = warmup
        self._fns: dict[tuple[str, int, int, int], Callable[[], None]] = {}

    def _after_prepare(self) -> None:
        self._fns = {key: self._stage_fn(*key) for key in self.stage_keys()}
        # One request at max batch / largest bucket initializes cuBLAS and the allocator.
        for _ in range(self.warmup):
            self.infer(self.warmup_inputs())

    def _release_stages(self) -> None:
        self._fns = {}

    def _run_stage(self, stage: str, slot: int, bucket: int, batch: int) -> None:
        self._fns[(stage, slot, bucket, batch)]()
