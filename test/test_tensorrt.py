"""TensorRT backend: builder configuration, float32 islands, inspector report, engine cache,
the build flow behind the ``TrtRuntime`` seam, and the backend end to end.

Without TensorRT (CI) the runtime seam is exercised by ``OnnxRuntimeRuntime`` (the same ONNX
stages run by onnxruntime) and a recording fake; the tests at the bottom build and run real
engines and skip with a reason unless both tensorrt and CUDA are importable / available.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from pi0_ros.engine import tensorrt as tb  # noqa: E402
from pi0_ros.engine.base import EngineSpec, dummy_inputs  # noqa: E402
from pi0_ros.engine.eager import EagerBackend  # noqa: E402
from pi0_ros.engine.registry import resolve_device  # noqa: E402
from pi0_ros.model import Pi0Model, random_init_, save_checkpoint, tiny_config  # noqa: E402

BACKEND_ATOL = 1e-4  # onnxruntime-backed "engines" vs the eager backend, float32
TRT_FP32_ATOL = 1e-3  # real TensorRT fp32 engines (tf32 off) vs eager float32
TRT_BF16_REL = 3e-2  # real TensorRT bf16 vs eager float32: max |diff| <= rel * max(1, |a|)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA = torch.cuda.is_available()

torch.set_grad_enabled(False)

H100 = tb.DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0))
THOR = tb.DeviceInfo("NVIDIA Thor", (11, 0))
TURING = tb.DeviceInfo("Tesla T4", (7, 5))
AMPERE = tb.DeviceInfo("NVIDIA A100-SXM4-40GB", (8, 0))


def _tiny(pi05=True, cams=2, seed=0):
    return random_init_(Pi0Model(tiny_config(pi05=pi05, num_cameras=cams)), seed=seed).eval()


def _settings(options, device=H100, stage="prefix", pi05=True, min_batch=1, max_batch=4):
    cfg = tiny_config(pi05=pi05, num_cameras=2)
    inputs, _ = tb.stage_io(stage, cfg.pi05)
    return tb.builder_settings(options, device, tb.stage_shapes(cfg, stage, 16), inputs,
                               min_batch=min_batch, max_batch=max_batch)


# -- builder settings (pure) ----------------------------------------------------------------------
def test_bf16_default_is_strongly_typed_from_the_bf16_graph():
    s = _settings(tb.BuildOptions())
    assert s.precision == "bf16" and s.strongly_typed
    assert s.network_flags == ("STRONGLY_TYPED",)
    assert s.builder_flags == ()  # TensorRT rejects precision flags on strongly typed networks
    assert s.onnx_dtype == "bfloat16" and not s.fp32_islands
    assert s.opt_level == tb.DEFAULT_OPT_LEVEL and s.clear_flags == ()


def test_fp16_is_weakly_typed_with_float32_islands():
    s = _settings(tb.BuildOptions(precision="fp16"))
    assert not s.strongly_typed and s.network_flags == ()
    assert s.builder_flags == ("FP16", "OBEY_PRECISION_CONSTRAINTS")
    assert s.fp32_islands and s.onnx_dtype == "float32" and not s.warnings
    bare = _settings(tb.BuildOptions(precision="fp16", fp32_islands=False))
    assert bare.builder_flags == ("FP16",) and not bare.fp32_islands
    assert any("overflow" in w for w in bare.warnings)


def test_other_precisions_and_flags():
    fp32 = _settings(tb.BuildOptions(precision="fp32", tf32=False))
    assert fp32.strongly_typed and fp32.onnx_dtype == "float32" and fp32.clear_flags == ("TF32",)
    weak_bf16 = _settings(tb.BuildOptions(precision="bf16", strongly_typed=False))
    assert weak_bf16.builder_flags == ("BF16", "OBEY_PRECISION_CONSTRAINTS")
    assert weak_bf16.onnx_dtype == "float32"
    fp8 = _settings(tb.BuildOptions(precision="fp8"))
    assert fp8.strongly_typed and any("4590" in w for w in fp8.warnings)
    assert fp8.onnx_dtype == "bfloat16" and fp8.opset == tb.FP8_OPSET  # float8 Q/DQ: opset 19
    assert _settings(tb.BuildOptions()).opset == tb.DEFAULT_OPSET
    assert _settings(tb.BuildOptions(workspace_gib=1.5)).workspace_bytes == 3 * 2**29


def test_precision_must_fit_the_device():
    with pytest.raises(ValueError, match="8.9"):
        _settings(tb.BuildOptions(precision="fp8"), device=AMPERE)
    with pytest.raises(ValueError, match="8.0"):
        _settings(tb.BuildOptions(precision="bf16"), device=TURING)
    assert _settings(tb.BuildOptions(precision="fp16"), device=TURING).builder_flags[0] == "FP16"


@pytest.mark.parametrize("kwargs", [dict(precision="int4"), dict(opt_level=6),
                                    dict(precision="fp16", strongly_typed=True),
                                    dict(workspace_gib=0)])
def test_build_options_validate(kwargs):
    with pytest.raises(ValueError):
        tb.BuildOptions(**kwargs)


def test_optimization_level_on_thor():
    assert THOR.is_thor and not H100.is_thor
    assert tb.DeviceInfo("NVIDIA Jetson", (10, 1)).is_thor  # CUDA 12.x numbering
    assert _settings(tb.BuildOptions(), device=THOR).opt_level == tb.THOR_MAX_OPT_LEVEL == 2
    assert _settings(tb.BuildOptions(), device=H100).opt_level == 3
    high = _settings(tb.BuildOptions(opt_level=4), device=THOR)
    assert high.opt_level == 4 and any("RMSNorm" in w for w in high.warnings)
    assert not _settings(tb.BuildOptions(opt_level=4), device=H100).warnings


def test_profiles_cover_every_batched_input():
    cfg = tiny_config(pi05=True, num_cameras=2)
    s = _settings(tb.BuildOptions(), stage="prefix", min_batch=1, max_batch=4)
    shapes = tb.stage_shapes(cfg, "prefix", 16)
    assert [p.name for p in s.profiles] == list(tb.stage_io("prefix", True)[0])
    tokens = next(p for p in s.profiles if p.name == "image_tokens")
    assert tokens.min == (1,) + shapes["image_tokens"][1:]
    assert tokens.opt == tokens.max == (4,) + shapes["image_tokens"][1:]
    step = _settings(tb.BuildOptions(), stage="denoise_step", min_batch=2, max_batch=3)
    names = [p.name for p in step.profiles]
    assert "modulation" not in names  # static: no batch axis
    k = next(p for p in step.profiles if p.name == "prefix_k")
    assert (k.min[1], k.opt[1], k.max[1]) == (2, 3, 3)  # batch is axis 1 of the stacked K/V
    with pytest.raises(ValueError):
        _settings(tb.BuildOptions(), min_batch=3, max_batch=2)


# -- float32 islands on the real exported node names ----------------------------------------------
@pytest.fixture(scope="module")
def exported_pi05(tmp_path_factory):
    model = _tiny(True, 2)
    out = tmp_path_factory.mktemp("onnx")
    return model, {s: tb.export_stage(model, s, out, prompt_len=8, num_steps=2)
                   for s in ("vision", "prefix", "denoise")}


def test_fp32_islands_cover_norms_and_attention(exported_pi05):
    _, exports = exported_pi05
    for stage, ex in exports.items():
        proto = onnx.shape_inference.infer_shapes(onnx.load(str(ex.path)))
        nodes = proto.graph.node
        float_values = {v.name for v in proto.graph.value_info
                        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
        for n in nodes:
            if n.op_type in ("Softmax", "ReduceMean", "Sqrt", "LayerNormalization"):
                assert tb.fp32_island(n.name), (stage, n.name)
            if any(w in n.name for w in ("gate_proj", "up_proj", "down_proj", "q_proj",
                                          "k_proj", "fc1", "action_in_proj")):
                assert not tb.fp32_island(n.name), (stage, n.name)
            if n.op_type in ("Where", "Cos", "Sin") and n.output[0] in float_values:
                assert tb.fp32_island(n.name), (stage, n.name)  # mask values, RoPE angles
        islands = [n.name for n in nodes if tb.fp32_island(n.name)]
        if stage != "vision":  # the Gemma attention cores (logits + mask + softmax)
            assert any("attention_core/MatMul" in x for x in islands)
            assert any("attention_core/Softmax" in x for x in islands)
        if stage == "prefix":
            assert any("attention_mask/Where" in x for x in islands)
            assert any("rope_tables/Cos" in x for x in islands)


def test_fp8_needs_qdq_nodes(exported_pi05, tmp_path):
    _, exports = exported_pi05
    fp8 = _settings(tb.BuildOptions(precision="fp8"))
    with pytest.raises(tb.EngineBuildError, match="Q/DQ|QuantizeLinear"):
        tb.check_onnx_for_precision(exports["prefix"].path, fp8)
    tb.check_onnx_for_precision(exports["prefix"].path, _settings(tb.BuildOptions()))
    # a minimal explicitly quantized graph is recognized
    h = onnx.helper
    scale = h.make_tensor("s", onnx.TensorProto.FLOAT, [], [0.5])
    zp = h.make_tensor("z", onnx.TensorProto.FLOAT8E4M3FN, [], [0])
    graph = h.make_graph(
        [h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q0"),
         h.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq0")], "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])], [scale, zp])
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 19)])
    assert tb.fp8_qdq_nodes(proto) == ["q0"]
    onnx.save(proto, str(tmp_path / "q.onnx"))
    tb.check_onnx_for_precision(tmp_path / "q.onnx", fp8)


# -- inspector report (pure) ----------------------------------------------------------------------
def _layers(*specs):
    return {"Layers": [{"Name": f"l{i}", "LayerType": kind,
                        "Outputs": [{"Name": "o", "Format/Datatype": fmt}]}
                       for i, (kind, fmt) in enumerate(specs)]}


def test_layer_report_counts_and_fallback():
    bf16 = _layers(("MatrixMultiply", "Row major linear BF16 format"),
                   ("Reduce", "Row major linear FP32 format"),
                   ("MatrixMultiply", "Row major linear BF16 format"))
    r = tb.summarize_layers(json.dumps(bf16), "bf16")
    assert r.counts == {"bf16": 2, "fp32": 1} and r.matmul_counts == {"bf16": 2}
    assert not r.fallback
    fell_back = _layers(("MatrixMultiply", "Row major linear FP32 format"),
                        ("Softmax", "Row major linear FP32 format"))
    r = tb.summarize_layers(fell_back, "fp8")
    assert r.fallback and "4590" in r.message
    assert tb.summarize_layers(fell_back, "fp16").fallback
    assert not tb.summarize_layers(fell_back, "fp32").fallback
    assert not tb.summarize_layers(None, "fp8").fallback
    fp8 = {"Layers": [{"Name": "gemm", "LayerType": "MatrixMultiply",
                       "Inputs": [{"Format/Datatype": "Row major linear FP8 format"}],
                       "Outputs": [{"Format/Datatype": "Row major linear BF16 format"}]}]}
    assert not tb.summarize_layers(fp8, "fp8").fallback
    newer = _layers(("CaskGemm", "BFloat16"), ("Reduce", "Float"), ("Shuffle", "Half"))
    assert tb.summarize_layers(newer, "bf16").counts == {"bf16": 1, "fp32": 1, "fp16": 1}
    dynamic = _layers(("MatrixMultiply", "N/A due to dynamic shapes"))
    assert "dynamic shapes" in tb.summarize_layers(dynamic, "fp8").message
    assert not tb.summarize_layers(dynamic, "fp8").fallback
    names_only = {"Layers": ["a", "b"]}
    assert "DETAILED" in tb.summarize_layers(names_only, "bf16").message


# -- engine cache ---------------------------------------------------------------------------------
def _key(**changes):
    key = tb.EngineKey(checkpoint="c" * 32, geometry="g" * 16, stage="prefix", num_cameras=2,
                       prompt_len=16, num_steps=0, min_batch=1, opt_batch=2, max_batch=2,
                       precision="bf16", strongly_typed=True, opt_level=2, fp32_islands=False,
                       tf32=True, opset=17, tensorrt="10.3.0", gpu="NVIDIA Thor",
                       capability="11.0")
    return dataclasses.replace(key, **changes)


def test_cache_round_trip_and_staleness(tmp_path):
    cache = tb.EngineCache(tmp_path)
    key = _key()
    assert cache.load(key) is None
    stored = cache.store(key, b"engine-bytes", {"build_s": 1.5})
    assert stored.path.name.startswith("prefix_n2_L16-bf16-b2-")
    loaded = cache.load(key)
    assert loaded.blob == b"engine-bytes" and loaded.meta["build_s"] == 1.5
    # every field is part of the key
    for field_name, other in [("tensorrt", "10.13.0"), ("gpu", "NVIDIA H100"),
                              ("checkpoint", "d" * 32), ("max_batch", 4), ("opt_level", 3)]:
        newer = _key(**{field_name: other})
        assert newer.digest != key.digest
        assert cache.load(newer) is None
        stale = cache.stale(newer)
        assert [p for p, _ in stale] == [stored.path]
        assert field_name in stale[0][1]
    # an engine whose metadata was edited / belongs elsewhere is refused, naming the field
    meta = json.loads(stored.path.with_suffix(".json").read_text())
    meta["key"]["gpu"] = "other"
    stored.path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(tb.StaleEngineError, match="gpu"):
        cache.load(key)


def test_checkpoint_hash(tmp_path):
    model = _tiny(True, 2, seed=4)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    h1 = tb.checkpoint_hash(ckpt)
    assert h1 == tb.checkpoint_hash(ckpt)  # memoized by size / mtime
    assert (Path(ckpt) / ".pi0_ros_hash.json").exists()
    other = save_checkpoint(_tiny(True, 2, seed=5), tmp_path / "ckpt2")
    assert tb.checkpoint_hash(other) != h1
    assert tb.model_hash(model) == tb.model_hash(model)
    assert tb.model_hash(model) != tb.model_hash(_tiny(True, 2, seed=5))
    with pytest.raises(FileNotFoundError):
        tb.checkpoint_hash(tmp_path / "empty_dir_that_is_missing")


# -- build flow behind the runtime seam -----------------------------------------------------------
class FakeRuntime:
    """Records builds; ``fail`` makes the build raise like a TensorRT error would."""

    def __init__(self, version="10.3.0", device=THOR, fail=False, inspect=None):
        self.version, self.device, self.fail, self._inspect = version, device, fail, inspect
        self.builds = []

    def device_info(self):
        return self.device

    def build(self, onnx_path, settings, progress=None):
        if self.fail:
            raise tb.EngineBuildError("fake: myelin fusion failed")
        self.builds.append((Path(onnx_path), settings))
        if progress:
            progress("    fake build phase")
        return b"engine:" + str(onnx_path).encode()

    def load(self, blob):
        raise AssertionError("not used")

    def inspect(self, blob):
        return self._inspect


def test_builder_builds_once_then_uses_the_cache(exported_pi05, tmp_path):
    model, _ = exported_pi05
    messages = []
    runtime = FakeRuntime(inspect=_layers(("MatrixMultiply", "Row major linear FP32 format")))
    builder = tb.EngineBuilder(model, runtime, tb.BuildOptions(precision="bf16"),
                               cache=tb.EngineCache(tmp_path / "engines"),
                               work_dir=tmp_path / "onnx", progress=messages.append)
    kw = dict(prompt_len=8, num_cameras=2, num_steps=2, min_batch=1, max_batch=2)
    cached, record = builder.engine("prefix", **kw)
    assert record.built and cached.path.exists() and record.size == len(cached.blob)
    onnx_path, settings = runtime.builds[0]
    # strongly typed bf16: the graph parsed is the bfloat16 export, the original model untouched
    assert "bfloat16" in str(onnx_path) and settings.strongly_typed
    assert model.dtype == torch.float32
    assert record.layers["fallback"]  # fp32 GEMMs for a bf16 build are reported
    assert any("building bf16 engine" in m for m in messages)
    again, record2 = builder.engine("prefix", **kw)
    assert not record2.built and again.blob == cached.blob and len(runtime.builds) == 1
    assert record2.layers == record.layers


def test_builder_stale_and_missing_engines(exported_pi05, tmp_path):
    model, _ = exported_pi05
    cache = tb.EngineCache(tmp_path / "engines")
    kw = dict(prompt_len=8, num_cameras=2, num_steps=2, min_batch=1, max_batch=1)
    opts = tb.BuildOptions(precision="fp32")
    tb.EngineBuilder(model, FakeRuntime("10.3.0"), opts, cache=cache,
                     work_dir=tmp_path / "onnx").engine("vision", **kw)
    upgraded = FakeRuntime("10.13.0")
    offline = tb.EngineBuilder(model, upgraded, opts, cache=cache, allow_build=False)
    with pytest.raises(tb.StaleEngineError, match="tensorrt '10.3.0'"):
        offline.engine("vision", **kw)
    with pytest.raises(tb.EngineNotFoundError):
        offline.engine("prefix", **kw)
    messages = []
    rebuilt = tb.EngineBuilder(model, upgraded, opts, cache=cache, work_dir=tmp_path / "onnx",
                               progress=messages.append)
    _, record = rebuilt.engine("vision", **kw)
    assert record.built and any("ignoring stale" in m for m in messages)
    failing = tb.EngineBuilder(model, FakeRuntime("9.0", fail=True), opts, cache=cache,
                               work_dir=tmp_path / "onnx")
    with pytest.raises(tb.EngineBuildError, match="myelin"):
        failing.engine("vision", **kw)


def test_builder_fp8_quantizes_the_gemma_stages(exported_pi05, tmp_path):
    model, _ = exported_pi05
    messages = []
    runtime = FakeRuntime(device=H100)
    kw = dict(prompt_len=8, num_cameras=2, num_steps=2, min_batch=1, max_batch=1)
    calib = [dummy_inputs(model.config, 1, 2, 6, prompt_len=8, seed=1)]
    builder = tb.EngineBuilder(model, runtime, tb.BuildOptions(precision="fp8"),
                               cache=tb.EngineCache(tmp_path / "engines"),
                               work_dir=tmp_path / "onnx", progress=messages.append,
                               calibration=calib)
    _, prefix = builder.engine("prefix", **kw)
    path, settings = runtime.builds[-1]
    assert "bfloat16_fp8" in str(path) and settings.strongly_typed and settings.opset >= 19
    assert len(tb.fp8_qdq_nodes(onnx.load(str(path), load_external_data=False))) > 0
    assert prefix.key.precision == "fp8" and prefix.key.calibration not in ("", "random")
    assert any("FP8 Q/DQ on" in m for m in messages)
    _, vision = builder.engine("vision", **kw)  # SigLIP stays bf16
    assert vision.key.precision == "bf16" and vision.key.calibration == ""
    assert runtime.builds[-1][0].parent.parent.name == f"bfloat16_opset{tb.DEFAULT_OPSET}"
    other = tb.EngineBuilder(model, runtime, tb.BuildOptions(precision="fp8"),
                             cache=tb.EngineCache(tmp_path / "engines"), work_dir=tmp_path / "o2")
    assert other.key("prefix", 8, 2, 2, builder.settings(
        "prefix", 8, 2, min_batch=1, max_batch=1)).calibration == "random"


def test_builder_reuses_registered_exports(exported_pi05, tmp_path):
    model, exports = exported_pi05
    runtime = FakeRuntime()
    builder = tb.EngineBuilder(model, runtime, tb.BuildOptions(precision="fp16"),
                               cache=tb.EngineCache(tmp_path), work_dir=tmp_path / "unused")
    builder.add_exports(exports.values())
    builder.engine("denoise", prompt_len=8, num_cameras=2, num_steps=2, min_batch=1,
                   max_batch=1)
    assert runtime.builds[0][0] == exports["denoise"].path
    assert runtime.builds[0][1].builder_flags == ("FP16", "OBEY_PRECISION_CONSTRAINTS")
    assert not (tmp_path / "unused").exists()


# -- the backend over the onnxruntime "engines" ---------------------------------------------------
@pytest.mark.parametrize("pi05,cams,mode", [(True, 2, "loop"), (False, 3, "step")])
def test_backend_matches_eager(tmp_path, pi05, cams, mode):
    model = _tiny(pi05, cams, seed=2)
    spec = EngineSpec(num_cameras=cams, num_steps=2, max_batch=3, prompt_buckets=(8, 16),
                      batch_sizes=(1, 3))
    runtime = tb.OnnxRuntimeRuntime()
    backend = tb.TensorRTBackend(model, runtime=runtime, cache_dir=tmp_path,
                                 options=tb.BuildOptions(precision="fp32"), denoise=mode)
    backend.prepare(spec)
    eager = EagerBackend(model)
    eager.prepare(spec)
    stage = "denoise" if mode == "loop" else "denoise_step"
    assert sorted(r.stage for r in backend.records) == sorted(
        ["vision", "prefix", "prefix", stage, stage])
    for rows, valid in ((1, 5), (2, 12), (3, 16)):
        req = dummy_inputs(model.config, rows, cams, valid, prompt_len=16, seed=rows)
        if rows > 1:
            req.image_masks[1, 0] = False
        got, want = backend.infer(req), eager.infer(req)
        assert (got.bucket, got.batch) == (want.bucket, want.batch)
        assert got.actions.shape == (rows, model.config.action_horizon, model.config.action_dim)
        assert tb.max_abs_diff(got.actions, want.actions) <= BACKEND_ATOL
        assert set(got.timing) >= {"vision", "prefix", "denoise", "total"}
    if mode == "step":  # two buffer slots: vision + prefix of request 2 before 1 is collected
        piped = tb.TensorRTBackend(model, runtime=runtime, cache_dir=tmp_path,
                                   options=tb.BuildOptions(precision="fp32"), denoise=mode)
        piped.prepare(dataclasses.replace(spec, pipeline=True))
        r1 = dummy_inputs(model.config, 2, cams, 6, prompt_len=16, seed=21)
        r2 = dummy_inputs(model.config, 1, cams, 14, prompt_len=16, seed=22)
        t1 = piped.begin_prefix(r1)
        piped.begin_denoise(t1)
        t2 = piped.begin_prefix(r2)
        a1 = piped.collect(t1)
        piped.begin_denoise(t2)
        a2 = piped.collect(t2)
        assert tb.max_abs_diff(a1.actions, eager.infer(r1).actions) <= BACKEND_ATOL
        assert tb.max_abs_diff(a2.actions, eager.infer(r2).actions) <= BACKEND_ATOL
    builds = len(runtime.builds)
    backend.release()
    assert not backend.prepared
    backend.prepare(spec)  # engines come from the cache now
    assert len(runtime.builds) == builds and not any(r.built for r in backend.records)


def test_backend_serves_engines_built_by_the_cli(tmp_path, capsys):
    from pi0_ros.model import load_checkpoint
    from pi0_ros.tools import export as export_cli

    ckpt = save_checkpoint(_tiny(True, 2, seed=8), tmp_path / "ckpt")
    out = tmp_path / "out"
    code = export_cli.main(["--checkpoint", str(ckpt), "--out", str(out), "--buckets", "8",
                            "--steps", "2", "--max-batch", "2", "--precision", "fp32",
                            "--no-check", "--build"], runtime=tb.OnnxRuntimeRuntime())
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert [e["stage"] for e in report["engines"]] == ["vision", "prefix", "denoise"]
    assert all(e["built"] and e["size_bytes"] > 0 for e in report["engines"])
    assert "built in" in capsys.readouterr().out
    model, _ = load_checkpoint(ckpt)
    runtime = tb.OnnxRuntimeRuntime()
    backend = tb.TensorRTBackend(model, runtime=runtime, cache_dir=out / "engines",
                                 checkpoint=str(ckpt), allow_build=False,
                                 options=tb.BuildOptions(precision="fp32"))
    spec = EngineSpec(num_cameras=2, num_steps=2, max_batch=2, prompt_buckets=(8,))
    backend.prepare(spec)  # every engine found: nothing exported, nothing built
    assert not runtime.builds and not any(r.built for r in backend.records)
    eager = EagerBackend(model)
    eager.prepare(spec)
    req = dummy_inputs(model.config, 2, 2, 8, prompt_len=8, seed=3)
    assert tb.max_abs_diff(backend.infer(req).actions, eager.infer(req).actions) <= BACKEND_ATOL
    with pytest.raises(tb.StaleEngineError, match="max_batch 2 \\(now 1\\)"):  # not built
        tb.TensorRTBackend(model, runtime=runtime, cache_dir=out / "engines",
                           checkpoint=str(ckpt), allow_build=False,
                           options=tb.BuildOptions(precision="fp32")).prepare(
            dataclasses.replace(spec, max_batch=1, batch_sizes=()))


def test_backend_resolves_cuda_to_an_indexed_device(tmp_path):
    """``TensorRTBackend(model, "cuda")`` as docs/TENSORRT.md writes it: ``prepare`` pins the
    thread with ``torch.cuda.set_device(device.index)``, which an unindexed "cuda" broke."""
    backend = tb.TensorRTBackend(_tiny(), "cuda", runtime=FakeRuntime(device=H100),
                                 cache_dir=tmp_path)
    assert backend.device.type == "cuda" and backend.device.index is not None
    assert backend.device == resolve_device("cuda")
    assert tb.TensorRTBackend(_tiny(), "cpu", runtime=FakeRuntime(),
                              cache_dir=tmp_path).device == torch.device("cpu")


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: cannot test its absence")
def test_backend_without_tensorrt_says_so():
    with pytest.raises(tb.TensorRTUnavailable, match="JetPack"):
        tb.TensorRTBackend(_tiny(), device="cpu")


# -- real TensorRT (GPU machines with tensorrt) ---------------------------------------------------
needs_trt = pytest.mark.skipif(not (HAS_TRT and HAS_CUDA),
                               reason="needs the tensorrt package and a CUDA device "
                                      f"(tensorrt importable: {HAS_TRT}, CUDA: {HAS_CUDA})")


@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tensorrt_engines_match_eager(tmp_path, precision):
    model = _tiny(True, 2, seed=6)
    spec = EngineSpec(num_cameras=2, num_steps=3, max_batch=2, prompt_buckets=(16,))
    options = tb.BuildOptions(precision=precision, tf32=False)
    backend = tb.TensorRTBackend(model, device="cuda", cache_dir=tmp_path, options=options)
    backend.prepare(spec)
    eager = EagerBackend(model)
    eager.prepare(spec)
    req = dummy_inputs(model.config, 2, 2, 11, prompt_len=16, seed=1)
    got, want = backend.infer(req).actions, eager.infer(req).actions
    diff = tb.max_abs_diff(got, want)
    if precision == "fp32":
        assert diff <= TRT_FP32_ATOL
    else:
        assert diff <= TRT_BF16_REL * max(1.0, float(want.abs().max()))
    for record in backend.records:
        assert record.layers.get("counts"), record  # the inspector reported layer dtypes


@needs_trt
def test_tensorrt_stale_engine_is_refused(tmp_path):
    model = _tiny(True, 2, seed=7)
    runtime = tb.TensorRTRuntime()
    cache = tb.EngineCache(tmp_path)
    kw = dict(prompt_len=8, num_cameras=2, num_steps=1, min_batch=1, max_batch=1)
    opts = tb.BuildOptions(precision="fp32")
    tb.EngineBuilder(model, runtime, opts, cache=cache, work_dir=tmp_path).engine("vision", **kw)
    runtime.version = "0.0.0-other"
    with pytest.raises(tb.StaleEngineError):
        tb.EngineBuilder(model, runtime, opts, cache=cache, allow_build=False).engine(
            "vision", **kw)
