"""Package metadata and the install path: package.xml / setup.py / setup.cfg agree, the interface
package is complete, every console script resolves, the bootstrap stays stdlib-only, and the
README's two set-up commands are the ones CI runs."""

from __future__ import annotations

import ast
import configparser
import importlib
import importlib.metadata
import importlib.util
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from ros_helpers import ROOT

import pi0_ros
from pi0_ros.tools import bootstrap

EXEC_DEPENDS = {
    "rclpy", "builtin_interfaces", "std_msgs", "sensor_msgs", "trajectory_msgs",
    "visualization_msgs", "diagnostic_msgs", "lifecycle_msgs", "pi0_ros_msgs",
}
# Third-party Python modules imported by pi0_ros/ and launch/ -> their rosdep key (ros/rosdistro
# rosdep/python.yaml, base.yaml), or None where rosdistro has no key (package.xml must then name
# the module in a comment). Any other import is a ROS package and must be declared by its name.
PYTHON_KEYS = {
    "numpy": "python3-numpy", "yaml": "python3-yaml", "PIL": "python3-pil",
    "torch": "python3-torch", "matplotlib": "python3-matplotlib", "cv2": "python3-opencv",
    "websockets": "python3-websockets", "msgpack": "python3-msgpack",
    "rosbags": "python3-rosbags-pip", "transformers": "python3-transformers-pip",
    "onnxruntime": "python3-onnxruntime-pip",
    "safetensors": None, "sentencepiece": None, "ruckig": None, "onnx": None, "tensorrt": None,
}
README_COMMANDS = [
    "python3 -m pi0_ros.tools.bootstrap demo",
    "python3 -m pi0_ros.tools.bootstrap test",
]


def _setup_py() -> dict:
    """VERSION, PACKAGE and the console scripts of setup.py, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("VERSION", "PACKAGE"):
                out[node.targets[0].id] = ast.literal_eval(node.value)
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            out["entry_points"] = ast.literal_eval(node.value)
    return out


def _console_scripts() -> dict[str, str]:
    specs = _setup_py()["entry_points"]["console_scripts"]
    return {name.strip(): target.strip() for name, target in (s.split("=") for s in specs)}


def _xml(path):
    root = ET.parse(path).getroot()
    assert root.tag == "package" and root.get("format") == "3", f"{path}: not package format 3"
    return root


def _texts(root, tag: str) -> set[str]:
    return {e.text.strip() for e in root.findall(tag)}


def test_versions_agree():
    version = _texts(_xml(ROOT / "package.xml"), "version")
    assert version == {_setup_py()["VERSION"]} == {pi0_ros.__version__}
    assert _texts(_xml(ROOT / "msg" / "package.xml"), "version") == version


def test_package_xml():
    root = _xml(ROOT / "package.xml")
    assert _texts(root, "name") == {_setup_py()["PACKAGE"]} == {"pi0_ros"}
    assert _texts(root, "export/build_type") == {"ament_python"}
    missing = EXEC_DEPENDS - _texts(root, "exec_depend") - _texts(root, "depend")
    assert not missing, f"package.xml lacks exec_depend on {sorted(missing)}"
    assert "python3-pytest" in _texts(root, "test_depend")
    assert (ROOT / "resource" / "pi0_ros").is_file(), "ament index marker resource/pi0_ros"


def _imports(paths) -> dict[str, str]:
    """Top-level third-party modules imported (anywhere, lazily too) -> one file importing it."""
    out = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("__future__", "pi0_ros"):
                    out.setdefault(top, str(path.relative_to(ROOT)))
    return out


def _sources() -> list[Path]:
    return sorted((ROOT / "pi0_ros").rglob("*.py")) + sorted((ROOT / "launch").glob("*.py"))


def test_package_xml_declares_every_import():
    """rosdep can install everything pi0_ros/ and launch/ import: each ROS package is an
    exec_depend, each Python module its rosdep key (or, where rosdistro has none, a comment
    naming it); the packages launch/ starts nodes from are declared too."""
    root = _xml(ROOT / "package.xml")
    declared = _texts(root, "exec_depend") | _texts(root, "depend")
    tests = _texts(root, "test_depend")
    text = (ROOT / "package.xml").read_text()
    comments = " ".join(re.findall(r"<!--(.*?)-->", text, re.S))
    missing = []
    for module, where in sorted(_imports(_sources()).items()):
        key = PYTHON_KEYS.get(module, module)
        if module in PYTHON_KEYS and key is None:
            if module not in comments:
                missing.append(f"{module} ({where}): no rosdep key, say so in a comment")
        elif key not in declared | tests:
            missing.append(f"{key} ({where} imports {module})")
    for path in sorted((ROOT / "launch").glob("*.py")):
        for package in re.findall(r'package="([A-Za-z0-9_]+)"', path.read_text()):
            if package != "pi0_ros" and package not in declared:
                missing.append(f"{package} ({path.name} starts a node from it)")
    assert not missing, f"package.xml lacks: {missing}"
    assert not declared & tests, f"both exec and test dependency: {declared & tests}"


def test_msg_package():
    root = _xml(ROOT / "msg" / "package.xml")
    assert _texts(root, "name") == {"pi0_ros_msgs"}
    assert _texts(root, "export/build_type") == {"ament_cmake"}
    assert _texts(root, "member_of_group") == {"rosidl_interface_packages"}
    assert {"ament_cmake", "rosidl_default_generators"} <= _texts(root, "buildtool_depend")
    assert "std_msgs" in _texts(root, "depend")
    assert "rosidl_default_runtime" in _texts(root, "exec_depend")
    cmake = (ROOT / "msg" / "CMakeLists.txt").read_text()
    assert "project(pi0_ros_msgs)" in cmake
    for msg in sorted((ROOT / "msg" / "msg").glob("*.msg")):
        assert f'"msg/{msg.name}"' in cmake, f"CMakeLists.txt does not generate {msg.name}"


def test_setup_cfg_puts_colcon_scripts_under_lib():
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "setup.cfg")
    assert cfg["develop"]["script_dir"] == "$base/lib/pi0_ros"
    assert cfg["install"]["install_scripts"] == "$base/lib/pi0_ros"


@pytest.mark.parametrize("script", sorted(_console_scripts()))
def test_console_script_target_exists(script):
    """Every entry point names an existing module with a callable. The modules are owned by
    different engineers: this fails until each of them has landed."""
    module, func = _console_scripts()[script].split(":")
    assert importlib.util.find_spec(module) is not None, f"{script}: no module {module}"
    if module.startswith("pi0_ros.ros."):
        pytest.importorskip("rclpy", reason=f"{module} needs rclpy")
    assert callable(getattr(importlib.import_module(module), func)), f"{script}: {module}:{func}"


def _installed():
    try:
        dist = importlib.metadata.distribution("pi0_ros")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pi0_ros is not pip-installed in this interpreter's environment")
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running in a virtual environment")
    return dist


def test_installed_console_scripts_are_in_venv_bin():
    """`pip install -e .` (the bootstrap) must put the scripts in <venv>/bin even though
    setup.cfg sends colcon's to lib/pi0_ros."""
    dist = _installed()
    installed = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert installed == _console_scripts(), "reinstall: python3 -m pi0_ros.tools.bootstrap setup"
    bindir = Path(sys.prefix) / "bin"
    missing = [name for name in installed if not (bindir / name).is_file()]
    assert not missing, f"console scripts missing from {bindir}: {missing}"


def test_bootstrap_is_stdlib_only():
    """The bootstrap runs on the system python3 before any venv exists."""
    for path in (ROOT / "pi0_ros" / "tools" / "bootstrap.py", ROOT / "pi0_ros" / "__init__.py",
                 ROOT / "pi0_ros" / "tools" / "__init__.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top == "__future__", (
                    f"{path.relative_to(ROOT)} imports {name}: not in the standard library")


def test_bootstrap_requirements_match_setup_py():
    """setup.py's install_requires / extras name the same distributions the bootstrap installs."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    kw = {k.arg: ast.literal_eval(k.value) for n in ast.walk(tree) if isinstance(n, ast.Call)
          for k in n.keywords if k.arg in ("install_requires", "extras_require")}
    declared = set(kw["install_requires"]) | set(kw["extras_require"]["test"])
    assert declared <= set(bootstrap.RUNTIME + bootstrap.TEST)


@pytest.mark.parametrize("code", [0, 1, 2, bootstrap.PYTEST_NO_TESTS])
def test_bootstrap_exit_codes(monkeypatch, code):
    """pytest's exit code passes through, except 'no tests collected' which fails."""
    calls = []
    for step in ("ensure_venv", "ensure_packages", "ensure_msgs"):
        monkeypatch.setattr(bootstrap, step, lambda *a, **k: None)
    monkeypatch.setattr(bootstrap.subprocess, "run",
                        lambda cmd, **kw: calls.append(cmd) or
                        type("Done", (), {"returncode": code})())
    assert bootstrap.main(["test", "-k", "x"]) == (1 if code == 5 else code)
    assert calls[-1][1:4] == ["-m", "pytest", "test"] and calls[-1][-2:] == ["-k", "x"]
    assert bootstrap.main(["test", "test/test_msgs.py::test_action_chunk_fields"]) == (
        1 if code == 5 else code)
    assert "test" not in calls[-1] and calls[-1][-1].startswith("test/test_msgs.py")
    assert bootstrap.main(["nonsense"]) == 2


def test_readme_quick_start_and_ci():
    """Exactly two set-up commands in the Quick start; .ci/run runs the second."""
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Quick start.*?$(.*?)^## ", readme, re.S | re.M)
    assert section, "README.md has no '## Quick start' section"
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", section.group(1), re.S)
    commands = [line.strip() for b in blocks for line in b.splitlines() if line.strip()]
    assert commands == README_COMMANDS
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "set -euo pipefail" in ci
    assert ci[-1] == README_COMMANDS[1]
    for heading in ("## ROS nodes", "## Streaming executor", "## Replay and regression tests",
                    "## GPU engine", "## TensorRT"):
        assert f"\n{heading}\n" in readme, f"README.md lacks '{heading}'"


def test_bootstrap_demo_command():
    """README command 1 ends in pi0-ros-demo (with any extra arguments passed through)."""
    assert bootstrap._command("demo", ["--seed", "1"]) == [
        str(bootstrap.VENV / "bin" / "pi0-ros-demo"), "--seed", "1"]


# ---------------------------------------------------------------------------------------------
# documented commands (issue 13, item 8)

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A command shown to be run (not a mention such as "forwarded by `ros2 launch`"): `ros2 run` /
# `ros2 launch` with an argument, the other verbs with a sub-command and an argument.
ROS_CLI = re.compile(r"\bros2 (?:run|launch) [^\s`)]|\bros2 (?:lifecycle|topic|param|bag|service|"
                     r"node) [a-z]+ [^\s`)]|\bcolcon build\b|\brosdep install\b")
ROS_NOTE = re.compile(r"ROS\s+2\s+(?:install|CLI)")


def _sections(text: str) -> list[str]:
    """A markdown text cut at its headings (outside code blocks)."""
    sections, current, fenced = [], [], False
    for line in text.splitlines():
        fenced ^= line.lstrip().startswith("```")
        if not fenced and line.startswith("#") and current:
            sections.append("\n".join(current))
            current = []
        current.append(line)
    return [*sections, "\n".join(current)]


def test_ros_cli_commands_say_which_install_gives_them():
    """The README's .venv has no ros2cli / launch_ros: every section of README.md and docs/*.md
    that shows a `ros2 ...`, `colcon build` or `rosdep install` command says it needs a ROS 2
    install (or is the section giving the .venv equivalents, 'Without the ROS 2 CLI')."""
    unmarked = []
    for doc in DOCS:
        for section in _sections(doc.read_text()):
            commands = [line.strip() for line in section.splitlines() if ROS_CLI.search(line)]
            if commands and not ROS_NOTE.search(section):
                unmarked.append(f"{doc.name}, '{section.splitlines()[0]}': {commands[0]}")
    assert not unmarked, "ROS 2 CLI commands in sections that do not say they need a ROS 2 " \
        "install:\n" + "\n".join(unmarked)


def test_documented_project_commands_exist():
    """Every console script and `python -m pi0_ros...` module the docs show is one this
    install has."""
    scripts = set(_console_scripts())
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for name in sorted(set(re.findall(r"\b(pi0-ros-[a-z-]*[a-z]|pi0_[a-z]+_node)\b", text))):
            if name not in scripts:
                missing.append(f"{doc.name}: {name}")
        for module in sorted(set(re.findall(r"python3? -m ([A-Za-z_][\w.]*)", text))):
            if module.split(".")[0] == "pi0_ros" and importlib.util.find_spec(module) is None:
                missing.append(f"{doc.name}: python -m {module}")
    assert not missing, missing
