"""Shared harness of the policy-node tests (no tests here): a private rclpy Context on a fresh
ROS_DOMAIN_ID, the node under test and a 'robot' node spun by one executor thread, a fake policy
whose timing and faults the tests control, and helpers that wait on events, never on sleeps.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

import rclpy  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402
from visualization_msgs.msg import MarkerArray  # noqa: E402

from ros_helpers import WAIT, fresh_domain_id, wait_for  # noqa: E402

from pi0_ros.ros import conversions as conv  # noqa: E402
from pi0_ros.ros.node import PolicyNode, make_executor  # noqa: E402
from pi0_ros.ros.params import EMPTY_ARRAY_TYPES  # noqa: E402

STATE_NAMES = ["j1", "j2", "j3"]
ACTION_NAMES = ["a1", "a2", "a3"]
HORIZON = 8
STEP = 0.1  # fake policy: actions[k] = state + k * STEP
TRANSITIONS = {
    "configure": Transition.TRANSITION_CONFIGURE,
    "activate": Transition.TRANSITION_ACTIVATE,
    "deactivate": Transition.TRANSITION_DEACTIVATE,
    "cleanup": Transition.TRANSITION_CLEANUP,
    "shutdown": Transition.TRANSITION_UNCONFIGURED_SHUTDOWN,
    "inactive_shutdown": Transition.TRANSITION_INACTIVE_SHUTDOWN,
    "active_shutdown": Transition.TRANSITION_ACTIVE_SHUTDOWN,
}


@dataclass
class FakeControl:
    """What the fake policy does next; shared between the test and the policy instances."""

    delay: float = 0.0
    raise_next: int = 0
    gate: threading.Event | None = None
    started: threading.Event = field(default_factory=threading.Event)
    calls: int = 0
    seen_prompts: list[str] = field(default_factory=list)
    seen_shapes: list[dict] = field(default_factory=list)
    action_dim: int | None = None  # None: len(state)
    fail_load: Exception | None = None
    load_gate: threading.Event | None = None  # the factory (configure) waits on it
    loading: threading.Event = field(default_factory=threading.Event)
    state_dim: int | None = None  # exposed as policy.state_dim (a real Policy's)
    instances: int = 0
    closed: int = 0


class FakePolicy:
    """``infer`` returns actions[k] = state + k * STEP (H = HORIZON); faults from FakeControl."""

    def __init__(self, control: FakeControl, slots: tuple[str, ...]) -> None:
        self.control = control
        self.camera_slots = tuple(s or f"slot{i}" for i, s in enumerate(slots))
        self.model_name = "fake_pi05"
        self.noise_shape = None  # takes no noise
        self.state_dim = control.state_dim  # a real Policy's settings.state_dim
        self.rtc = None
        control.instances += 1

    def prompt_fit(self, prompt, state):
        return None

    def status(self):
        return {}

    def prepare_image(self, rgb: np.ndarray, name: str) -> np.ndarray:
        return rgb

    def infer(self, obs: dict, noise=None) -> dict:
        c = self.control
        c.calls += 1
        c.seen_prompts.append(obs["prompt"])
        c.seen_shapes.append({k: v.shape for k, v in obs.items() if isinstance(v, np.ndarray)})
        c.started.set()
        if c.gate is not None:
            c.gate.wait(WAIT)
        if c.delay:
            time.sleep(c.delay)  # the model's compute time
        if c.raise_next:
            c.raise_next -= 1
            raise RuntimeError("injected inference fault")
        state = np.asarray(obs["state"], np.float32)
        dim = c.action_dim or state.shape[0]
        base = np.resize(state, dim)
        actions = base[None, :] + STEP * np.arange(HORIZON, dtype=np.float32)[:, None]
        return {"actions": actions.astype(np.float32), "policy_timing": {"infer_ms": 0.0}}

    def close(self) -> None:
        self.control.closed += 1


def fake_factory(control: FakeControl) -> Callable:
    def factory(config, slots):
        control.loading.set()
        if control.load_gate is not None:
            assert control.load_gate.wait(WAIT), "load gate never opened"
        if control.fail_load is not None:
            raise control.fail_load
        return FakePolicy(control, tuple(slots))

    return factory


def expected_actions(state: np.ndarray) -> np.ndarray:
    return (state[None, :] + STEP * np.arange(HORIZON)[:, None]).astype(np.float32)


def _parameter(name: str, value: Any) -> Parameter:
    """A Parameter; an empty list gets the declared array type (rclpy cannot infer it)."""
    if isinstance(value, list) and not value:
        return Parameter(
            name, getattr(Parameter.Type, EMPTY_ARRAY_TYPES.get(name, "STRING_ARRAY")), []
        )
    return Parameter(name, value=value)


class Harness:
    """The node under test + a 'robot' node publishing inputs and recording outputs."""

    def __init__(
        self,
        overrides: dict[str, Any],
        *,
        control: FakeControl | None = None,
        policy_factory: Callable | None = None,
        node_name: str = "policy",
        namespace: str = "",
    ) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=fresh_domain_id())
        self.control = control or FakeControl()
        params = [_parameter(k, v) for k, v in overrides.items()]
        self.node = PolicyNode(
            node_name,
            namespace=namespace,
            context=self.context,
            parameter_overrides=params,
            policy_factory=policy_factory or fake_factory(self.control),
        )
        self.name = node_name
        self.robot = rclpy.create_node("robot", context=self.context)
        self.lock = threading.Lock()
        self.chunks: list[Any] = []
        self.trajectories: list[JointTrajectory] = []
        self.planned: list[JointState] = []
        self.markers: list[MarkerArray] = []
        self.diagnostics: list[DiagnosticArray] = []
        self._pubs: dict[str, Any] = {}
        ns = f"{namespace.rstrip('/')}/{node_name}"
        try:
            from pi0_ros_msgs.msg import ActionChunk

            self.robot.create_subscription(
                ActionChunk, f"{ns}/action_chunk", self._rec("chunks"), 50
            )
        except ImportError:
            pass
        self.robot.create_subscription(
            JointTrajectory, f"{ns}/trajectory", self._rec("trajectories"), 50
        )
        self.robot.create_subscription(
            JointState, f"{ns}/planned_joint_states", self._rec("planned"), 50
        )
        self.robot.create_subscription(MarkerArray, f"{ns}/markers", self._rec("markers"), 50)
        self.robot.create_subscription(
            DiagnosticArray, "/diagnostics", self._rec("diagnostics"), 50
        )
        self.prompt_pub = self.robot.create_publisher(String, f"{ns}/prompt", 10)
        self.change_state = self.robot.create_client(ChangeState, f"{ns}/change_state")
        self.get_state = self.robot.create_client(GetState, f"{ns}/get_state")
        # As in production (pi0_policy_node's main), the node under test has its own executor
        # (make_executor: single-threaded data path, lifecycle services and /diagnostics on side
        # threads); the robot spins on another thread, so a slow or blocking node callback
        # cannot hide the robot's traffic and vice versa.
        self._closing = False
        self.spin_errors: list[str] = []
        self.executors = []
        self._spins = []
        for node in (self.node, self.robot):
            executor = (make_executor(node, self.context) if node is self.node
                        else SingleThreadedExecutor(context=self.context))
            executor.add_node(node)
            thread = threading.Thread(target=self._spin_forever, args=(executor,), daemon=True)
            thread.start()
            self.executors.append(executor)
            self._spins.append(thread)
        assert self.change_state.wait_for_service(timeout_sec=WAIT)

    def _spin_forever(self, executor: SingleThreadedExecutor) -> None:
        try:
            executor.spin()
        except Exception as exc:  # context shut down by close(), or a callback raised
            if not self._closing:
                # Every later wait would time out: keep the cause for check_spinning().
                self.spin_errors.append(f"{type(exc).__name__}: {exc}")
                raise

    def check_spinning(self) -> None:
        """AssertionError with the cause when a callback raised and ended a spin thread."""
        assert not self.spin_errors, f"an executor stopped spinning: {self.spin_errors}"

    def _rec(self, name: str) -> Callable:
        def callback(msg):
            with self.lock:
                getattr(self, name).append(msg)

        return callback

    # ---- lifecycle through the services ------------------------------------------------------

    def transition(self, label: str, timeout: float = 60.0) -> bool:
        req = ChangeState.Request()
        req.transition.id = TRANSITIONS[label]
        future = self.change_state.call_async(req)
        done = threading.Event()
        future.add_done_callback(lambda _f: done.set())
        if not done.wait(timeout):
            self.check_spinning()
            raise AssertionError(f"change_state {label} did not answer in {timeout} s")
        return future.result().success

    def transition_async(self, label: str):
        req = ChangeState.Request()
        req.transition.id = TRANSITIONS[label]
        return self.change_state.call_async(req)

    def state(self) -> str:
        return self.node.lifecycle_state()

    def set_params(self, **values: Any) -> None:
        results = self.node.set_parameters([_parameter(k, v) for k, v in values.items()])
        assert all(r.successful for r in results), results

    # ---- inputs ------------------------------------------------------------------------------

    def publisher(self, msg_type: type, topic: str) -> Any:
        key = f"{msg_type.__name__}:{topic}"
        if key not in self._pubs:
            self._pubs[key] = self.robot.create_publisher(msg_type, topic, 10)
        return self._pubs[key]

    def wait_for_subscribers(self, topics: list[tuple[type, str]]) -> None:
        for msg_type, topic in topics:
            pub = self.publisher(msg_type, topic)
            wait_for(lambda p=pub: p.get_subscription_count() > 0, what=f"subscriber on {topic}")

    def now_ns(self) -> int:
        return self.robot.get_clock().now().nanoseconds

    def publish(self, msg_type: type, topic: str, msg: Any) -> None:
        self.publisher(msg_type, topic).publish(msg)

    def joint_state(
        self, stamp_ns: int, positions=(0.1, 0.2, 0.3), names=STATE_NAMES
    ) -> JointState:
        return conv.vector_to_joint_state(list(names), np.asarray(positions), stamp_ns=stamp_ns)

    # ---- outputs -----------------------------------------------------------------------------

    def n(self, name: str) -> int:
        with self.lock:
            return len(getattr(self, name))

    def last(self, name: str) -> Any:
        with self.lock:
            return getattr(self, name)[-1]

    def wait_count(self, key: str, at_least: int, timeout: float = WAIT) -> int:
        return wait_for(
            lambda: self.node.counts().get(key, 0) >= at_least and self.node.counts()[key],
            timeout,
            what=f"count {key} >= {at_least} (counts: {self.node.counts()})",
        )

    def close(self) -> None:
        self._closing = True
        try:
            self.node.stop()
        finally:
            for executor in self.executors:
                executor.shutdown(timeout_sec=WAIT)
            self.node.destroy_node()
            self.robot.destroy_node()
            rclpy.try_shutdown(context=self.context)
            for thread in self._spins:
                thread.join(WAIT)
