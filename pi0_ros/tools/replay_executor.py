"""The executor side of pi0-ros-replay: the executor node's ``ExecutorDriver`` on bag time,
configured by the executor node's own parameter table and publishing its messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pi0_ros.tools.replay_bag import NS_PER_S, ReplayError

if TYPE_CHECKING:
    from pi0_ros.tools.replay import ChunkRecord


class ControlExecutor:
    """The live executor node's :class:`pi0_ros.control.ExecutorDriver` on bag time, configured
    by the node's parameter mapping and publishing its messages (``ros/executor_params.py``).

    Like the node: every recorded joint state goes to ``joint_state`` (the first usable one
    initializes the commanded state, later ones check the tracking tolerance and feed the
    feedback timeout); chunks are submitted at their arrival with ``t0`` = observation stamp;
    ticks run at ``control_rate`` from the first chunk's arrival on.
    """

    def __init__(self, node_config: Any, state_names: Sequence[str], node: str) -> None:
        from pi0_ros.control import ExecutorDriver

        self.cfg = node_config
        self.driver = ExecutorDriver.from_node_config(node_config)
        self.period = int(round(NS_PER_S / node_config.control_rate))
        self._state_names = tuple(state_names)
        self._next: int | None = None
        self._origin: int | None = None
        ns = f"/{node.strip('/')}"
        self._topics = {
            "joint_state": (_resolve(node_config.command_topic, ns),
                            "sensor_msgs/msg/JointState"),
            "forward": (_resolve(node_config.forward_topic, ns),
                        "std_msgs/msg/Float64MultiArray"),
            "trajectory": (_resolve(node_config.trajectory_out_topic, ns),
                           "trajectory_msgs/msg/JointTrajectory"),
        }
        ex = node_config.executor
        self.name = (f"pi0_ros.control.ExecutorDriver ({ex.strategy}, {ex.interpolation}, "
                     f"{node_config.control_rate:g} Hz)")

    def _seconds(self, t: int) -> float:
        if self._origin is None:
            self._origin = t
        return (t - self._origin) / NS_PER_S

    def joint_state(self, t: int, state: np.ndarray | None,
                    names: Sequence[str] | None = None) -> None:
        """A measured joint state at bag time ``t`` (names default to the policy's state
        joints)."""
        if state is not None:
            self.driver.measure(self._state_names if names is None else names, state,
                                self._seconds(t))

    def add_chunk(self, rec: ChunkRecord, config: Any, state: np.ndarray | None) -> None:
        t = rec.arrival_ns
        if not self.driver.initialized:  # (later states come through joint_state, on time)
            self.joint_state(t, state)
        ok, reason = self.driver.submit(self._seconds(rec.stamp_ns), config.action_dt,
                                        config.action_joint_names,
                                        rec.actions.astype(np.float64), self._seconds(t),
                                        rtc_delay=rec.rtc_delay)
        if reason != "no_joint_state" and self._next is None:
            self._next = t

    def next_tick(self) -> int | None:
        return self._next

    def tick(self, t: int) -> Any:
        assert self._next is not None
        self._next = t + self.period
        return self.driver.tick(self._seconds(t))

    def messages(self, t: int, command: Any) -> list[tuple[str, str, Any]]:
        from pi0_ros.ros.executor_params import command_messages

        return [(*self._topics[key], msg)
                for key, msg in command_messages(self.cfg, command, t).items()]

    def events(self) -> Mapping[str, int]:
        return self.driver.counters()

    def diagnostics(self, t: int) -> Any:
        """The driver's ``Diagnostics`` (level, message, values) at bag time ``t``."""
        return self.driver.diagnostics(self._seconds(t))


def _resolve(topic: str, node: str) -> str:
    """A node-relative topic (``~/x`` or ``x``) as the live node ``node`` (``name``,
    ``/name`` or ``/ns/name``) would resolve it: ``~/x`` -> ``/ns/name/x``, ``x`` -> ``/ns/x``."""
    fqn = "/" + node.strip("/")
    if topic.startswith("~/"):
        return f"{fqn}/{topic[2:]}"
    return topic if topic.startswith("/") else f"{fqn.rsplit('/', 1)[0]}/{topic}"


def executor_config(params: Mapping[str, Any], config: Any) -> Any:
    """The live executor node's configuration from its parameter-file section ``params``;
    parameters the file does not set take the node's defaults, except ``joint_names``, which
    defaults to the policy's action joints (the executor must command the joints the chunks
    name)."""
    from pi0_ros.ros.executor_params import PARAMETERS, config_from_parameters

    unknown = sorted(set(params) - set(PARAMETERS) - {"use_sim_time"})
    if unknown:
        raise ReplayError(f"executor parameters the node does not declare: {unknown}")
    values = {name: default for name, (default, _) in PARAMETERS.items()}
    values["joint_names"] = list(config.action_joint_names)
    values.update(params)
    try:
        return config_from_parameters(values.__getitem__)
    except ValueError as exc:
        raise ReplayError(f"executor parameters: {exc}") from exc


def make_executor(params: Mapping[str, Any], config: Any, node: str) -> ControlExecutor:
    """The executor of ``pi0_ros.control`` configured from the executor node's parameters."""
    return ControlExecutor(executor_config(params, config), config.state_joint_names, node)
