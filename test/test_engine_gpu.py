"""GPU engine: CUDA graph == eager == float32 reference, every batch size, re-prepare, FP8,
graphs captured on their replay streams, fused attention, static FP8, released weights.

Run on a CUDA machine (docs/ENGINE.md has the full command list; ``python -m
pi0_ros.tools.gpu_check`` runs this file with ``-m "not slow"`` as its second step):

    pytest -q test/test_engine_gpu.py

What a CPU can prove about the same paths runs in CI: test_engine_standins.py (CUDA stand-in),
test_engine_fp8_native.py, test_engine_compile.py, test_model_sdpa.py.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the CUDA graph / FP8 engine tests need a GPU",
                allow_module_level=True)

from pi0_ros.engine.base import EngineSpec, ModelInputs, dummy_inputs, select_rows  # noqa: E402
from pi0_ros.engine.cuda_graph import CudaGraphBackend  # noqa: E402
from pi0_ros.engine.eager import EagerBackend  # noqa: E402
from pi0_ros.engine.fp8 import Fp8Linear, compare_precisions, fp8_supported, quantize_fp8  # noqa: E402
from pi0_ros.engine.worker import InferenceWorker  # noqa: E402
from pi0_ros.model import Pi0Config, Pi0Model, tiny_config  # noqa: E402

DEV = torch.device("cuda")
STEPS = 4
# Named tolerances (actions are O(1)).
F32_CPU_ATOL = 1e-4  # float32 CUDA (TF32 off) vs float32 CPU reference
GRAPH_EAGER_F32_ATOL = 1e-5  # same kernels replayed; 0 in practice
GRAPH_EAGER_BF16_ATOL = 1e-2
BF16_VS_F32_MAX_REL = 0.05  # of the float32 actions' RMS (tiny random model)
FP8_VS_F32_MAX_REL = 0.15
FP8_VS_F32_MEAN_REL = 0.03
FP8_NATIVE_VS_EMULATED_ATOL = 2e-2  # same quantization, different accumulation order
FULL_BF16_VS_F32_MEAN_REL = 0.05  # full pi0.5 geometry, random weights
FULL_FP8_VS_F32_MEAN_REL = 0.10
CUBLAS_WORKSPACES_BYTES = 256 << 20  # per-stream cuBLAS / cuBLASLt workspaces, 3 streams

needs_fp8 = pytest.mark.skipif(not fp8_supported(DEV),
                               reason="native FP8 GEMMs need compute capability >= 9.0")


@pytest.fixture(autouse=True)
def _no_tf32():
    # Float32 parity: TF32 off for matmuls *and* convolutions (the SigLIP patch embedding runs
    # in TF32 by default on Ampere+, ~2.7e-4 on the openpi fixture).
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module", params=[True, False], ids=["pi05", "pi0"])
def cpu_model(request) -> Pi0Model:
    torch.manual_seed(0)
    return Pi0Model(tiny_config(pi05=request.param, num_cameras=2)).eval()


def on(model: Pi0Model, dtype: str = "float32") -> Pi0Model:
    return copy.deepcopy(model).to(DEV).set_precision(dtype).eval()


def reference(model: Pi0Model, x: ModelInputs, steps: int = STEPS) -> torch.Tensor:
    dev = model.device
    return model.sample_actions(x.images.to(dev), x.image_masks.to(dev), x.tokens.to(dev),
                                x.token_mask.to(dev), x.state.to(dev), x.noise.to(dev),
                                num_steps=steps).float().cpu()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_equals_eager_equals_reference(cpu_model, dtype):
    cfg = cpu_model.config
    model = on(cpu_model, dtype)
    spec = EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=2)
    x = dummy_inputs(cfg, 2, 2, 20, seed=1)
    eager = EagerBackend(model)
    eager.prepare(spec)
    graph = CudaGraphBackend(model)
    graph.prepare(spec)
    assert graph.num_graphs == 1 + 2 * len(graph.spec.prompt_buckets)
    e = eager.infer(x).actions
    g = graph.infer(x).actions
    atol = GRAPH_EAGER_F32_ATOL if dtype == "float32" else GRAPH_EAGER_BF16_ATOL
    torch.testing.assert_close(g, e, atol=atol, rtol=0)
    f32 = reference(cpu_model, x)
    if dtype == "float32":
        torch.testing.assert_close(g, f32, atol=F32_CPU_ATOL, rtol=0)
    else:
        rms = f32.square().mean().sqrt()
        assert (g - f32).abs().max() <= BF16_VS_F32_MAX_REL * rms
    # Replays see new inputs (the static buffers are refilled, not stale).
    y = dummy_inputs(cfg, 2, 2, 60, seed=2)
    torch.testing.assert_close(graph.infer(y).actions, eager.infer(y).actions, atol=atol, rtol=0)
    eager.release()
    graph.release()


def test_every_batch_size_up_to_max(cpu_model):
    cfg = cpu_model.config
    model = on(cpu_model)
    x = dummy_inputs(cfg, 4, 2, 33, seed=3)
    ref = reference(cpu_model, x)
    for sizes in ((4,), (1, 2, 4), (1, 2, 3, 4)):
        graph = CudaGraphBackend(model)
        graph.prepare(EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=4,
                                 batch_sizes=sizes, prompt_buckets=(48, cfg.max_token_len)))
        for rows in range(1, 5):
            out = graph.infer(select_rows(x, slice(0, rows)))
            assert out.batch == min(b for b in sizes if b >= rows)
            torch.testing.assert_close(out.actions, ref[:rows], atol=F32_CPU_ATOL, rtol=0)
        graph.release()


def test_bucket_exactness_on_gpu(cpu_model):
    cfg = cpu_model.config
    model = on(cpu_model)
    graph = CudaGraphBackend(model)
    graph.prepare(EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1,
                             prompt_buckets=(16, 48, cfg.max_token_len)))
    for valid in (3, 16, 17, 48):
        x = dummy_inputs(cfg, 1, 2, valid, seed=valid)
        out = graph.infer(x)
        assert out.bucket == next(b for b in (16, 48) if b >= valid)
        torch.testing.assert_close(out.actions, reference(cpu_model, x), atol=F32_CPU_ATOL,
                                   rtol=0)


def test_replay_after_re_prepare_and_memory_is_returned(cpu_model):
    cfg = cpu_model.config
    model = on(cpu_model)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    graph = CudaGraphBackend(model)
    x = dummy_inputs(cfg, 1, 2, 10, seed=4)
    base = None
    for steps in (STEPS, 2, STEPS, 3):
        graph.prepare(EngineSpec(num_cameras=2, num_steps=steps, max_batch=2))
        before = torch.cuda.memory_allocated()
        for _ in range(5):
            out = graph.infer(x)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before  # replay allocates nothing
        torch.testing.assert_close(out.actions, reference(cpu_model, x, steps),
                                   atol=F32_CPU_ATOL, rtol=0)
        graph.release()
        torch.cuda.synchronize()
        # The first cycle leaves the cuBLAS workspaces of the backend's (kept) streams behind;
        # after that every prepare / release cycle returns to the same figure.
        if base is None:
            base = torch.cuda.memory_allocated()
            assert base - start <= CUBLAS_WORKSPACES_BYTES
        assert torch.cuda.memory_allocated() == base


def test_pipelined_graph_backend_equals_serial(cpu_model):
    cfg = cpu_model.config
    model = on(cpu_model)
    xs = [dummy_inputs(cfg, 1, 2, 5 + 7 * i, seed=20 + i) for i in range(4)]
    refs = [reference(cpu_model, x) for x in xs]
    graph = CudaGraphBackend(model)
    graph.prepare(EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1, pipeline=True))
    t = graph.begin_prefix(xs[0])
    graph.begin_denoise(t)
    results = []
    for x in xs[1:]:
        nxt = graph.begin_prefix(x)  # overlaps the in-flight denoise on the second stream
        results.append(graph.collect(t))
        graph.begin_denoise(nxt)
        t = nxt
    results.append(graph.collect(t))
    for r, ref in zip(results, refs):
        torch.testing.assert_close(r.actions, ref, atol=F32_CPU_ATOL, rtol=0)


@pytest.mark.parametrize("pipeline", [False, True], ids=["serial", "pipelined"])
def test_worker_owns_prepare_capture_and_infer(cpu_model, pipeline):
    cfg = cpu_model.config
    model = on(cpu_model)
    graph = CudaGraphBackend(model)
    results, errors, done = [], [], threading.Semaphore(0)
    spec = EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1, pipeline=pipeline)
    w = InferenceWorker(graph, lambda r: (results.append(r), done.release()),
                        lambda e, i: (errors.append(e), done.release()), pipeline=pipeline,
                        setup=lambda: graph.prepare(spec), teardown=graph.release)
    w.start()
    xs = [dummy_inputs(cfg, 1, 2, 9, seed=30 + i) for i in range(3)]
    for x in xs:
        w.submit(x)
        assert done.acquire(timeout=60)
    w.stop()
    assert not errors and not graph.prepared
    for r, x in zip(results, xs):
        torch.testing.assert_close(r.result.actions, reference(cpu_model, x), atol=F32_CPU_ATOL,
                                   rtol=0)


def test_compiled_graph_equals_eager(cpu_model):
    cfg = cpu_model.config
    model = on(cpu_model)
    spec = EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1, prompt_buckets=(48,))
    # mode "default": no GEMM autotuning (the max-autotune modes take minutes per stage).
    graph = CudaGraphBackend(model, compile=True, compile_mode="default")
    graph.prepare(spec)
    x = dummy_inputs(cfg, 1, 2, 12, seed=5)
    torch.testing.assert_close(graph.infer(x).actions, reference(cpu_model, x),
                               atol=F32_CPU_ATOL * 10, rtol=0)


@needs_fp8
def test_fp8_native_matches_emulation_and_error_bound(cpu_model):
    cfg = cpu_model.config
    x = dummy_inputs(cfg, 2, 2, 20, seed=6)
    native = quantize_fp8(on(cpu_model, "bfloat16"), emulate=False)
    emulated = quantize_fp8(on(cpu_model, "bfloat16"), emulate=True)
    assert not native.lm.layers[0].mlp.up_proj.emulate
    torch.testing.assert_close(reference(native, x), reference(emulated, x),
                               atol=FP8_NATIVE_VS_EMULATED_ATOL, rtol=0)
    report = compare_precisions(on(cpu_model), x, num_steps=STEPS, emulate=False)
    rms = report["fp8"]["ref_rms"]
    assert report["fp8"]["max_abs"] <= FP8_VS_F32_MAX_REL * rms
    assert report["fp8"]["mean_abs"] <= FP8_VS_F32_MEAN_REL * rms
    # FP8 inside a graph, per-tensor activation scales too.
    for act in ("per_token", "per_tensor"):
        m = quantize_fp8(on(cpu_model, "bfloat16"), act_scale=act)
        graph = CudaGraphBackend(m)
        graph.prepare(EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=2))
        eager = EagerBackend(m)
        eager.prepare(EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=2))
        torch.testing.assert_close(graph.infer(x).actions, eager.infer(x).actions,
                                   atol=GRAPH_EAGER_BF16_ATOL, rtol=0)


@pytest.mark.slow
def test_full_pi05_geometry_bf16_and_fp8_accuracy():
    """Random weights at full pi0.5 size: bf16 / fp8 against float32 on the same noise."""
    from pi0_ros.tools.bench import random_model

    cfg = Pi0Config.preset("pi05").replace(cameras=("base_0_rgb", "left_wrist_0_rgb"))
    model = random_model(cfg, DEV, "float32", seed=0)
    x = dummy_inputs(cfg, 1, 2, 60, seed=7)
    variants = ("bfloat16", "fp8") if fp8_supported(DEV) else ("bfloat16",)
    report = compare_precisions(model, x, num_steps=10, variants=variants)
    print("full pi0.5 precision report:", report)
    rms = report["bfloat16"]["ref_rms"]
    assert report["bfloat16"]["mean_abs"] <= FULL_BF16_VS_F32_MEAN_REL * rms
    if "fp8" in report:
        assert report["fp8"]["mean_abs"] <= FULL_FP8_VS_F32_MEAN_REL * rms
    del model
    torch.cuda.empty_cache()


@pytest.mark.slow
def test_full_pi05_graph_memory_and_equivalence():
    from pi0_ros.tools.bench import random_model

    cfg = Pi0Config.preset("pi05").replace(cameras=("base_0_rgb", "left_wrist_0_rgb"))
    torch.cuda.reset_peak_memory_stats()
    model = random_model(cfg, DEV, "bfloat16", seed=0)
    spec = EngineSpec(num_cameras=2, num_steps=10, max_batch=1)
    x = dummy_inputs(cfg, 1, 2, 40, seed=8)
    eager = EagerBackend(model)
    eager.prepare(spec)
    e = eager.infer(x).actions
    eager.release()
    graph = CudaGraphBackend(model)
    graph.prepare(spec)
    g = graph.infer(x).actions
    torch.testing.assert_close(g, e, atol=GRAPH_EAGER_BF16_ATOL, rtol=0)
    peak_gb = torch.cuda.max_memory_allocated() / 1024**3
    print(f"full pi0.5 bf16 graph: peak allocated {peak_gb:.2f} GB")
    assert isinstance(model.lm.layers[0].mlp.up_proj, torch.nn.Linear)
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())


# -- issue 12: per-stream capture, fused attention, static FP8, released weights ------------------
def test_graphs_are_captured_on_their_replay_streams(cpu_model):
    cfg = cpu_model.config
    model = on(cpu_model)
    graph = CudaGraphBackend(model)
    graph.prepare(EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1, pipeline=True,
                             prompt_buckets=(48,)))
    # Two replay streams, each its own capture stream: no cuBLAS workspace shared across them.
    assert graph._capture_stream("denoise") is graph._streams["denoise"]
    assert graph._capture_stream("prefix") is graph._streams["prefix"]
    assert graph._streams["denoise"] is not graph._streams["prefix"]
    xs = [dummy_inputs(cfg, 1, 2, 5 + 9 * i, seed=60 + i) for i in range(4)]
    t = graph.begin_prefix(xs[0])
    graph.begin_denoise(t)
    for i, x in enumerate(xs[1:]):
        nxt = graph.begin_prefix(x)
        torch.testing.assert_close(graph.collect(t).actions, reference(cpu_model, xs[i]),
                                   atol=F32_CPU_ATOL, rtol=0)
        graph.begin_denoise(nxt)
        t = nxt
    torch.testing.assert_close(graph.collect(t).actions, reference(cpu_model, xs[-1]),
                               atol=F32_CPU_ATOL, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sdpa_graph_matches_eager_attention(cpu_model, dtype):
    from pi0_ros.model.gemma import set_attention

    cfg = cpu_model.config
    x = dummy_inputs(cfg, 2, 2, 17, seed=9)
    spec = EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=2, prompt_buckets=(48,))
    base = on(cpu_model, dtype)
    eager = EagerBackend(base)
    eager.prepare(spec)
    graph = CudaGraphBackend(set_attention(on(cpu_model, dtype), "sdpa"))
    graph.prepare(spec)
    atol = 1e-5 if dtype == "float32" else GRAPH_EAGER_BF16_ATOL
    torch.testing.assert_close(graph.infer(x).actions, eager.infer(x).actions, atol=atol, rtol=0)


@needs_fp8
def test_static_fp8_graph_native_vs_emulated(cpu_model):
    from pi0_ros.engine.fp8 import calibrate_input_amax

    cfg = cpu_model.config
    x = dummy_inputs(cfg, 1, 2, 20, seed=10)
    base = on(cpu_model, "bfloat16")
    amax = calibrate_input_amax(base, [dummy_inputs(cfg, 1, 2, 30, seed=11)], STEPS)
    native = quantize_fp8(copy.deepcopy(base), act_scale="static", emulate=False,
                          input_amax=amax)
    emulated = quantize_fp8(copy.deepcopy(base), act_scale="static", emulate=True,
                            input_amax=amax)
    spec = EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1, prompt_buckets=(48,))
    graph = CudaGraphBackend(native)
    graph.prepare(spec)
    torch.testing.assert_close(graph.infer(x).actions, reference(emulated, x),
                               atol=FP8_NATIVE_VS_EMULATED_ATOL, rtol=0)


def test_prepare_moves_unread_weights_off_the_gpu(cpu_model):
    model = on(cpu_model)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    freed = model.release_unread_weights("cpu")
    assert freed > 0 and torch.cuda.memory_allocated() < before
    graph = CudaGraphBackend(model)  # prepare still works: time conditioning runs on the host
    graph.prepare(EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1, prompt_buckets=(48,)))
    x = dummy_inputs(cpu_model.config, 1, 2, 12, seed=12)
    torch.testing.assert_close(graph.infer(x).actions, reference(cpu_model, x),
                               atol=F32_CPU_ATOL, rtol=0)
