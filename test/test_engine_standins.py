"""CPU proofs of the GPU engine paths, through the CUDA runtime stand-in (engine/cuda_standin.py).

``CudaGraphBackend`` and the CUDA branches of ``base.py`` (streams, events, pinned staging,
capture, replay) run on CPU with ``runtime=CudaStandin()``. Capture records the stage's aten ops
and replay re-runs them into the captured tensors, so replay == eager *exactly* (same CPU
kernels) whenever a stage is graph-safe; the stand-in's happens-before detector raises on any
unordered access (buffers, the per-stream cuBLAS workspace a graph bakes in, graph pools).
Each property has a test that breaks it on purpose and expects the failure.
"""

from __future__ import annotations

import pytest
import torch

from pi0_ros.engine.base import EngineSpec, dummy_inputs, select_rows
from pi0_ros.engine.cuda_graph import CudaGraphBackend
from pi0_ros.engine.cuda_standin import (
    CudaStandin,
    Event,
    HostSyncError,
    RaceError,
    Stream,
    no_host_sync,
)
from pi0_ros.engine.eager import EagerBackend
from pi0_ros.model import Pi0Model, tiny_config

STEPS = 3
WARMUP = 1  # the stand-in replays are exact; one warm-up pass keeps prepare short on CPU


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module", params=[True, False], ids=["pi05", "pi0"])
def model(request) -> Pi0Model:
    torch.manual_seed(0)
    return Pi0Model(tiny_config(pi05=request.param, num_cameras=2)).eval()


def graph_backend(model, spec, rt=None, cls=CudaGraphBackend):
    rt = rt or CudaStandin()
    backend = cls(model, runtime=rt, warmup=WARMUP)
    backend.prepare(spec)
    return backend, rt


def eager_backend(model, spec):
    backend = EagerBackend(model, warmup=0)
    backend.prepare(spec)
    return backend


def pipelined_run(backend, xs):
    """Slot 0 and slot 1 alternate; each begin_prefix overlaps the previous denoise."""
    results = []
    t = backend.begin_prefix(xs[0])
    backend.begin_denoise(t)
    for x in xs[1:]:
        nxt = backend.begin_prefix(x)  # vision + prefix of N+1 race the denoise of N
        results.append(backend.collect(t))
        backend.begin_denoise(nxt)
        t = nxt
    results.append(backend.collect(t))
    return results


# -- replay == eager, exactly ---------------------------------------------------------------------
def test_replay_equals_eager_every_bucket_and_batch(model):
    cfg = model.config
    buckets = (8, 24, cfg.max_token_len)
    spec = EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=3, batch_sizes=(1, 3),
                      prompt_buckets=buckets)
    rt = CudaStandin()
    with rt.tracking():  # host-side accesses are checked too
        graph, _ = graph_backend(model, spec, rt)
        eager = eager_backend(model, spec)
        assert graph.num_graphs == 2 * (1 + 2 * len(buckets))
        seen = set()
        # New inputs at every (bucket, batch): 2 rows run padded in the 3-row graphs.
        for i, (rows, ntok) in enumerate([(1, 3), (2, 8), (3, 20), (1, 24), (2, 30),
                                          (3, cfg.max_token_len), (1, 40)]):
            x = dummy_inputs(cfg, rows, 2, ntok, seed=100 + i)
            g, e = graph.infer(x), eager.infer(x)
            assert (g.bucket, g.batch) == (e.bucket, e.batch)
            seen.add((g.bucket, g.batch))
            assert torch.equal(g.actions, e.actions), (rows, ntok)
            assert torch.isfinite(g.actions).all()
        assert {b for b, _ in seen} == set(buckets) and {n for _, n in seen} == {1, 3}
        # Device-drawn noise: the same seeded generator on both sides.
        x = dummy_inputs(cfg, 2, 2, 12, seed=7, with_noise=False)
        assert torch.equal(graph.infer(x).actions, eager.infer(x).actions)
        # A padded row never leaks into the real ones.
        x = dummy_inputs(cfg, 3, 2, 12, seed=8)
        assert torch.equal(graph.infer(select_rows(x, slice(0, 2))).actions,
                           graph.infer(x).actions[:2])
    assert rt.replays >= 3 * 8


def test_pipelined_slots_and_racing_replay_equal_serial_eager(model):
    cfg = model.config
    spec = EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1, pipeline=True,
                      prompt_buckets=(16, cfg.max_token_len))
    xs = [dummy_inputs(cfg, 1, 2, 4 + 9 * i, seed=20 + i) for i in range(5)]
    eager = eager_backend(model, EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1,
                                            prompt_buckets=spec.prompt_buckets))
    refs = [eager.infer(x).actions for x in xs]
    rt = CudaStandin()
    with rt.tracking():
        graph, _ = graph_backend(model, spec, rt)
        results = pipelined_run(graph, xs)
        # Re-prepare (release + capture again) keeps the engine streams and stays exact.
        graph.prepare(spec)
        results2 = pipelined_run(graph, xs[::-1])
    assert [r.bucket for r in results] == [16, 16, cfg.max_token_len, cfg.max_token_len,
                                           cfg.max_token_len]
    for r, ref in zip(results + results2[::-1], refs + refs, strict=True):
        assert torch.equal(r.actions, ref)
        assert set(r.timing) == {"upload", "vision", "prefix", "denoise", "download", "total"}


def test_eager_backend_on_the_cuda_branches(model):
    """The eager backend through the stream / event / pinned-staging code of base.py."""
    cfg = model.config
    spec = EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=2, pipeline=True)
    xs = [dummy_inputs(cfg, 1 + i % 2, 2, 6 + 5 * i, seed=40 + i) for i in range(3)]
    cpu = eager_backend(model, spec)
    refs = [cpu.infer(x).actions for x in xs]
    rt = CudaStandin()
    with rt.tracking():
        streams = EagerBackend(model, runtime=rt, warmup=1)
        streams.prepare(spec)
        results = pipelined_run(streams, xs)
    for r, ref in zip(results, refs, strict=True):
        assert torch.equal(r.actions, ref)


# -- the detector fails the broken variants -------------------------------------------------------
class SharedCaptureStream(CudaGraphBackend):
    """The defect of issue 12: every graph captured on one side stream."""

    def _capture_stream(self, stage):
        if not hasattr(self, "_shared"):
            self._shared = self._rt.Stream(self.device)
        return self._shared


def test_shared_capture_stream_races_on_the_cublas_workspace(model):
    cfg = model.config
    spec = EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1, pipeline=True,
                      prompt_buckets=(cfg.max_token_len,))
    xs = [dummy_inputs(cfg, 1, 2, 5, seed=i) for i in range(3)]
    graph, _ = graph_backend(model, spec, cls=SharedCaptureStream)
    with pytest.raises(RaceError, match="cuBLAS workspace"):
        pipelined_run(graph, xs)
    # Serial use of the same graphs is fine: one stream orders every replay.
    serial, _ = graph_backend(model, EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1,
                                                prompt_buckets=(cfg.max_token_len,)),
                              cls=SharedCaptureStream)
    for x in xs:
        serial.infer(x)


def test_missing_wait_event_is_a_race(model, monkeypatch):
    cfg = model.config
    spec = EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1, pipeline=True,
                      prompt_buckets=(cfg.max_token_len,))
    graph, _ = graph_backend(model, spec)
    monkeypatch.setattr(Stream, "wait_event", lambda self, event: None)
    with pytest.raises(RaceError, match="read-after-write"):
        graph.infer(dummy_inputs(cfg, 1, 2, 5, seed=1))


def test_reading_host_actions_before_the_event_is_a_race(model, monkeypatch):
    cfg = model.config
    spec = EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1,
                      prompt_buckets=(cfg.max_token_len,))
    rt = CudaStandin()
    with rt.tracking():
        graph, _ = graph_backend(model, spec, rt)
        monkeypatch.setattr(Event, "synchronize", lambda self: None)
        with pytest.raises(RaceError, match="on host"):
            graph.infer(dummy_inputs(cfg, 1, 2, 5, seed=1))


def test_capture_outputs_are_uninitialized_until_replay(model):
    """Capture records, it does not run: a backend that read its outputs after capture without
    a replay would see NaN, as it would see garbage on a GPU."""
    cfg = model.config
    rt = CudaStandin()
    stream, g = rt.Stream(), rt.CUDAGraph()
    x = torch.randn(1, 2, cfg.expert.width)
    with pytest.raises(RuntimeError, match="never captured"):
        g.replay()
    with rt.graph(g, stream=stream):
        y = model.expert.layers[0].mlp(x)
    assert torch.isnan(y).all()
    with rt.stream(stream):
        g.replay()
    assert torch.equal(y, model.expert.layers[0].mlp(x))
    x.mul_(2)  # a replay reads the static input's current value
    with rt.stream(stream):
        g.replay()
    assert torch.equal(y, model.expert.layers[0].mlp(x))


# -- no host sync in any captured stage -----------------------------------------------------------
def test_no_stage_calls_a_host_sync(model):
    cfg = model.config
    spec = EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=2, batch_sizes=(1, 2),
                      prompt_buckets=(16, cfg.max_token_len))
    eager = eager_backend(model, spec)
    eager.infer(dummy_inputs(cfg, 2, 2, 10, seed=3))
    for key in eager.stage_keys():
        with no_host_sync(f"stage {key}") as check:
            eager._stage_fn(*key)()
        assert check.ops > 0


@pytest.mark.parametrize("sync", ["item", "local_scalar_dense", "nonzero", "cpu", "bool"])
def test_a_host_sync_in_a_stage_is_caught(model, monkeypatch, sync):
    cfg = model.config
    spec = EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1,
                      prompt_buckets=(cfg.max_token_len,))
    original = Pi0Model.denoise_step
    calls = {
        "item": lambda x: x.abs().amax().item(),
        "local_scalar_dense": lambda x: torch.ops.aten._local_scalar_dense(x.sum()),
        "nonzero": lambda x: torch.nonzero(x),
        "cpu": lambda x: x.cpu(),
        "bool": lambda x: bool((x > 1e9).any()),
    }

    def denoise_step(self, cache, state, x_t, conds, step):
        calls[sync](x_t)
        return original(self, cache, state, x_t, conds, step)

    monkeypatch.setattr(Pi0Model, "denoise_step", denoise_step)
    eager = eager_backend(model, spec)
    with pytest.raises(HostSyncError, match="host sync"):
        with no_host_sync():
            eager._stage_fn("denoise", 0, cfg.max_token_len, 1)()
    # The stand-in capture refuses it too, as cudaStreamCapture would.
    with pytest.raises(HostSyncError, match="capture"):
        graph_backend(model, spec)


@pytest.mark.parametrize("pipeline", [False, True], ids=["serial", "pipelined"])
def test_worker_thread_owns_the_standin_graph_backend(model, pipeline):
    """The GPU thread (worker.py) preparing, capturing and replaying, serial and pipelined."""
    import threading

    from pi0_ros.engine.worker import InferenceWorker

    cfg = model.config
    spec = EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1, pipeline=pipeline,
                      prompt_buckets=(cfg.max_token_len,))
    xs = [dummy_inputs(cfg, 1, 2, 5 + 4 * i, seed=70 + i) for i in range(3)]
    eager = eager_backend(model, EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1,
                                            prompt_buckets=(cfg.max_token_len,)))
    refs = [eager.infer(x).actions for x in xs]
    graph = CudaGraphBackend(model, runtime=CudaStandin(), warmup=WARMUP)
    results, errors, done = [], [], threading.Semaphore(0)
    w = InferenceWorker(graph, lambda r: (results.append(r), done.release()),
                        lambda e, i: (errors.append(e), done.release()), pipeline=pipeline,
                        setup=lambda: graph.prepare(spec), teardown=graph.release)
    w.start()
    for x in xs:
        w.submit(x)
        assert done.acquire(timeout=120)
    w.stop()
    assert not errors and not graph.prepared
    for r, ref in zip(results, refs, strict=True):
        assert torch.equal(r.result.actions, ref)
