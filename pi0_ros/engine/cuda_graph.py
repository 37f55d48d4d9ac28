"""CUDA graph backend: vision, prefix and the whole denoising loop each replayed as one graph.

Modelled on SGLang's ``cuda_graph_runner.py`` / vLLM's ``compilation/cuda_graph.py``:

* static buffers allocated once at max batch (``base.StaticBackend``); a graph per
  (stage, pipeline slot, prompt bucket, batch size), batch sizes from ``EngineSpec.batch_sizes``
  (default: max batch only; smaller requests are padded and sliced back);
* each stage callable is warmed up on a side stream (cuBLAS handles, lazy modules, the caching
  allocator, ``torch.compile`` autotuning), then captured on that stream into a memory pool shared
  by every graph that runs on the same stream, largest batch first so smaller graphs reuse its
  blocks;
* replay: ``copy_`` host inputs into the static buffers, ``replay()`` the three graphs, copy the
  static actions out (``base``). Stage outputs are static tensors allocated outside the pools, so
  graph order can never clobber a live output.

Inside a captured region there is no host sync (no ``.item()`` / ``.cpu()``, Python-int trip
count), the expert's attention reads the prefix KV buffer in place, and the pi0.5 adaRMS
modulation comes precomputed from ``model.time_conditioning`` (prepared once per step count).

Launch overhead: the eager model is hundreds of small kernels per denoising step; a graph removes
the CPU launch cost but not the per-kernel GPU gaps. ``compile=True`` wraps every stage in
``torch.compile(mode="max-autotune-no-cudagraphs")`` before capture so Inductor fuses the
elementwise chains (RMSNorm, RoPE, gating) - expected to be needed for the 10 ms target
(unmeasured: no GPU in the session that wrote this; see docs/ENGINE.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from ..model import Pi0Model
from .base import STAGES, StaticBackend

log = logging.getLogger(__name__)


class CudaGraphBackend(StaticBackend):
    name = "cuda_graph"

    def __init__(self, model: Pi0Model, device: str | torch.device | None = None, *,
                 warmup: int = 2, compile: bool = False,
                 compile_mode: str = "max-autotune-no-cudagraphs"):
        super().__init__(model, device)
        if self.device.type != "cuda":
            raise ValueError(f"the CUDA graph backend needs a CUDA model, got {self.device}")
        self.warmup = warmup
        self.compile = compile
        self.compile_mode = compile_mode
        self._graphs: dict[tuple[str, int, int, int], torch.cuda.CUDAGraph] = {}
        self._pools: dict[str, Any] = {}
        self.capture_s = 0.0
        self._capture_stream: torch.cuda.Stream | None = None

    def _after_prepare(self) -> None:
        t0 = time.perf_counter()
        spec = self.spec
        pool = torch.cuda.graph_pool_handle()
        # Graphs that may run concurrently (pipelining: prefix of N+1 while N denoises) must not
        # share a pool; graphs serialized on one stream may.
        self._pools = {"prefix": pool,
                       "denoise": torch.cuda.graph_pool_handle() if spec.pipeline else pool}
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(self.device)
        capture_stream = self._capture_stream
        # Largest batch first (SGLang): smaller graphs then fit in blocks the larger one freed.
        keys = sorted(self.stage_keys(),
                      key=lambda k: (-k[3], k[1], k[0] != "vision", -k[2], STAGES.index(k[0])))
        fns: dict[tuple[str, int, int, int], Callable[[], None]] = {}
        if self.compile:
            # Every key is the same code object with other closure cells: one dynamo cache entry
            # each. Past the recompile limit dynamo would silently fall back to eager.
            import torch._dynamo.config as dynamo_config

            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, len(keys) + 8)
            dynamo_config.accumulated_recompile_limit = max(
                dynamo_config.accumulated_recompile_limit, 4 * len(keys) + 64)
        for key in keys:
            fn = self._stage_fn(*key)
            if self.compile:
                fn = torch.compile(fn, mode=self.compile_mode, fullgraph=True, dynamic=False)
            fns[key] = fn
        torch.cuda.synchronize(self.device)
        # Warm up every stage in pipeline order (vision -> prefix -> denoise writes real values
        # into the static buffers the next stage reads) before any capture.
        with torch.cuda.stream(capture_stream):
            for _ in range(self.warmup):
                for key in keys:
                    fns[key]()
        capture_stream.synchronize()
        for key in keys:
            pool_name = "denoise" if key[0] == "denoise" else "prefix"
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pools[pool_name], stream=capture_stream,
                                  capture_error_mode="thread_local"):
                fns[key]()
            self._graphs[key] = graph
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0
        log.info("captured %d CUDA graphs in %.1f s (compile=%s)", len(self._graphs),
                 self.capture_s, self.compile)

    def _release_stages(self) -> None:
        self._graphs = {}
        self._pools = {}

    def _run_stage(self, stage: str, slot: int, bucket: int, batch: int) -> None:
        self._graphs[(stage, slot, bucket, batch)].replay()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)
