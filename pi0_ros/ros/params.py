"""Policy-node parameters: one declaration table, one mapping onto frozen config dataclasses.

``PARAMETERS`` lists every parameter with its default and description; ``declare_parameters``
declares them (with descriptors) on a node, and ``config_from_parameters`` is the one function
that maps their values onto :class:`NodeConfig`. The dataclasses validate in ``__post_init__`` and
raise ``ValueError`` naming the parameter and the value, so an invalid parameter fails
``on_configure`` with that message and a later configure after fixing it succeeds.

Cameras are parallel arrays (``cameras.topics`` / ``cameras.slots`` / ``cameras.transports``)
because ROS parameters cannot be lists of structs and every parameter must be declared in
``__init__`` before a lifecycle configure reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_CAMERAS = 3
BACKENDS = ("auto", "eager", "cuda_graph", "fp8", "tensorrt")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TRANSPORTS = ("raw", "compressed")
RELIABILITIES = ("best_effort", "reliable")

# name -> (default, description). A ``list`` default is declared as a typed array parameter that
# starts uninitialised (rclpy cannot infer the element type of an empty list) and reads as that
# default until set.
PARAMETERS: dict[str, tuple[Any, str]] = {
    "checkpoint": ("", "checkpoint directory (openpi or LeRobot layout); required"),
    "tokenizer": ("", "SentencePiece tokenizer.model path; '' = looked up from the checkpoint"),
    "norm_stats": (
        "",
        "asset id under <checkpoint>/assets/ or a norm_stats.json path; '' = the checkpoint's",
    ),
    "model.device": (
        "auto",
        "torch device: 'auto' (cuda if available, else cpu), 'cpu', 'cuda:0'",
    ),
    "model.dtype": ("auto", f"one of {DTYPES}; 'auto' = bfloat16 on cuda, float32 on cpu"),
    "model.backend": ("auto", f"one of {BACKENDS}; 'auto' = cuda_graph on cuda, eager on cpu"),
    "model.num_steps": (10, "flow-matching denoising steps"),
    "model.warmup": (2, "inferences run in on_configure before activation (warm-up, capture)"),
    "prompt": ("", "language instruction; also settable at runtime on ~/prompt (std_msgs/String)"),
    "cameras.topics": (["/camera/image_raw"], "image topics, 1 to 3"),
    "cameras.slots": (
        [],
        "model camera slot per topic (e.g. base_0_rgb); empty = the checkpoint's slots in order",
    ),
    "cameras.transports": ([], "'raw' (sensor_msgs/Image) or 'compressed' per topic; empty = raw"),
    "joint_states.topic": ("/joint_states", "sensor_msgs/JointState topic"),
    "joint_states.names": ([], "ordered joint names that form the state vector"),
    "actions.joint_names": ([], "names of the action dimensions, in model output order"),
    "actions.dt": (0.02, "seconds between consecutive actions of a chunk (> 0)"),
    "sync.slop": (0.05, "approximate-time sync: max stamp spread of a set in seconds (> 0)"),
    "sync.queue_size": (10, "approximate-time sync: messages kept per input"),
    "max_input_age": (0.5, "seconds; older inputs (or silent topics) stop inference"),
    "max_clock_skew": (0.1, "seconds; stamps further than this in the future are rejected"),
    "max_rate": (0.0, "inference rate cap in Hz; 0 = as fast as the model runs"),
    "qos.input_reliability": ("best_effort", f"input QoS reliability, one of {RELIABILITIES}"),
    "qos.input_depth": (5, "input QoS history depth"),
    "qos.output_depth": (10, "output (reliable) QoS history depth"),
    "viz.lookahead": (10, "chunk index published on ~/planned_joint_states"),
    "viz.path_indices": ([], "three action indices read as x, y, z for the ~/markers path"),
    "viz.frame_id": ("base_link", "frame of the ~/markers path"),
    "diagnostics.period": (1.0, "seconds between /diagnostics messages"),
}


@dataclass(frozen=True)
class CameraConfig:
    topic: str
    slot: str = ""  # "" = assigned from the checkpoint's camera order at configure
    compressed: bool = False

    def __post_init__(self) -> None:
        if not self.topic:
            raise ValueError("cameras.topics: empty topic name")


@dataclass(frozen=True)
class ModelConfig:
    checkpoint: str
    tokenizer: str = ""
    norm_stats: str = ""
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "auto"
    num_steps: int = 10
    warmup: int = 2

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("checkpoint: no checkpoint directory given (checkpoint:='')")
        if self.backend not in BACKENDS:
            raise ValueError(
                f"model.backend: unknown backend '{self.backend}' (one of {BACKENDS})"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype: unknown dtype '{self.dtype}' (one of {DTYPES})")
        if not self.device or not (
            self.device in ("auto", "cpu") or self.device.startswith("cuda")
        ):
            raise ValueError(f"model.device: unknown device '{self.device}'")
        if self.num_steps < 1:
            raise ValueError(f"model.num_steps must be >= 1, got {self.num_steps}")
        if self.warmup < 0:
            raise ValueError(f"model.warmup must be >= 0, got {self.warmup}")


@dataclass(frozen=True)
class VizConfig:
    lookahead: int = 10
    path_indices: tuple[int, ...] = ()
    frame_id: str = "base_link"

    def __post_init__(self) -> None:
        if self.lookahead < 0:
            raise ValueError(f"viz.lookahead must be >= 0, got {self.lookahead}")
        if self.path_indices and (len(self.path_indices) != 3 or min(self.path_indices) < 0):
            raise ValueError(
                f"viz.path_indices must be 3 non-negative action indices, got "
                f"{list(self.path_indices)}"
            )


@dataclass(frozen=True)
class NodeConfig:
    model: ModelConfig
    prompt: str
    cameras: tuple[CameraConfig, ...]
    joint_states_topic: str
    state_joint_names: tuple[str, ...]
    action_joint_names: tuple[str, ...]
    action_dt: float = 0.02
    sync_slop: float = 0.05
    sync_queue_size: int = 10
    max_input_age: float = 0.5
    max_clock_skew: float = 0.1
    max_rate: float = 0.0
    input_reliability: str = "best_effort"
    input_depth: int = 5
    output_depth: int = 10
    viz: VizConfig = field(default_factory=VizConfig)
    diagnostics_period: float = 1.0

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError("prompt: empty prompt (set prompt:='...')")
        if not 1 <= len(self.cameras) <= MAX_CAMERAS:
            raise ValueError(
                f"cameras.topics: {len(self.cameras)} cameras configured, need 1 to {MAX_CAMERAS}"
            )
        topics = [c.topic for c in self.cameras]
        if len(set(topics)) != len(topics):
            raise ValueError(f"cameras.topics: duplicate topics in {topics}")
        slots = [c.slot for c in self.cameras if c.slot]
        if len(set(slots)) != len(slots):
            raise ValueError(f"cameras.slots: duplicate slots in {slots}")
        if not self.joint_states_topic:
            raise ValueError("joint_states.topic: empty topic name")
        _check_names("joint_states.names", self.state_joint_names)
        _check_names("actions.joint_names", self.action_joint_names)
        _check_positive("actions.dt", self.action_dt)
        _check_positive("sync.slop", self.sync_slop)
        _check_positive("max_input_age", self.max_input_age)
        _check_positive("diagnostics.period", self.diagnostics_period)
        if not self.max_clock_skew >= 0.0:
            raise ValueError(f"max_clock_skew must be >= 0, got {self.max_clock_skew}")
        if not self.max_rate >= 0.0:
            raise ValueError(f"max_rate must be >= 0 (0 = unlimited), got {self.max_rate}")
        if self.sync_queue_size < 1:
            raise ValueError(f"sync.queue_size must be >= 1, got {self.sync_queue_size}")
        if self.input_reliability not in RELIABILITIES:
            raise ValueError(
                f"qos.input_reliability: unknown value '{self.input_reliability}' "
                f"(one of {RELIABILITIES})"
            )
        for name, depth in (
            ("qos.input_depth", self.input_depth),
            ("qos.output_depth", self.output_depth),
        ):
            if depth < 1:
                raise ValueError(f"{name} must be >= 1, got {depth}")
        if self.viz.path_indices and max(self.viz.path_indices) >= len(self.action_joint_names):
            raise ValueError(
                f"viz.path_indices {list(self.viz.path_indices)} out of range for "
                f"{len(self.action_joint_names)} action dims"
            )

    @property
    def min_period(self) -> float:
        """Seconds between inference starts (0 = as fast as the model runs)."""
        return 1.0 / self.max_rate if self.max_rate > 0 else 0.0


def _check_names(param: str, names: Sequence[str]) -> None:
    if not names:
        raise ValueError(f"{param}: empty joint name list")
    if any(not n for n in names):
        raise ValueError(f"{param}: empty joint name in {list(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{param}: duplicate joint names in {list(names)}")


def _check_positive(param: str, value: float) -> None:
    if not value > 0.0:
        raise ValueError(f"{param} must be > 0, got {value}")


def config_from_parameters(get: Callable[[str], Any]) -> NodeConfig:
    """Map parameter values (``get(name)``) onto a validated NodeConfig; raises ValueError."""
    topics = [str(t) for t in get("cameras.topics")]
    slots = [str(s) for s in get("cameras.slots")]
    transports = [str(t) for t in get("cameras.transports")]
    if len(topics) > MAX_CAMERAS:
        raise ValueError(
            f"cameras.topics: {len(topics)} cameras configured, need 1 to {MAX_CAMERAS}"
        )
    if slots and len(slots) != len(topics):
        raise ValueError(f"cameras.slots: {len(slots)} slots for {len(topics)} topics")
    if transports and len(transports) != len(topics):
        raise ValueError(
            f"cameras.transports: {len(transports)} transports for {len(topics)} topics"
        )
    for t in transports:
        if t not in TRANSPORTS:
            raise ValueError(f"cameras.transports: unknown transport '{t}' (one of {TRANSPORTS})")
    cameras = tuple(
        CameraConfig(
            topic=topic,
            slot=slots[i] if slots else "",
            compressed=bool(transports) and transports[i] == "compressed",
        )
        for i, topic in enumerate(topics)
    )
    model = ModelConfig(
        checkpoint=str(get("checkpoint")),
        tokenizer=str(get("tokenizer")),
        norm_stats=str(get("norm_stats")),
        device=str(get("model.device")),
        dtype=str(get("model.dtype")),
        backend=str(get("model.backend")),
        num_steps=int(get("model.num_steps")),
        warmup=int(get("model.warmup")),
    )
    viz = VizConfig(
        lookahead=int(get("viz.lookahead")),
        path_indices=tuple(int(i) for i in get("viz.path_indices")),
        frame_id=str(get("viz.frame_id")),
    )
    return NodeConfig(
        model=model,
        prompt=str(get("prompt")),
        cameras=cameras,
        joint_states_topic=str(get("joint_states.topic")),
        state_joint_names=tuple(str(n) for n in get("joint_states.names")),
        action_joint_names=tuple(str(n) for n in get("actions.joint_names")),
        action_dt=float(get("actions.dt")),
        sync_slop=float(get("sync.slop")),
        sync_queue_size=int(get("sync.queue_size")),
        max_input_age=float(get("max_input_age")),
        max_clock_skew=float(get("max_clock_skew")),
        max_rate=float(get("max_rate")),
        input_reliability=str(get("qos.input_reliability")),
        input_depth=int(get("qos.input_depth")),
        output_depth=int(get("qos.output_depth")),
        viz=viz,
        diagnostics_period=float(get("diagnostics.period")),
    )


# Element types of the empty-list defaults (rclpy cannot infer them from []).
EMPTY_ARRAY_TYPES = {
    "cameras.slots": "STRING_ARRAY",
    "cameras.transports": "STRING_ARRAY",
    "joint_states.names": "STRING_ARRAY",
    "actions.joint_names": "STRING_ARRAY",
    "viz.path_indices": "INTEGER_ARRAY",
}


def declare_parameters(node: Any) -> None:
    """Declare every parameter of ``PARAMETERS`` on an rclpy node, with descriptors."""
    from rcl_interfaces.msg import ParameterDescriptor
    from rclpy.parameter import Parameter

    for name, (default, description) in PARAMETERS.items():
        descriptor = ParameterDescriptor(name=name, description=description)
        if isinstance(default, list) and not default:
            # Declared typed and uninitialised; get_param reads it as [] until it is set.
            value = getattr(Parameter.Type, EMPTY_ARRAY_TYPES[name])
        else:
            value = default
        node.declare_parameter(name, value, descriptor)


def get_param(node: Any, name: str) -> Any:
    """A declared parameter's value; an unset empty-list parameter reads as []."""
    from rclpy.exceptions import ParameterUninitializedException

    try:
        return node.get_parameter(name).value
    except ParameterUninitializedException:
        return list(PARAMETERS[name][0])
