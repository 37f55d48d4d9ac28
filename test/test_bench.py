"""pi0-ros-bench on the tiny geometry (CPU) and its dispatcher."""

from __future__ import annotations

import json
import sys
import types

import pytest

from pi0_ros.tools import bench

STAGE_KEYS = {"p50_ms", "p95_ms", "p99_ms", "max_ms"}


def test_tiny_cpu_writes_valid_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--geometry", "tiny", "--device", "cpu", "--iters", "3", "--warmup", "1",
                     "--steps", "2", "--batch", "1,2", "--prompt-len", "30",
                     "--peak-tflops", "1", "--peak-gbps", "10", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["config"]["bucket"] == 48 and data["config"]["batches"] == [1, 2]
    assert [r["batch"] for r in data["runs"]] == [1, 2]
    for run in data["runs"]:
        for stage in ("vision", "prefix", "denoise", "total"):
            s = run["stages"][stage]
            assert STAGE_KEYS <= set(s) and s["n"] == 3
            assert 0 <= s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"] <= s["max_ms"]
            assert run["ratio_to_floor"][stage] > 0
        assert run["finite"] and run["roofline"]["peak"]["source"] == "user"
    assert data["stages"] == data["runs"][0]["stages"]
    assert "total" in capsys.readouterr().out


def test_tiny_pi0_fp8_emulated(tmp_path):
    out = tmp_path / "fp8.json"
    assert bench.main(["--geometry", "tiny-pi0", "--device", "cpu", "--dtype", "fp8",
                       "--iters", "2", "--warmup", "0", "--steps", "1", "--cameras", "1",
                       "--peak-tflops", "1", "--peak-gbps", "10", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["dtype"] == "fp8" and not data["config"]["pi05"]
    assert data["config"]["cameras"] == 1


def test_full_geometry_on_cpu_is_refused():
    with pytest.raises(SystemExit, match="refused"):
        bench.main(["--geometry", "pi05", "--device", "cpu"])
    with pytest.raises(SystemExit, match="cuda"):
        bench.main(["--geometry", "tiny", "--device", "cpu", "--backend", "cuda_graph"])


@pytest.mark.parametrize("flag,module", bench.DISPATCH)
def test_dispatcher_forwards_without_the_flag(monkeypatch, flag, module):
    seen = {}
    fake = types.ModuleType(f"pi0_ros.tools.{module}")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 7
    monkeypatch.setitem(sys.modules, f"pi0_ros.tools.{module}", fake)
    assert bench.main(["--iters", "3", flag, "--json", "x.json"]) == 7
    assert seen["argv"] == ["--iters", "3", "--json", "x.json"]
