"""Bring up pi0_ros: the policy (lifecycle) node, the action executor, optionally a bag and rviz2.

    ros2 launch pi0_ros pi0.launch.py params_file:=config/droid_policy.yaml \\
        checkpoint:=/path/to/pi05_droid backend:=cuda_graph
    ros2 launch pi0_ros pi0.launch.py checkpoint:=out/demo/checkpoint \\
        params_file:=out/demo/demo_params.yaml bag:=out/demo/bag use_sim_time:=true rviz:=true

The policy node is a lifecycle node brought to ``active`` automatically (``autostart:=true``):
through launch_ros' ``autostart`` where this launch_ros has it (Kilted, later Jazzy releases),
otherwise through the event-handler chain of ros2/launch_ros ``lifecycle_pub_sub_launch.py``
(emit *configure* at start, emit *activate* when the node reaches ``inactive`` from
``configuring`` -- so a later manual deactivate is not undone). A failed configure leaves the
node ``unconfigured`` with the reason in its log.

``bag:=DIR`` plays a rosbag2 bag into the nodes with ``pi0-ros-replay DIR --live --clock`` once
the policy is active (set ``use_sim_time:=true`` so the nodes run on the bag's clock).
``urdf:=FILE`` starts a second robot_state_publisher on the planned joint state (frame prefix
``planned/``) for the translucent ghost robot of ``config/pi0_ros.rviz``.

A relative ``params_file`` / ``executor_params_file`` / ``rviz_config`` / ``urdf`` is looked up in
the current directory, then in the package's share directory (``config/droid_policy.yaml`` works
from anywhere once installed); a file found in neither is refused at launch time.

All node logic is in ``launch_setup`` / ``make_actions``, which turn resolved argument strings into
actions, so tests can build every argument combination.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from launch import LaunchDescription
from launch.actions import (
    DeclareLaunchArgument,
    EmitEvent,
    ExecuteProcess,
    LogInfo,
    OpaqueFunction,
    RegisterEventHandler,
)
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

from pi0_ros.pipeline.config import BACKEND_CHOICES, DTYPES

PACKAGE = "pi0_ros"
POLICY_NODE = "pi0_policy_node"
EXECUTOR_NODE = "pi0_executor_node"
# Backend and numeric-format names come from the engine registry (pi0_ros/engine/registry.py),
# as the node's parameters do: a value accepted here is one the engine can build.
BACKENDS = ("", *BACKEND_CHOICES)
FORMATS = ("", *DTYPES)
TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")


def share_dir() -> Path:
    """share/pi0_ros when installed, the source checkout otherwise (this file is in launch/)."""
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory(PACKAGE))
    except Exception:  # not installed / no ament index: PackageNotFoundError, LookupError
        return Path(__file__).resolve().parent.parent


def _config(name: str) -> str:
    return str(share_dir() / "config" / name)


def resolve_file(value: str, arg: str) -> str:
    """A file named by launch argument ``arg``: as given when it exists (relative to the current
    directory), else relative to the package's share directory (``config/droid_policy.yaml``
    works from any directory once installed), else a ValueError naming both places."""
    path = Path(value).expanduser()
    if path.is_file():
        return str(path.resolve())
    shared = share_dir() / value
    if not path.is_absolute() and shared.is_file():
        return str(shared)
    where = f"{path.resolve()}" + ("" if path.is_absolute() else f" nor {shared}")
    raise ValueError(f"launch argument {arg}:={value!r}: no such file ({where})")


# name -> (default, description)
ARGUMENTS: dict[str, tuple[str, str]] = {
    "params_file": (_config("policy_node.yaml"), "policy node ros-args parameter file"),
    "executor_params_file": ("", "executor node parameter file; '' = config/executor.yaml "
                             "overlaid with params_file (its pi0_executor_node section, if any)"),
    "checkpoint": ("", "checkpoint directory; '' = the params file's `checkpoint`"),
    "backend": ("", f"inference backend {BACKENDS[1:]}; '' = the params file's model.backend"),
    "dtype": ("", f"numeric format {FORMATS[1:]}; '' = the params file's model.dtype"),
    "engine_dir": ("", "TensorRT engine directory (backend tensorrt); '' = the params file's"),
    "prompt": ("", "language instruction; '' = the params file's `prompt`"),
    "namespace": ("", "namespace of both nodes"),
    "use_sim_time": ("false", "run the nodes on /clock (true when playing a bag)"),
    "autostart": ("true", "configure and activate the policy node automatically"),
    "executor": ("true", "start the action executor node"),
    "bag": ("", "rosbag2 bag to play into the nodes (pi0-ros-replay BAG --live --clock)"),
    "rate": ("1.0", "bag playback rate"),
    "loop": ("false", "replay the bag in a loop"),
    "rviz": ("false", "start rviz2 with config/pi0_ros.rviz"),
    "rviz_config": (_config("pi0_ros.rviz"), "rviz2 configuration file"),
    "urdf": ("", "URDF file for the planned-state ghost robot in rviz; '' = no ghost"),
    "monitor": ("false", "start rqt_robot_monitor on /diagnostics (rviz2 has no such view)"),
    "log_level": ("info", "log level of the nodes"),
}


def supports_autostart() -> bool:
    """Whether this launch_ros' LifecycleNode takes ``autostart`` (added in Dec 2024,
    ros2/launch_ros 2548b40; Kilted and later Jazzy releases)."""
    try:
        return "autostart" in inspect.signature(LifecycleNode.__init__).parameters
    except (TypeError, ValueError):
        return False


def lifecycle_bringup(node: LifecycleNode, name: str, autostart: bool,
                      autostart_supported: bool) -> list:
    """``node`` plus what brings it to ``active`` when ``autostart`` and launch_ros cannot:
    configure once the process starts, activate when it reaches ``inactive`` from
    ``configuring`` (ros2/launch_ros ``lifecycle_pub_sub_launch.py``), so a later manual
    deactivate is not undone."""
    if not autostart or autostart_supported:
        return [node]
    return [
        RegisterEventHandler(OnStateTransition(
            target_lifecycle_node=node, start_state="configuring", goal_state="inactive",
            entities=[
                LogInfo(msg=f"{name} configured, activating"),
                EmitEvent(event=ChangeState(
                    lifecycle_node_matcher=matches_action(node),
                    transition_id=Transition.TRANSITION_ACTIVATE,
                )),
            ],
        )),
        node,
        EmitEvent(event=ChangeState(
            lifecycle_node_matcher=matches_action(node),
            transition_id=Transition.TRANSITION_CONFIGURE,
        )),
    ]


def _bool(cfg: dict[str, str], name: str) -> bool:
    value = cfg[name].strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ValueError(f"launch argument {name}:={cfg[name]!r} is not a boolean (true / false)")


def declare_arguments() -> list:
    return [
        DeclareLaunchArgument(name, default_value=default, description=description)
        for name, (default, description) in ARGUMENTS.items()
    ]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([*declare_arguments(), OpaqueFunction(function=launch_setup)])


def launch_setup(context, *args, **kwargs) -> list:
    cfg = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    return make_actions(cfg)


def make_actions(cfg: dict[str, str], *, autostart_supported: bool | None = None) -> list:
    """Resolved argument strings -> launch actions (raises ValueError on a bad argument)."""
    cfg = {**{k: d for k, (d, _) in ARGUMENTS.items()}, **cfg}
    if cfg["backend"] not in BACKENDS:
        raise ValueError(f"launch argument backend:={cfg['backend']!r}: one of {BACKENDS[1:]}")
    if cfg["dtype"] not in FORMATS:
        raise ValueError(f"launch argument dtype:={cfg['dtype']!r}: one of {FORMATS[1:]}")
    sim_time, autostart = _bool(cfg, "use_sim_time"), _bool(cfg, "autostart")
    if autostart_supported is None:
        autostart_supported = supports_autostart()
    overrides: dict[str, object] = {"use_sim_time": sim_time}
    for arg, param in (("checkpoint", "checkpoint"), ("backend", "model.backend"),
                       ("dtype", "model.dtype"), ("engine_dir", "tensorrt.engine_dir"),
                       ("prompt", "prompt")):
        if cfg[arg]:
            overrides[param] = cfg[arg]
    for arg in ("params_file", "executor_params_file", "rviz_config", "urdf"):
        if cfg[arg] and (arg != "rviz_config" or _bool(cfg, "rviz")):
            cfg[arg] = resolve_file(cfg[arg], arg)
    ns = cfg["namespace"]
    ros_args = ["--log-level", cfg["log_level"]]
    extra = {"autostart": True} if autostart and autostart_supported else {}
    policy = LifecycleNode(
        package=PACKAGE, executable="pi0_policy_node", name=POLICY_NODE, namespace=ns,
        parameters=[cfg["params_file"], overrides], ros_arguments=ros_args, output="screen",
        **extra,
    )
    actions: list = lifecycle_bringup(policy, POLICY_NODE, autostart, autostart_supported)
    if _bool(cfg, "executor"):
        # The executor is a lifecycle node too; it starts commanding once it is active and has
        # read /joint_states, and holds when the policy's chunks stop.
        executor = LifecycleNode(
            package=PACKAGE, executable="pi0_executor_node", name=EXECUTOR_NODE, namespace=ns,
            parameters=executor_parameters(cfg, sim_time),
            ros_arguments=ros_args, output="screen", **extra,
        )
        actions += lifecycle_bringup(executor, EXECUTOR_NODE, autostart, autostart_supported)
    if cfg["bag"]:
        player = bag_player(cfg["bag"], cfg["rate"], _bool(cfg, "loop"))
        if autostart:
            # Play once the policy is active, so no input is lost while the model loads.
            actions.append(RegisterEventHandler(OnStateTransition(
                target_lifecycle_node=policy, goal_state="active", handle_once=True,
                entities=[LogInfo(msg=f"{POLICY_NODE} active, playing {cfg['bag']}"), player],
            )))
        else:
            actions.append(player)
    if cfg["urdf"]:
        actions.extend(ghost_robot(cfg["urdf"], ns, sim_time))
    if _bool(cfg, "rviz"):
        actions.append(Node(
            package="rviz2", executable="rviz2", name="rviz2",
            arguments=["-d", cfg["rviz_config"]], parameters=[{"use_sim_time": sim_time}],
            output="screen",
        ))
    if _bool(cfg, "monitor"):
        actions.append(Node(package="rqt_robot_monitor", executable="rqt_robot_monitor",
                            name="pi0_diagnostics_monitor", output="screen"))
    return actions


def executor_parameters(cfg: dict[str, str], sim_time: bool) -> list:
    """The executor's parameter sources: an explicit file, or the documented defaults of
    config/executor.yaml overlaid with the ``pi0_executor_node`` section of params_file (if it
    has one), so a robot file such as config/droid_policy.yaml configures both nodes. Only that
    section: the file's ``/**`` parameters are the policy node's (config/policy_node.yaml) and
    would be undeclared parameters of the executor."""
    if cfg["executor_params_file"]:
        return [cfg["executor_params_file"], {"use_sim_time": sim_time}]
    section = node_section(cfg["params_file"], EXECUTOR_NODE)
    return [_config("executor.yaml"), *([section] if section else []),
            {"use_sim_time": sim_time}]


def node_section(path: str, node: str) -> dict:
    """The ``ros__parameters`` of ``node``'s own sections of a parameter file (keys ``node``,
    ``/node``, ``/ns/node``, ``/**/node``; not ``/**``), merged in file order."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text()) or {}
    out: dict = {}
    for key, section in doc.items() if isinstance(doc, dict) else ():
        if str(key).rstrip("/").split("/")[-1] == node and isinstance(section, dict):
            out.update(section.get("ros__parameters") or {})
    return out


def bag_player(bag: str, rate: str, loop: bool) -> ExecuteProcess:
    """``pi0-ros-replay BAG --live --clock`` (run as a module: works wherever pi0_ros imports)."""
    float(rate)  # fail at launch time on a bad rate
    cmd = [sys.executable, "-m", "pi0_ros.tools.replay", bag, "--live", "--clock", "--rate", rate]
    if loop:
        cmd.append("--loop")
    return ExecuteProcess(cmd=cmd, name="pi0_bag_player", output="screen")


def ghost_robot(urdf: str, ns: str, sim_time: bool) -> list:
    """robot_state_publisher on the planned joint state, frames prefixed ``planned/``, pinned to
    the measured robot by an identity static transform of the root link."""
    text = Path(urdf).read_text()
    root = _urdf_root(text)
    planned = f"/{ns.strip('/')}/{POLICY_NODE}" if ns.strip("/") else f"/{POLICY_NODE}"
    return [
        Node(
            package="robot_state_publisher", executable="robot_state_publisher",
            name="planned_state_publisher", namespace=ns,
            parameters=[{"robot_description": text, "frame_prefix": "planned/",
                         "use_sim_time": sim_time}],
            remappings=[("joint_states", f"{planned}/planned_joint_states"),
                        ("robot_description", "planned_robot_description")],
            output="screen",
        ),
        Node(
            package="tf2_ros", executable="static_transform_publisher",
            name="planned_root_tf", namespace=ns,
            arguments=["--frame-id", root, "--child-frame-id", f"planned/{root}"],
            parameters=[{"use_sim_time": sim_time}],
        ),
    ]


def _urdf_root(text: str) -> str:
    """The root link of a URDF (a link that is no joint's child)."""
    import xml.etree.ElementTree as ET

    robot = ET.fromstring(text)
    links = [link.get("name") for link in robot.findall("link")]
    children = {j.find("child").get("link") for j in robot.findall("joint")
                if j.find("child") is not None}
    roots = [name for name in links if name not in children]
    if len(roots) != 1:
        raise ValueError(f"URDF must have one root link, found {roots}")
    return roots[0]
