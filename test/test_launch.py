"""launch/pi0.launch.py and launch/replay.launch.py: they compile, and every argument combination
builds the expected actions -- against launch / launch_ros stand-ins that record their arguments
(always), and against the real packages when they are importable (skipped otherwise)."""

from __future__ import annotations

import importlib.util
import itertools
import py_compile
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PI0_LAUNCH = ROOT / "launch" / "pi0.launch.py"
REPLAY_LAUNCH = ROOT / "launch" / "replay.launch.py"
LAUNCH_FILES = (PI0_LAUNCH, REPLAY_LAUNCH)
URDF = """<robot name="arm"><link name="base_link"/><link name="l1"/>
<joint name="j1" type="revolute"><parent link="base_link"/><child link="l1"/></joint></robot>"""

# Every combination of the arguments that change the structure of the description.
COMBINATIONS = list(itertools.product(
    ("true", "false"),  # autostart
    ("true", "false"),  # use_sim_time
    ("", "BAG"),  # bag
    ("true", "false"),  # rviz
    ("true", "false"),  # executor
    (False, True),  # urdf given
    ("", "eager"),  # backend
    ("false", "true"),  # monitor
))


def _launch_available() -> bool:
    try:
        import launch  # noqa: F401
        import launch_ros  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# stand-ins


class Recorded:
    """A launch entity stand-in: remembers its constructor arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __repr__(self):
        return f"{type(self).__name__}({self.args}, {self.kwargs})"


class LaunchConfiguration(Recorded):
    def perform(self, context):
        return context[self.args[0]]


def _stub_modules() -> dict[str, types.ModuleType]:
    names = {
        "launch": ["LaunchDescription"],
        "launch.actions": ["DeclareLaunchArgument", "EmitEvent", "ExecuteProcess", "LogInfo",
                           "OpaqueFunction", "RegisterEventHandler", "IncludeLaunchDescription"],
        "launch.events": [],
        "launch.substitutions": [],
        "launch.launch_description_sources": ["PythonLaunchDescriptionSource"],
        "launch_ros": [],
        "launch_ros.actions": ["Node", "LifecycleNode"],
        "launch_ros.event_handlers": ["OnStateTransition"],
        "launch_ros.events": [],
        "launch_ros.events.lifecycle": ["ChangeState"],
    }
    modules = {}
    for module_name, classes in names.items():
        module = types.ModuleType(module_name)
        for cls in classes:
            setattr(module, cls, type(cls, (Recorded,), {}))
        modules[module_name] = module
    modules["launch.substitutions"].LaunchConfiguration = LaunchConfiguration
    modules["launch.events"].matches_action = lambda action: ("matches_action", action)
    return modules


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def stubbed(monkeypatch):
    """The launch files loaded against the stand-ins (whether or not launch is installed)."""
    for name, module in _stub_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    return _load(PI0_LAUNCH, "pi0_launch_stubbed"), _load(REPLAY_LAUNCH, "replay_launch_stubbed")


def _cfg(combo, tmp_path) -> dict[str, str]:
    autostart, sim, bag, rviz, executor, urdf, backend, monitor = combo
    cfg = {"autostart": autostart, "use_sim_time": sim, "bag": bag, "rviz": rviz,
           "executor": executor, "backend": backend, "checkpoint": "/ckpt", "monitor": monitor}
    if urdf:
        path = tmp_path / "arm.urdf"
        path.write_text(URDF)
        cfg["urdf"] = str(path)
    return cfg


def _flatten(actions, seen=None):
    """Actions plus the entities nested in event handlers and events (each once)."""
    seen = set() if seen is None else seen
    out = []
    for action in actions:
        if id(action) in seen:
            continue
        seen.add(id(action))
        out.append(action)
        nested = [v for v in action.args + tuple(action.kwargs.values())
                  if isinstance(v, Recorded)]
        nested += [e for e in action.kwargs.get("entities", []) if isinstance(e, Recorded)]
        out.extend(_flatten(nested, seen))
    return out


def _of(actions, cls_name):
    return [a for a in _flatten(actions) if type(a).__name__ == cls_name]


# ---------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_files_compile(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)


def test_generate_launch_description_declares_every_argument(stubbed):
    pi0, rep = stubbed
    for module in (pi0, rep):
        ld = module.generate_launch_description()
        entities = ld.args[0]
        declared = [e.args[0] for e in entities if type(e).__name__ == "DeclareLaunchArgument"]
        assert declared == list(module.ARGUMENTS)
        opaque = [e for e in entities if type(e).__name__ == "OpaqueFunction"]
        assert len(opaque) == 1 and opaque[0].kwargs["function"] is module.launch_setup


@pytest.mark.parametrize("supported", (False, True), ids=("event_chain", "autostart"))
@pytest.mark.parametrize("combo", COMBINATIONS, ids=lambda c: "-".join(map(str, c)))
def test_every_combination_stubbed(stubbed, combo, supported, tmp_path):
    pi0, _ = stubbed
    cfg = _cfg(combo, tmp_path)
    context = {**{k: d for k, (d, _) in pi0.ARGUMENTS.items()}, **cfg}
    actions = pi0.launch_setup(context) if not supported else pi0.make_actions(
        context, autostart_supported=True)
    autostart = cfg["autostart"] == "true"
    sim = cfg["use_sim_time"] == "true"
    lifecycle = {n.kwargs["executable"]: n for n in _of(actions, "LifecycleNode")}
    with_executor = cfg["executor"] == "true"
    assert sorted(lifecycle) == sorted(["pi0_policy_node"] + ["pi0_executor_node"] * with_executor)
    policy = lifecycle["pi0_policy_node"]
    kw = policy.kwargs
    assert (kw["package"], kw["executable"], kw["name"]) == (
        "pi0_ros", "pi0_policy_node", "pi0_policy_node")
    params_file, overrides = kw["parameters"]
    assert params_file == pi0.ARGUMENTS["params_file"][0]
    assert overrides["use_sim_time"] is sim and overrides["checkpoint"] == "/ckpt"
    assert ("model.backend" in overrides) == bool(cfg["backend"])
    for node in lifecycle.values():
        assert node.kwargs.get("autostart", False) is (autostart and supported)
    if with_executor:
        executor = lifecycle["pi0_executor_node"]
        # config/policy_node.yaml has no executor section: its /** parameters are the policy's.
        assert executor.kwargs["parameters"] == [
            pi0._config("executor.yaml"), {"use_sim_time": sim}]
    changes = [e.kwargs["event"] for e in _of(actions, "EmitEvent")]
    if autostart and not supported:
        from lifecycle_msgs.msg import Transition

        # Each lifecycle node: configure at start, activate on configuring -> inactive.
        for node in lifecycle.values():
            mine = sorted(c.kwargs["transition_id"] for c in changes
                          if c.kwargs["lifecycle_node_matcher"] == ("matches_action", node))
            assert mine == [Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE]
            handlers = [h for h in _of(actions, "OnStateTransition")
                        if h.kwargs["target_lifecycle_node"] is node
                        and h.kwargs.get("goal_state") == "inactive"]
            assert len(handlers) == 1 and handlers[0].kwargs["start_state"] == "configuring"
        assert len(changes) == 2 * len(lifecycle)
    else:
        assert changes == []
    assert not [n for n in _of(actions, "Node") if n.kwargs["executable"] == "pi0_executor_node"]
    players = _of(actions, "ExecuteProcess")
    if cfg["bag"]:
        (player,) = players
        cmd = player.kwargs["cmd"]
        assert cmd[1:4] == ["-m", "pi0_ros.tools.replay", "BAG"]
        assert "--live" in cmd and "--clock" in cmd
        top_level = [a for a in actions if type(a).__name__ == "ExecuteProcess"]
        assert bool(top_level) != autostart  # with autostart it starts once the policy is active
    else:
        assert players == []
    rviz = [n for n in _of(actions, "Node") if n.kwargs["package"] == "rviz2"]
    assert len(rviz) == (cfg["rviz"] == "true")
    if rviz:
        assert rviz[0].kwargs["arguments"] == ["-d", pi0.ARGUMENTS["rviz_config"][0]]
    monitors = [n for n in _of(actions, "Node") if n.kwargs["package"] == "rqt_robot_monitor"]
    assert len(monitors) == (cfg["monitor"] == "true")
    ghost = [n for n in _of(actions, "Node") if n.kwargs["package"] == "robot_state_publisher"]
    assert len(ghost) == ("urdf" in cfg)
    if ghost:
        assert ghost[0].kwargs["parameters"][0]["frame_prefix"] == "planned/"
        assert ("joint_states", "/pi0_policy_node/planned_joint_states") in ghost[0].kwargs[
            "remappings"]


def test_explicit_executor_params_file(stubbed, tmp_path):
    pi0, _ = stubbed
    exec_file = tmp_path / "exec.yaml"
    exec_file.write_text("pi0_executor_node:\n  ros__parameters: {}\n")
    actions = pi0.make_actions({"executor_params_file": str(exec_file)},
                               autostart_supported=True)
    (executor,) = [n for n in _of(actions, "LifecycleNode")
                   if n.kwargs["executable"] == "pi0_executor_node"]
    assert executor.kwargs["parameters"] == [str(exec_file), {"use_sim_time": False}]


def _node(actions, executable):
    (node,) = [n for n in _of(actions, "LifecycleNode") if n.kwargs["executable"] == executable]
    return node


def test_params_file_found_in_the_installed_share_directory(stubbed, tmp_path, monkeypatch):
    """`params_file:=config/droid_policy.yaml` (the launch docstring, docs/REPLAY.md) works from
    any directory: a relative path not found here is looked up in share/pi0_ros."""
    pi0, _ = stubbed
    share = tmp_path / "install" / "share" / "pi0_ros"
    (share / "config").mkdir(parents=True)
    for name in ("droid_policy.yaml", "executor.yaml", "policy_node.yaml"):
        (share / "config" / name).write_text((ROOT / "config" / name).read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(pi0, "share_dir", lambda: share)
    actions = pi0.make_actions({"params_file": "config/droid_policy.yaml"},
                               autostart_supported=True)
    installed = str(share / "config" / "droid_policy.yaml")
    assert _node(actions, "pi0_policy_node").kwargs["parameters"][0] == installed
    # The executor gets the file's pi0_executor_node section (the Panda joints).
    executor_sources = _node(actions, "pi0_executor_node").kwargs["parameters"]
    assert executor_sources[1]["joint_names"][0] == "panda_joint1"
    # A file in the current directory wins over the installed one.
    (elsewhere / "config").mkdir()
    (elsewhere / "config" / "droid_policy.yaml").write_text("/**:\n  ros__parameters: {}\n")
    actions = pi0.make_actions({"params_file": "config/droid_policy.yaml"},
                               autostart_supported=True)
    assert _node(actions, "pi0_policy_node").kwargs["parameters"][0] == str(
        elsewhere / "config" / "droid_policy.yaml")
    with pytest.raises(ValueError, match=r"params_file:='config/nope.yaml': no such file"):
        pi0.make_actions({"params_file": "config/nope.yaml"})


def test_loop_argument_reaches_a_player_that_loops(stubbed):
    """`loop:=true` passes --loop, and pi0-ros-replay accepts it as a live option (it used to be
    swallowed by the live mode's argument parsing and the bag played once)."""
    pi0, rep = stubbed
    (player,) = rep.make_actions({"bag": "BAG", "nodes": "false", "loop": "true"})
    cmd = player.kwargs["cmd"]
    assert cmd[-1] == "--loop"
    from pi0_ros.tools import replay

    args = replay.build_parser().parse_args(cmd[3:])
    assert args.live and args.loop and args.clock


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    from pi0_ros.tools import make_demo

    return make_demo.make_checkpoint(tmp_path_factory.mktemp("demo") / "checkpoint")


def test_default_launch_configures_on_the_demo_checkpoint(stubbed, demo_checkpoint):
    """README: `ros2 launch pi0_ros pi0.launch.py checkpoint:=DIR` on the demo checkpoint. The
    shipped config/policy_node.yaml and config/executor.yaml, as the launch file passes them,
    configure the policy (load + warm-up: what on_configure runs, so the node reaches active) and
    an executor commanding the joints the chunks name."""
    from pi0_ros.pipeline import PolicyPipeline, load_policy
    from pi0_ros.ros import conversions as conv
    from pi0_ros.ros.sync import make_synchronizer
    from pi0_ros.tools import replay, replay_executor

    pi0, _ = stubbed
    actions = pi0.make_actions({"checkpoint": str(demo_checkpoint)}, autostart_supported=True)
    params_file, overrides = _node(actions, "pi0_policy_node").kwargs["parameters"]
    params = replay.node_parameters(params_file, "pi0_policy_node")
    params.update({k: v for k, v in overrides.items() if k != "use_sim_time"})
    params.update({"model.device": "cpu", "model.warmup": 1})  # speed only
    config = replay.policy_config(params)
    policy = load_policy(config, tuple(c.slot for c in config.cameras))
    try:
        pipe = PolicyPipeline(config, clock=lambda: 1, image_of=conv.to_rgb,
                              state_of=conv.joint_state_to_vector, make_sync=make_synchronizer)
        pipe.bind(policy)  # raises when the action joints do not fit the checkpoint
    finally:
        policy.close()
    exec_params: dict = {}
    for source in _node(actions, "pi0_executor_node").kwargs["parameters"]:
        exec_params.update(replay.node_parameters(source, "pi0_executor_node")
                           if isinstance(source, str) else source)
    exec_params.pop("use_sim_time")
    exec_config = replay_executor.executor_config(exec_params, config)
    assert tuple(exec_config.executor.joint_names) == tuple(config.action_joint_names)
    assert set(config.action_joint_names) <= set(config.state_joint_names)


def test_bad_arguments_raise(stubbed):
    pi0, rep = stubbed
    with pytest.raises(ValueError, match="backend"):
        pi0.make_actions({"backend": "warp"})
    with pytest.raises(ValueError, match="boolean"):
        pi0.make_actions({"use_sim_time": "maybe"})
    with pytest.raises(ValueError):
        pi0.make_actions({"bag": "b", "rate": "fast"})
    with pytest.raises(ValueError, match="bag"):
        rep.make_actions({"bag": ""})


@pytest.mark.parametrize("nodes", ("true", "false"))
def test_replay_launch_stubbed(stubbed, nodes):
    _, rep = stubbed
    actions = rep.make_actions({"bag": "BAG", "nodes": nodes, "rate": "2.0"})
    if nodes == "false":
        (player,) = actions
        assert type(player).__name__ == "ExecuteProcess"
        assert player.kwargs["cmd"][3:] == ["BAG", "--live", "--clock", "--rate", "2.0"]
    else:
        (include,) = actions
        assert type(include).__name__ == "IncludeLaunchDescription"
        args = dict(include.kwargs["launch_arguments"])
        assert args["use_sim_time"] == "true" and args["bag"] == "BAG" and args["rate"] == "2.0"
        assert include.args[0].args[0] == str(PI0_LAUNCH)


def test_supports_autostart_detects_the_keyword(stubbed):
    pi0, _ = stubbed
    assert pi0.supports_autostart() is False  # the stand-in LifecycleNode takes **kwargs only

    class NewLifecycleNode:
        def __init__(self, *, name=None, namespace=None, autostart=False, **kwargs):
            pass

    pi0.LifecycleNode = NewLifecycleNode
    assert pi0.supports_autostart() is True


# ---------------------------------------------------------------------------------------------
# the real launch / launch_ros


@pytest.mark.skipif(not _launch_available(), reason="launch / launch_ros are not importable "
                    "(ROS 2 launch is not pip-installable; covered by the stand-in tests)")
def test_every_combination_real_launch(tmp_path):
    from launch import LaunchContext, LaunchDescription, LaunchIntrospector
    from launch.actions import IncludeLaunchDescription
    from launch_ros.actions import LifecycleNode

    pi0 = _load(PI0_LAUNCH, "pi0_launch_real")
    ld = pi0.generate_launch_description()
    assert isinstance(ld, LaunchDescription)
    LaunchIntrospector().format_launch_description(ld)
    for combo in COMBINATIONS:
        context = LaunchContext()
        context.launch_configurations.update(
            {**{k: d for k, (d, _) in pi0.ARGUMENTS.items()}, **_cfg(combo, tmp_path)})
        actions = pi0.launch_setup(context)
        expected = 1 + (_cfg(combo, tmp_path)["executor"] == "true")
        nodes = [a for a in actions if isinstance(a, LifecycleNode)]
        assert len(nodes) == expected, combo
    rep = _load(REPLAY_LAUNCH, "replay_launch_real")
    assert isinstance(rep.generate_launch_description(), LaunchDescription)
    (include,) = rep.make_actions({"bag": "BAG", "nodes": "true"})
    assert isinstance(include, IncludeLaunchDescription)
