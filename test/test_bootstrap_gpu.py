"""The bootstrap keeps an installed CUDA / JetPack torch and a sourced ROS 2 (GPU machines, Thor)
instead of installing the CPU torch and the ROS wheels over them. Commands are recorded, not
run."""

from __future__ import annotations

import pytest

from pi0_ros.tools import bootstrap


@pytest.fixture
def fake_machine(tmp_path, monkeypatch):
    """A bootstrap pointed at a temporary venv; probes answer from ``answers``; ``_run`` records
    its commands (and "creates" the venv)."""
    venv = tmp_path / ".venv"
    monkeypatch.setattr(bootstrap, "VENV", venv)
    monkeypatch.setattr(bootstrap, "PY", venv / "bin" / "python")
    answers: dict[str, str | None] = {}
    calls: list[list[str]] = []

    def probe(python, code):
        return answers.get("torch" if "torch" in code else "rclpy")

    def run(cmd, env=None):
        cmd = [str(c) for c in cmd]
        calls.append(cmd)
        if "venv" in cmd:
            venv.mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(bootstrap, "_probe", probe)
    monkeypatch.setattr(bootstrap, "_run", run)
    monkeypatch.delenv("ROS_DISTRO", raising=False)
    return venv, answers, calls


def test_detection(fake_machine, monkeypatch):
    _, answers, _ = fake_machine
    answers["torch"] = "2.13.0 cuda None"  # the CPU wheel: not kept
    assert bootstrap.system_torch("python3") is None
    answers["torch"] = "2.9.0a0+nv25.08 cuda 13.0"  # a JetPack 7 wheel
    assert bootstrap.system_torch("python3") == "2.9.0a0+nv25.08 cuda 13.0"
    monkeypatch.setenv("PI0_ROS_SYSTEM_TORCH", "0")
    assert bootstrap.system_torch("python3") is None
    answers["rclpy"] = ""
    assert bootstrap.system_ros("python3") is None  # no ROS_DISTRO: nothing sourced
    monkeypatch.setenv("ROS_DISTRO", "jazzy")
    assert bootstrap.system_ros("python3") == "jazzy"
    answers["rclpy"] = None  # sourced, but not importable by this interpreter
    assert bootstrap.system_ros("python3") is None


def test_jetson_keeps_jetpack_torch_and_ros(fake_machine, monkeypatch):
    venv, answers, calls = fake_machine
    answers.update(torch="2.9.0a0+nv25.08 cuda 13.0", rclpy="")
    monkeypatch.setenv("ROS_DISTRO", "jazzy")
    bootstrap.ensure_venv()
    assert "--system-site-packages" in calls[0]
    assert (venv / ".pi0_ros_system").read_text() == "torch ros"
    bootstrap.ensure_packages(with_tests=True)
    pip = [c for c in calls if "pip" in c]
    assert not any("torch==2.13.0" in c for c in pip)  # no CPU torch over the JetPack one
    assert all(not any(p.startswith("ros-") for p in c) for c in pip)  # no ROS wheels
    assert all("--constraint" in c for c in pip)
    assert (venv / "pi0_ros_constraints.txt").read_text() == "torch==2.9.0a0+nv25.08\n"


def test_cpu_machine_unchanged(fake_machine):
    venv, answers, calls = fake_machine
    answers.update(torch=None, rclpy=None)
    monkeypatch_python = bootstrap._find_python()
    bootstrap.ensure_venv()
    assert calls[0] == [monkeypatch_python, "-m", "venv", str(venv)]
    bootstrap.ensure_packages(with_tests=False)
    pip = [c for c in calls if "pip" in c]
    assert pip[0][-1] == "torch==2.13.0"  # alone and first, as before
    assert any("ros-rclpy" in c for c in pip[1])
