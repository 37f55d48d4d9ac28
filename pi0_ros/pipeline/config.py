"""The policy pipeline's settings: one parameter table, one mapping onto frozen dataclasses.

``PARAMETERS`` lists every setting with its default and description (the policy node declares
them as ROS parameters, ``ros/params.py``; the offline replay reads the same names from the node's
parameter file); :func:`config_from_parameters` is the one function that maps their values onto
:class:`NodeConfig`. The dataclasses validate in ``__post_init__`` and raise ``ValueError`` naming
the parameter and the value. Backend and numeric-format names come from the engine registry
(``engine/registry.py``), so a value accepted here is one the engine can build.

Cameras are parallel arrays (``cameras.topics`` / ``cameras.slots`` / ``cameras.transports``)
because ROS parameters cannot be lists of structs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import paramcheck
from ..engine.registry import AUTO, BACKENDS, PRECISIONS, RUNTIMES
from ..paramcheck import (  # noqa: F401  (re-exported for the node)
    ROS_PARAMETERS,
    printable,
    unknown_parameters_message,
)
from ..model.rtc import SCHEDULES, RTCConfig, check_backend
from ..processing import RESIZE_METHODS, SEMANTICS

MAX_CAMERAS = 3
MIN_ACTION_DT, MAX_ACTION_DT = 1e-4, 10.0  # s between two actions of a chunk (10 kHz .. 0.1 Hz)
BACKEND_CHOICES = (AUTO, *BACKENDS)
DTYPES = (AUTO, *PRECISIONS)
TRANSPORTS = ("raw", "compressed")
RELIABILITIES = ("best_effort", "reliable")
MAX_IMAGE_PIXELS = 7680 * 4320  # 8K UHD: a bigger header is refused before decoding
MAX_PROMPT_CHARS = 2000  # far above any instruction; a longer one is refused before tokenizing
MAX_ABS_STATE = 1e3  # rad / m: a joint position beyond this is a unit or driver error

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
    "model.semantics": (
        "auto",
        "whose numerics to reproduce: 'openpi' | 'lerobot' (denoising time grid, state / action "
        "normalization formulas, image resize); 'auto' = by the checkpoint layout (a LeRobot "
        "folder -> lerobot)",
    ),
    "model.resize": (
        "auto",
        "camera resize: 'fast' (torch's uint8 kernel, within 1 level of openpi's Pillow pixels), "
        "'pillow' (openpi's exact bytes, ~3x slower) or 'lerobot' (LeRobot's float bilinear); "
        "'auto' = by model.semantics (openpi: fast, lerobot: lerobot)",
    ),
    "model.embedding": (
        "",
        "token embedding when a checkpoint stores two different ones: embed_tokens | lm_head; "
        "'' = by layout (LeRobot: embed_tokens)",
    ),
    "model.allow_unknown_processor_steps": (
        False,
        "load a LeRobot checkpoint whose processors hold steps pi0_ros does not implement "
        "(they are skipped: only for steps known not to change the model's inputs)",
    ),
    "model.device": (
        "auto",
        "torch device: 'auto' (cuda if available, else cpu), 'cpu', 'cuda:0'",
    ),
    "model.dtype": (
        "auto",
        f"numeric format, one of {DTYPES}; 'auto' = bfloat16 on cuda, float32 on cpu",
    ),
    "model.backend": (
        "auto",
        f"one of {BACKEND_CHOICES}; 'auto' = cuda_graph on cuda, eager on cpu",
    ),
    "model.num_steps": (10, "flow-matching denoising steps"),
    "model.warmup": (2, "inferences run in on_configure before activation (warm-up, capture)"),
    "model.seed": (
        0,
        "initial-noise seed; the noise of an observation is a function of (seed, its stamp), "
        "so the live node and an offline replay draw the same noise for the same observation",
    ),
    "model.prompt_buckets": (
        [],
        "prompt lengths (tokens) the engine is prepared for; empty = 48/112/200 cut to the model",
    ),
    "model.pipeline": (
        False,
        "overlap vision + prefix of the next observation with the current one's denoising "
        "(two buffer slots, two CUDA streams); off until measured on the GPU (docs/ENGINE.md)",
    ),
    "model.torch_threads": (
        1,
        "torch intra-op CPU threads of the inference thread (0 = leave torch's default)",
    ),
    "remote.uri": (
        "",
        "openpi-protocol policy server (ws://host:port, pi0-ros-serve or openpi serve_policy); "
        "'' = run the checkpoint locally",
    ),
    "remote.api_key": ("", "API key sent to the server; '' = $PI0_ROS_API_KEY if set"),
    "remote.timeout": (10.0, "seconds to wait for an answer before the link is dropped"),
    "tensorrt.engine_dir": ("", "engine directory (pi0-ros-export --build); backend tensorrt"),
    "tensorrt.build_if_missing": (
        False,
        "build missing engines at configure (minutes; the expected time is logged)",
    ),
    "tensorrt.runtime": (
        "auto",
        f"one of {RUNTIMES}; 'auto' = tensorrt on cuda, onnxruntime (float32) on cpu",
    ),
    "prompt": (
        "",
        "language instruction; live: also settable at runtime on ~/prompt (std_msgs/String) "
        "and with `ros2 param set`",
    ),
    "enabled": (
        True,
        "live: false pauses inference without a lifecycle transition (inputs dropped, no "
        "chunks; also the ~/enable std_srvs/SetBool service)",
    ),
    "max_prompt_length": (
        MAX_PROMPT_CHARS,
        "characters; a longer prompt is refused (at configure, on ~/prompt, by param set)",
    ),
    "max_image_pixels": (
        MAX_IMAGE_PIXELS,
        "an image whose header says more pixels (width x height) is refused before decoding",
    ),
    "max_abs_state": (
        MAX_ABS_STATE,
        "a joint state value with |x| above this (rad / m) is rejected, naming the joint",
    ),
    "cameras.topics": (
        ["camera/image_raw"],
        "image topics, 1 to 3 (relative names resolve in the node's namespace)",
    ),
    "cameras.slots": (
        [],
        "model camera slot per topic (e.g. base_0_rgb); empty = the checkpoint's slots in order",
    ),
    "cameras.transports": ([], "'raw' (sensor_msgs/Image) or 'compressed' per topic; empty = raw"),
    "joint_states.topic": (
        "joint_states",
        "sensor_msgs/JointState topic (relative: resolved in the node's namespace)",
    ),
    "joint_states.names": ([], "ordered joint names that form the state vector"),
    "actions.joint_names": ([], "names of the action dimensions, in model output order"),
    "actions.dt": (0.02, "seconds between consecutive actions of a chunk (> 0)"),
    "sync.slop": (0.05, "approximate-time sync: max stamp spread of a set in seconds (> 0)"),
    "sync.queue_size": (10, "approximate-time sync: messages kept per input"),
    "max_input_age": (0.5, "seconds; older inputs (or silent topics) stop inference"),
    "max_clock_skew": (0.1, "seconds; stamps further than this in the future are rejected"),
    "max_rate": (0.0, "live: inference rate cap in Hz; 0 = as fast as the model runs"),
    "qos.input_reliability": ("best_effort", f"input QoS reliability, one of {RELIABILITIES}"),
    "qos.input_depth": (5, "input QoS history depth"),
    "qos.output_depth": (10, "output (reliable) QoS history depth"),
    "viz.lookahead": (10, "chunk index published on ~/planned_joint_states"),
    "viz.path_indices": ([], "three action indices read as x, y, z for the ~/markers path"),
    "viz.frame_id": ("base_link", "frame of the ~/markers path"),
    "diagnostics.period": (1.0, "seconds between /diagnostics messages"),
    "rtc.enabled": (
        False,
        "real-time chunking: each chunk continues the one being executed (its first d actions "
        "inpainted from it, d from the measured latency); pair with the executor's strategy "
        "'rtc'. Backends eager / cuda_graph, float32 / bfloat16 (docs/EXECUTOR.md)",
    ),
    "rtc.max_guidance_weight": (5.0, "RTC guidance weight cap beta (> 0)"),
    "rtc.schedule": ("exp", f"RTC soft mask over the overlap, one of {sorted(SCHEDULES)}"),
    "rtc.latency_percentile": (
        95.0,
        "percentile of the recent latencies (observation stamp -> chunk out) that sets d",
    ),
    "rtc.max_delay": (-1, "largest d in actions; -1 = half the action horizon"),
}

# Parameters a running node applies at once (``ros2 param set``); every other one is read at
# configure only, and a change is refused with that reason while the node is configured.
LIVE_PARAMETERS = ("prompt", "max_rate", "enabled")


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
    seed: int = 0
    prompt_buckets: tuple[int, ...] = ()
    torch_threads: int = 1
    engine_dir: str = ""
    build_if_missing: bool = False
    runtime: str = "auto"
    pipeline: bool = False
    resize: str = "auto"
    semantics: str = "auto"
    embedding: str = ""
    allow_unknown_processor_steps: bool = False
    remote_uri: str = ""
    remote_api_key: str = ""
    remote_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not self.checkpoint and not self.remote_uri:
            raise ValueError("checkpoint: no checkpoint directory given (checkpoint:=''; or "
                             "remote.uri for a policy server)")
        if self.remote_uri and not self.remote_uri.startswith(("ws://", "wss://")):
            raise ValueError(f"remote.uri must start with ws:// or wss://, got "
                             f"'{self.remote_uri}'")
        if not self.remote_timeout > 0:
            raise ValueError(f"remote.timeout must be > 0, got {self.remote_timeout}")
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(
                f"model.backend: unknown backend '{self.backend}' (one of {BACKEND_CHOICES})"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype: unknown format '{self.dtype}' (one of {DTYPES})")
        if self.runtime not in RUNTIMES:
            raise ValueError(
                f"tensorrt.runtime: unknown runtime '{self.runtime}' (one of {RUNTIMES})"
            )
        if any(b < 1 for b in self.prompt_buckets):
            raise ValueError(
                f"model.prompt_buckets must be positive, got {list(self.prompt_buckets)}"
            )
        if self.resize not in ("auto", *RESIZE_METHODS):
            raise ValueError(f"model.resize: expected one of {['auto', *RESIZE_METHODS]}, "
                             f"found '{self.resize}'")
        if self.semantics not in ("auto", *SEMANTICS):
            raise ValueError(f"model.semantics: expected one of {['auto', *SEMANTICS]}, found "
                             f"'{self.semantics}'")
        if self.embedding not in ("", "embed_tokens", "lm_head"):
            raise ValueError(f"model.embedding: expected '', 'embed_tokens' or 'lm_head', found "
                             f"'{self.embedding}'")
        if self.torch_threads < 0:
            raise ValueError(f"model.torch_threads must be >= 0, got {self.torch_threads}")
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
    enabled: bool = True
    max_prompt_length: int = MAX_PROMPT_CHARS
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_abs_state: float = MAX_ABS_STATE
    rtc: RTCConfig = field(default_factory=RTCConfig)

    def __post_init__(self) -> None:
        if self.rtc.enabled:
            m = self.model
            if m.remote_uri:
                raise ValueError("rtc.enabled: not with remote.uri (the openpi protocol has no "
                                 "previous-chunk input); run the checkpoint locally")
            if m.pipeline:
                raise ValueError("rtc.enabled: not with model.pipeline (the next observation "
                                 "would start before the chunk it must continue is known)")
            check_backend("eager" if m.backend == AUTO else m.backend,
                          "float32" if m.dtype == AUTO else m.dtype)
        if self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {self.max_prompt_length}")
        check_prompt(self.prompt, self.max_prompt_length)
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if not self.max_abs_state > 0.0:
            raise ValueError(f"max_abs_state must be > 0, got {self.max_abs_state}")
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
        if not MIN_ACTION_DT <= self.action_dt <= MAX_ACTION_DT:
            raise ValueError(f"actions.dt must be in [{MIN_ACTION_DT}, {MAX_ACTION_DT}] s, got "
                             f"{self.action_dt}")
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


def check_prompt(prompt: str, max_length: int) -> None:
    """ValueError for an empty prompt or one longer than ``max_length`` characters."""
    if not prompt.strip():
        raise ValueError("prompt: empty prompt (set prompt:='...')")
    if len(prompt) > max_length:
        raise ValueError(f"prompt: {len(prompt)} characters > max_prompt_length {max_length} "
                         f"(starts '{printable(prompt, 40)}')")


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
        seed=int(get("model.seed")),
        prompt_buckets=tuple(int(b) for b in get("model.prompt_buckets")),
        torch_threads=int(get("model.torch_threads")),
        pipeline=bool(get("model.pipeline")),
        resize=str(get("model.resize")),
        semantics=str(get("model.semantics")),
        embedding=str(get("model.embedding")),
        allow_unknown_processor_steps=bool(get("model.allow_unknown_processor_steps")),
        engine_dir=str(get("tensorrt.engine_dir")),
        build_if_missing=bool(get("tensorrt.build_if_missing")),
        runtime=str(get("tensorrt.runtime")),
        remote_uri=str(get("remote.uri")),
        remote_api_key=str(get("remote.api_key")),
        remote_timeout=float(get("remote.timeout")),
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
        enabled=bool(get("enabled")),
        max_prompt_length=int(get("max_prompt_length")),
        max_image_pixels=int(get("max_image_pixels")),
        max_abs_state=float(get("max_abs_state")),
        rtc=rtc_config(get),
    )


def rtc_config(get: Callable[[str], Any]) -> RTCConfig:
    """The ``rtc.*`` parameters as the model core's RTCConfig (ValueError naming the field)."""
    max_delay = int(get("rtc.max_delay"))
    if max_delay < -1:
        raise ValueError(f"rtc.max_delay: expected -1 (half the horizon) or an int >= 0, "
                         f"found {max_delay}")
    return RTCConfig(enabled=bool(get("rtc.enabled")),
                     max_guidance_weight=float(get("rtc.max_guidance_weight")),
                     schedule=str(get("rtc.schedule")),
                     latency_percentile=float(get("rtc.latency_percentile")),
                     max_delay=None if max_delay == -1 else max_delay)


# Element types of the empty-list defaults (rclpy cannot infer them from []).
EMPTY_ARRAY_TYPES = {
    "cameras.slots": "STRING_ARRAY",
    "cameras.transports": "STRING_ARRAY",
    "joint_states.names": "STRING_ARRAY",
    "actions.joint_names": "STRING_ARRAY",
    "viz.path_indices": "INTEGER_ARRAY",
    "model.prompt_buckets": "INTEGER_ARRAY",
}


def config_from_values(values: dict[str, Any]) -> NodeConfig:
    """NodeConfig from a flat ``{name: value}`` dict (a parameter file's node section): unset
    names take the table's defaults; a name the table does not have is refused, naming the
    closest known name (a typo must never fall back to a default silently)."""
    unknown = undeclared(values)
    if unknown:
        raise ValueError(unknown_parameters_message(unknown, PARAMETERS))
    return config_from_parameters(lambda name: values.get(name, PARAMETERS[name][0]))


def undeclared(names: Any) -> list[str]:
    """The names (sorted) that are neither in ``PARAMETERS`` nor rclpy's own parameters."""
    return paramcheck.undeclared(names, PARAMETERS)
