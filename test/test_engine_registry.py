"""One backend registry: every value a surface accepts is one the engine builds.

Builds every (backend, device, format) the registry accepts on the tiny model (CUDA ones skip
here with the reason), checks that the node's parameters, the config files and the launch files
take their names from the registry, and configures the policy node with ``model.backend:
tensorrt`` on engines that ``pi0-ros-export`` built (onnxruntime runtime, CPU).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pi0_ros.engine import EngineSpec
from pi0_ros.engine.base import dummy_inputs
from pi0_ros.engine.registry import (BACKENDS, PRECISIONS, REGISTRY, EngineOptions, build_backend,
                                     prepare_model, resolve_device, supported)
from pi0_ros.model import Pi0Model, random_init_, save_checkpoint, tiny_config
from pi0_ros.pipeline.config import BACKEND_CHOICES, DTYPES, PARAMETERS

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
BACKEND_ATOL = 1e-4  # float32 backends vs the eager float32 reference (ONNX runtime: ~1e-6)
FORMAT_ATOL = {"bfloat16": 0.1, "fp8": 0.3}  # reduced formats vs float32 on the tiny model


def _model(pi05: bool = True) -> Pi0Model:
    return random_init_(Pi0Model(tiny_config(pi05=pi05, num_cameras=2)), seed=4)


def _params(name: str) -> set[str]:
    return {str(v) for v in re.findall(r"'([a-z0-9_]+)'", PARAMETERS[name][1])}


def test_surfaces_name_registry_values():
    assert BACKEND_CHOICES == ("auto", *BACKENDS) and DTYPES == ("auto", *PRECISIONS)
    assert set(BACKENDS) <= _params("model.backend") and set(PRECISIONS) <= _params("model.dtype")
    for path in sorted((ROOT / "config").glob("*policy*.yaml")):
        model = next(iter(yaml.safe_load(path.read_text()).values()))["ros__parameters"]["model"]
        assert model.get("backend", "auto") in BACKEND_CHOICES, path
        assert model.get("dtype", "auto") in DTYPES, path
        line = next(ln for ln in path.read_text().splitlines() if ln.strip().startswith("backend"))
        comment = line.split("#")[-1]
        for word in re.findall(r"\b(fp8|float16|tensorrt|cuda_graph|eager)\b", comment):
            assert word in BACKEND_CHOICES + DTYPES, (path, word)
    for path in (ROOT / "launch").glob("*.launch.py"):
        text = path.read_text()
        assert "BACKEND_CHOICES" in text or "backend" not in text or "pi0.launch.py" in text, path
        assert not re.search(r"BACKENDS = \(.*\"fp8\"", text), f"{path}: a private backend list"


def test_unknown_names_fail_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown backend 'fp8'.*tensorrt"):
        EngineOptions(backend="fp8", device="cpu").resolved()
    with pytest.raises(ValueError, match="unknown numeric format 'float16'"):
        EngineOptions(precision="float16", device="cpu").resolved()
    with pytest.raises(ValueError, match="does not run on cpu"):
        EngineOptions(backend="cuda_graph", device="cpu").resolved()
    with pytest.raises(ValueError, match="not supported by backend 'tensorrt' on cpu"):
        EngineOptions(backend="tensorrt", precision="bfloat16", device="cpu").resolved()


def test_cuda_resolves_to_an_indexed_device():
    assert resolve_device("cuda").index is not None
    assert resolve_device("cpu") == torch.device("cpu")
    assert EngineOptions(device="cpu").resolved().backend == "eager"


def _export_engines(model: Pi0Model, tmp_path: Path, *, steps: int, buckets: str) -> Path:
    from pi0_ros.tools import export as export_cli

    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    out = tmp_path / "export"
    code = export_cli.main(["--checkpoint", str(ckpt), "--out", str(out), "--buckets", buckets,
                            "--steps", str(steps), "--max-batch", "1", "--precision", "float32",
                            "--runtime", "onnxruntime", "--no-check", "--build"])
    assert code == 0
    return ckpt


@pytest.mark.parametrize("combo", supported(), ids=lambda c: "-".join(c))
def test_every_combination_builds_and_runs(combo, tmp_path):
    backend, device, fmt = combo
    if device == "cuda" and not CUDA:
        pytest.skip(f"{backend}/{fmt} runs on CUDA only; no CUDA device here")
    if backend == "tensorrt" and device == "cuda":
        pytest.importorskip("tensorrt", reason="the TensorRT runtime needs the tensorrt package "
                                               "(JetPack / NVIDIA's index), not installed here")
    spec = EngineSpec(num_cameras=2, num_steps=2, max_batch=1, prompt_buckets=(8,))
    request = dummy_inputs(_model().config, 1, 2, 8, prompt_len=8, seed=1)
    reference = build_backend(_model(), EngineOptions(backend="eager", precision="float32",
                                                      device="cpu"))
    reference.prepare(spec)
    expected = reference.infer(request).actions
    model = _model()
    opts = EngineOptions(backend=backend, precision=fmt, device=device)
    if backend == "tensorrt":
        ckpt = _export_engines(model, tmp_path, steps=2, buckets="8")
        opts = EngineOptions(backend=backend, precision=fmt, device=device,
                             engine_dir=str(tmp_path / "export" / "engines"),
                             checkpoint=str(ckpt))
    engine = build_backend(prepare_model(model.to(device), fmt), opts)
    assert engine.name == backend
    engine.prepare(spec)
    got = engine.infer(request).actions
    assert got.shape == expected.shape and torch.isfinite(got).all()
    atol = FORMAT_ATOL.get(fmt, BACKEND_ATOL)
    diff = float((got - expected).abs().max())
    assert diff <= atol, (combo, diff)


def test_registry_lists_what_it_builds():
    assert {b for b, _, _ in supported()} == set(REGISTRY) == set(BACKENDS)
    assert ("tensorrt", "cpu", "float32") in supported()
    assert ("cuda_graph", "cpu", "float32") not in supported()


def test_policy_node_configures_tensorrt_through_onnxruntime(tmp_path):
    """``pi0_policy_node -p model.backend:=tensorrt -p tensorrt.engine_dir:=DIR`` on engines
    pi0-ros-export built, run by the onnxruntime runtime on CPU: configures, and its chunks equal
    the eager node's for the same observation."""
    pytest.importorskip("pi0_ros_msgs.msg", reason="pi0_ros_msgs is not built")
    import shutil

    from pi0_ros.pipeline import config_from_values, load_policy, noise_for, policy_observation

    model = _model()
    ckpt = _export_engines(model, tmp_path, steps=10, buckets=str(model.config.max_token_len))
    fixtures = ROOT / "test" / "fixtures" / "openpi_preprocess"
    shutil.copy(fixtures / "tokenizer.model", ckpt / "tokenizer.model")
    base = {"checkpoint": str(ckpt), "norm_stats": str(fixtures / "norm_stats.json"),
            "model.device": "cpu", "model.dtype": "float32", "prompt": "pick up the cup",
            "cameras.topics": ["/a", "/b"], "joint_states.names": [f"j{i}" for i in range(8)],
            "actions.joint_names": [f"j{i}" for i in range(7)],
            "model.prompt_buckets": [model.config.max_token_len]}  # the buckets exported
    trt = config_from_values({**base, "model.backend": "tensorrt",
                              "tensorrt.engine_dir": str(tmp_path / "export" / "engines")})
    eager = config_from_values({**base, "model.backend": "eager"})
    rgb = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    outs = []
    for config in (trt, eager):
        policy = load_policy(config)
        images = {s: policy.prepare_image(rgb, s) for s in policy.camera_slots[:2]}
        obs = policy_observation(images, np.linspace(-1, 1, 8, dtype=np.float32), "pick it up")
        outs.append(policy.infer(obs, noise=noise_for(0, 123, policy.noise_shape))["actions"])
        assert policy.engine.name == config.model.backend
        policy.close()
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=BACKEND_ATOL)

    # The same through the rclpy node's configure transition.
    import rclpy
    from rclpy.lifecycle import TransitionCallbackReturn
    from ros_helpers import fresh_domain_id
    from test_policy_node_harness import _parameter

    from pi0_ros.ros.node import PolicyNode

    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=fresh_domain_id())
    params = {**base, "model.backend": "tensorrt",
              "tensorrt.engine_dir": str(tmp_path / "export" / "engines"), "model.warmup": 1}
    node = PolicyNode(context=ctx, parameter_overrides=[_parameter(k, v)
                                                        for k, v in params.items()])
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.policy.engine.name == "tensorrt"
    finally:
        node.destroy_node()
        rclpy.shutdown(context=ctx)


def test_missing_engine_dir_is_refused_at_configure(tmp_path):
    with pytest.raises(ValueError, match="tensorrt.engine_dir"):
        build_backend(_model(), EngineOptions(backend="tensorrt", device="cpu",
                                              precision="float32"))
    with pytest.raises(ValueError, match="does not exist"):
        build_backend(_model(), EngineOptions(backend="tensorrt", device="cpu",
                                              precision="float32",
                                              engine_dir=str(tmp_path / "none")))
