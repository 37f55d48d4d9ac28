"""CUDA graph backend: vision, prefix and the whole denoising loop each replayed as one graph.

Modelled on SGLang's ``cuda_graph_runner.py`` / vLLM's ``compilation/cuda_graph.py``:

* static buffers allocated once at max batch (``base.StaticBackend``); a graph per
  (stage, pipeline slot, prompt bucket, batch size), batch sizes from ``EngineSpec.batch_sizes``
  (default: max batch only; smaller requests are padded and sliced back);
* each stage callable is warmed up (cuBLAS handles, lazy modules, the caching allocator,
  ``torch.compile`` autotuning) and captured on the stream that will replay it (prefix stream:
  vision + prefix; denoise stream: denoise; one stream without pipelining), into a memory pool
  shared by every graph that runs on the same stream, largest batch first so smaller graphs reuse
  its blocks. Capturing on the replay stream matters: the cuBLAS workspace address baked into a
  graph is the capture stream's, so graphs that replay concurrently must not share a capture
  stream (``_capture_stream``);
* replay: ``copy_`` host inputs into the static buffers, ``replay()`` the three graphs, copy the
  static actions out (``base``). Stage outputs are static tensors allocated outside the pools, so
  graph order can never clobber a live output.

Inside a captured region there is no host sync (no ``.item()`` / ``.cpu()``, Python-int trip
count), the expert's attention reads the prefix KV buffer in place, and the pi0.5 adaRMS
modulation comes precomputed from ``model.time_conditioning`` (prepared once per step count).
With ``EngineSpec.rtc`` the denoise graph holds the whole guided loop, backward included
(``model/rtc.py``: static prefix buffers, no syncs; one autograd-safe K/V copy per graph), and
the stand-in replays it equal to eager; not yet captured on a real GPU.
``runtime`` (default ``torch.cuda``) is what creates streams, events and graphs; the tests pass
``cuda_standin.CudaStandin`` to run this backend on CPU, with capture as record-and-replay and a
happens-before race detector over streams, events and the cuBLAS workspaces (docs/ENGINE.md).

Launch overhead: the eager model is hundreds of small kernels per denoising step; a graph removes
the CPU launch cost but not the per-kernel GPU gaps. ``compile=True`` wraps every stage in
``torch.compile(mode=compile_mode)`` before capture so Inductor fuses the
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
                 compile_mode: str = "default", runtime: Any = None):
        super().__init__(model, device, runtime=runtime)
        if not self._cuda:
            raise ValueError(f"the CUDA graph backend needs a CUDA model, got {self.device}")
        self.warmup = warmup
        self.compile = compile
        self.compile_mode = compile_mode
        self._graphs: dict[tuple[str, int, int, int], Any] = {}
        self._pools: dict[str, Any] = {}
        self.capture_s = 0.0

    def _capture_stream(self, stage: str) -> Any:
        """The stream a stage's graphs are captured on: the one that replays them.

        PyTorch keys the cuBLAS workspace by (handle, current stream) and a capture bakes that
        address into the graph, so graphs captured on one stream share one workspace. With
        pipelining the prefix graphs (prefix stream) replay while the denoise graphs (denoise
        stream) run: captured on a common stream, their split-K GEMMs would share a workspace
        concurrently. Captured on their own replay streams, each pair that can overlap has its
        own workspace, and graphs that share one are serialized by their stream.
        """
        return self._streams["denoise" if stage == "denoise" else "prefix"]

    def _after_prepare(self) -> None:
        t0 = time.perf_counter()
        rt, spec = self._rt, self.spec
        pool = rt.graph_pool_handle()
        # Graphs that may run concurrently (pipelining: prefix of N+1 while N denoises) must not
        # share a pool; graphs serialized on one stream may.
        self._pools = {"prefix": pool,
                       "denoise": rt.graph_pool_handle() if spec.pipeline else pool}
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
        rt.synchronize(self.device)
        # Warm up every stage in pipeline order (vision -> prefix -> denoise writes real values
        # into the static buffers the next stage reads), each on its replay stream (cuBLAS
        # handles / workspaces are per stream), before any capture.
        # Each stage reads what the one before wrote, possibly on the other stream: chain them.
        previous = None
        for _ in range(self.warmup):
            for key in keys:
                stream = self._capture_stream(key[0])
                if previous is not None and previous is not stream:
                    stream.wait_stream(previous)
                with rt.stream(stream):
                    fns[key]()
                previous = stream
        rt.synchronize(self.device)
        for key in keys:
            pool_name = "denoise" if key[0] == "denoise" else "prefix"
            graph = rt.CUDAGraph()
            with rt.graph(graph, pool=self._pools[pool_name],
                          stream=self._capture_stream(key[0]),
                          capture_error_mode="thread_local"):
                fns[key]()
            self._graphs[key] = graph
        rt.synchronize(self.device)
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
