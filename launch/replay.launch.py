"""Replay a rosbag2 bag against live pi0_ros nodes, on the bag's clock.

    ros2 launch pi0_ros replay.launch.py bag:=out/demo/bag \\
        params_file:=out/demo/demo_params.yaml checkpoint:=out/demo/checkpoint
    ros2 launch pi0_ros replay.launch.py bag:=my_bag nodes:=false   # nodes already running

With ``nodes:=true`` (default) this includes ``pi0.launch.py`` with ``use_sim_time:=true`` and
``bag:=BAG``: the policy node is configured and activated, then the bag is published with
``pi0-ros-replay BAG --live --clock`` (the equivalent of ``ros2 bag play --clock``). With
``nodes:=false`` only the player runs; the nodes must use ``use_sim_time:=true``.

For deterministic offline replay (no ROS graph, byte-identical actions, report and plots) use the
console script instead: ``pi0-ros-replay BAG --config PARAMS.yaml --output OUT``.
"""

from __future__ import annotations

from pathlib import Path

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, OpaqueFunction
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration

HERE = Path(__file__).resolve().parent

# name -> (default, description); None = required
ARGUMENTS: dict[str, tuple[str | None, str]] = {
    "bag": (None, "rosbag2 bag directory (sqlite3 or mcap)"),
    "rate": ("1.0", "playback rate"),
    "loop": ("false", "replay in a loop"),
    "nodes": ("true", "also start the policy and executor nodes (pi0.launch.py)"),
    "params_file": ("", "policy node parameter file; '' = pi0.launch.py's default"),
    "executor_params_file": ("", "executor parameter file; '' = pi0.launch.py's default"),
    "checkpoint": ("", "checkpoint directory; '' = the params file's"),
    "backend": ("", "inference backend (engine registry); '' = the params file's"),
    "dtype": ("", "numeric format (engine registry); '' = the params file's"),
    "rviz": ("false", "start rviz2"),
    "urdf": ("", "URDF for the ghost robot in rviz"),
}


def declare_arguments() -> list:
    out = []
    for name, (default, description) in ARGUMENTS.items():
        if default is None:
            out.append(DeclareLaunchArgument(name, description=description))
        else:
            out.append(DeclareLaunchArgument(name, default_value=default, description=description))
    return out


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([*declare_arguments(), OpaqueFunction(function=launch_setup)])


def launch_setup(context, *args, **kwargs) -> list:
    cfg = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS}
    return make_actions(cfg)


def _load_pi0_launch():
    """pi0.launch.py as a module (launch files are not importable by name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pi0_launch", HERE / "pi0.launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_actions(cfg: dict[str, str]) -> list:
    """Resolved argument strings -> launch actions."""
    if not cfg.get("bag"):
        raise ValueError("launch argument bag:=DIR is required")
    cfg = {**{k: d for k, (d, _) in ARGUMENTS.items() if d is not None}, **cfg}
    pi0 = _load_pi0_launch()
    if not pi0._bool(cfg, "nodes"):
        return [pi0.bag_player(cfg["bag"], cfg["rate"], pi0._bool(cfg, "loop"))]
    forwarded = {
        "bag": cfg["bag"], "rate": cfg["rate"], "loop": cfg["loop"], "use_sim_time": "true",
        "rviz": cfg["rviz"], "urdf": cfg["urdf"], "checkpoint": cfg["checkpoint"],
        "backend": cfg["backend"], "dtype": cfg["dtype"],
    }
    for name in ("params_file", "executor_params_file"):
        if cfg[name]:
            forwarded[name] = cfg[name]
    return [IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(HERE / "pi0.launch.py")),
        launch_arguments=list(forwarded.items()),
    )]
