"""The one GPU check command, rehearsed end to end on CPU with the CUDA stand-in, and the bench's
per-format kernel counts."""

from __future__ import annotations

import json
import time

import pytest
import torch

from pi0_ros.tools import bench, gpu_check

STEP_NAMES = [s[0] for s in gpu_check.STEPS]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one torch thread (conftest.one_torch_thread)."""


def test_standin_run_end_to_end_prints_the_gpu_summary(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--standin", "--json", str(out), "--iters", "2", "--warmup", "1"])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert rc == 0, printed
    steps = report["steps"]
    assert list(steps) == STEP_NAMES
    for name in STEP_NAMES:
        expect = "skipped" if name in ("gpu_tests", "compile") else "ok"
        assert steps[name]["status"] == expect, (name, steps[name])
    assert "stand-in" in steps["gpu_tests"]["reason"]
    acc = steps["accuracy"]["result"]
    assert acc["eager_f32_vs_openpi"]["max_abs"] < 1e-5  # the fixture, through the engine
    assert 0 < acc["graph_bf16_vs_f32"]["max_abs"] < acc["graph_fp8_vs_f32"]["max_abs"] < 0.5
    assert acc["graph_f32_sdpa_vs_f32"]["max_abs"] <= 1e-5
    assert "sdpa" in steps["bench_2cam"]["result"]
    b = steps["bench_2cam"]["result"]
    assert b["p50_ms"] <= b["p99_ms"] <= b["max_ms"] and b["finite"]
    assert set(b["kernels"]) == {"vision", "prefix", "denoise"}
    fp8 = steps["fp8_2cam"]["result"]
    # Static activation scales cut the FP8 kernel count; both are above BF16's.
    assert (b["kernels"]["denoise"] < fp8["static"]["kernels"]["denoise"]
            < fp8["per_token"]["kernels"]["denoise"])
    assert steps["pipelined"]["result"]["pipelined_per_request_ms"] > 0
    assert set(steps["batch_sweep"]["result"]) == {"batch2", "batch4"}
    assert [t["verdict"] for t in report["targets"]] == ["stand-in"] * 3 + ["not measured"]
    # The summary: a title, a step table, the targets table (same shape on a GPU).
    lines = printed[printed.index("pi0_ros gpu_check on"):].splitlines()
    assert lines[1].split() == ["step", "status", "seconds", "note"]
    assert [ln.split()[0] for ln in lines[2:2 + len(STEP_NAMES)]] == STEP_NAMES
    assert lines[2 + len(STEP_NAMES)].startswith("targets (H100, pi0.5, 2 cameras")
    target_lines = lines[3 + len(STEP_NAMES):3 + len(STEP_NAMES) + len(gpu_check.TARGETS)]
    assert [ln.split("<=")[0].strip() for ln in target_lines] == [t[0] for t in
                                                                  gpu_check.TARGETS]
    assert lines[-1] == f"gpu_check: wrote {out}"


def test_verdicts_on_a_gpu():
    ctx = gpu_check.Context(standin=False, device=torch.device("cpu"), budget_s=1, iters=1,
                            warmup=0)
    ctx.findings.update(bf16_p50_ms=9.5, fp8_p50_ms=7.2, bf16_jitter_ms=0.1)
    verdicts = {r["target"]: r["verdict"] for r in gpu_check.judge(ctx)}
    assert verdicts == {"BF16 p50": "PASS", "FP8 p50": "FAIL", "BF16 p99 - p50": "PASS",
                        "BF16 peak memory": "not measured"}


def test_steps_are_time_boxed_and_failures_recorded(monkeypatch):
    def slow(ctx):
        time.sleep(5)
        return {}

    def broken(ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check, "STEPS", (("slow", 0.5, slow, False),
                                             ("broken", 10, broken, False),
                                             ("late", 1000, lambda ctx: {}, False)))
    ctx = gpu_check.Context(standin=True, device=torch.device("cpu"), budget_s=60, iters=1,
                            warmup=0)
    t = time.monotonic()
    res = gpu_check.run_steps(ctx)
    assert time.monotonic() - t < 4
    assert res["slow"]["status"] == "timeout" and "time box" in res["slow"]["error"]
    assert res["broken"]["status"] == "error" and "boom" in res["broken"]["error"]
    assert res["late"]["status"] == "skipped" and "budget" in res["late"]["reason"]


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="unknown step"):
        gpu_check.main(["--standin", "--only", "nope"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--standin"):
            gpu_check.main([])


def test_bench_counts_the_kernels_of_each_format(tmp_path):
    counts = {}
    for dtype, act in (("bfloat16", "per_token"), ("fp8", "per_token"), ("fp8", "static")):
        out = tmp_path / f"{dtype}_{act}.json"
        assert bench.main(["--geometry", "tiny", "--device", "cpu", "--dtype", dtype,
                           "--fp8-act", act, "--iters", "1", "--warmup", "0", "--steps", "2",
                           "--prompt-len", "30", "--peak-tflops", "1", "--peak-gbps", "10",
                           "--json", str(out)]) == 0
        counts[dtype, act] = json.loads(out.read_text())["kernels"]
    bf16, dyn, static = (counts["bfloat16", "per_token"], counts["fp8", "per_token"],
                         counts["fp8", "static"])
    assert bf16["vision"] == dyn["vision"] == static["vision"]  # SigLIP stays bf16
    for stage in ("prefix", "denoise"):
        assert bf16[stage] < static[stage] < dyn[stage], (stage, counts)


def test_bench_counts_full_geometry_kernels_on_meta(tmp_path, capsys):
    counts = {}
    for dtype, act in (("bfloat16", "per_token"), ("fp8", "per_token"), ("fp8", "static")):
        out = tmp_path / f"{dtype}_{act}.json"
        assert bench.main(["--kernels-only", "--geometry", "pi05", "--device", "cpu",
                           "--dtype", dtype, "--fp8-act", act, "--steps", "2",
                           "--json", str(out)]) == 0
        counts[dtype, act] = json.loads(out.read_text())["kernels"]
    assert "kernels per inference" in capsys.readouterr().out
    assert (counts["bfloat16", "per_token"]["denoise"] < counts["fp8", "static"]["denoise"]
            < counts["fp8", "per_token"]["denoise"])


def test_gpu_only_paths_are_wired(monkeypatch):
    """The branches only a GPU takes, checked for wiring (arguments, parsing) on CPU."""
    ctx = gpu_check.Context(standin=False, device=torch.device("cpu"), budget_s=60, iters=1,
                            warmup=0)
    from pi0_ros.model import Pi0Model, tiny_config

    model = Pi0Model(tiny_config())
    # The registry is reached with valid options and refuses only the device.
    with pytest.raises(ValueError, match="cuda_graph' does not run on cpu"):
        gpu_check.graph_backend(ctx, model, "bfloat16", compile=True, compile_mode="default")
    seen = {}

    class Done:
        returncode, stdout = 0, "....\n12 passed, 3 deselected in 40.0s\n"

    def run(cmd, **kw):
        seen.update(cmd=cmd, timeout=kw["timeout"])
        return Done()

    monkeypatch.setattr(gpu_check.subprocess, "run", run)
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: object())
    out = gpu_check.step_gpu_tests(ctx, 150)
    assert out["summary"] == "12 passed, 3 deselected in 40.0s"
    assert seen["cmd"][-3:] == ["-m", "not slow", "test/test_engine_gpu.py"]
    assert 0 < seen["timeout"] < 150
    Done.returncode = 1
    with pytest.raises(RuntimeError, match="GPU tests failed"):
        gpu_check.step_gpu_tests(ctx, 150)
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None)
    assert "pytest" in gpu_check.step_gpu_tests(ctx, 150)["skipped"]
