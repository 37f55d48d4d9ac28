"""pi0-ros-replay: run a recorded rosbag2 bag through the policy and the executor, offline or live.

Offline (deterministic, no ROS graph)::

    pi0-ros-replay BAG --config PARAMS.yaml [--checkpoint DIR] --output OUT_DIR [--seed N]
                   [--compare GOLDEN_BAG --atol X]

``PARAMS.yaml`` is the policy node's ros-args parameter file (the same file configures the live
node); an executor section in it (or ``--executor-config``) configures the executor. The bag's
camera topics (Image or CompressedImage), joint states and optional prompt (std_msgs/String on
``/<node>/prompt``) go through the live nodes' own code: ``ros.params.config_from_parameters``,
``ros.sync.make_synchronizer``, ``ros.conversions``, the node's policy factory
(``pi0_ros.policy.Policy``) and ``pi0_ros.control`` -- on bag time. Differences from the live
node, all in favour of determinism:

* inference runs synchronously for every synchronized observation, at the ``max_rate`` cap on bag
  time; the live node's latest-only slot ("newest wins") never drops an observation here;
* a chunk reaches the executor ``--latency`` seconds of bag time after its observation (default
  0: instantaneous); the wall-clock inference latency is measured and reported, not simulated;
* the initial noise of every inference is drawn from ``numpy.random.default_rng(--seed)``, so
  two runs give byte-identical actions.

OUT_DIR receives ``bag/`` (ActionChunk, JointTrajectory, planned JointState, markers, executor
commands, /diagnostics), ``chunks.npz`` (stamps + actions), ``report.md`` and ``plots/*.png``.
``--compare GOLDEN_BAG --atol X`` exits with status 1 when the actions differ from a previous
run's output bag by more than X (or in count / stamps / shape): a regression test for CI.

Live (publish into running nodes, the equivalent of ``ros2 bag play``)::

    pi0-ros-replay BAG --live [--rate R] [--clock] [--topics T ...]

Exit status: 0 success, 1 ``--compare`` mismatch, 2 usage / input error.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import logging
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
DEFAULT_NODE = "pi0_policy_node"
DEFAULT_EXECUTOR_NODE = "pi0_executor_node"
ACTION_CHUNK_TYPE = "pi0_ros_msgs/msg/ActionChunk"
# Field definitions of msg/msg/ActionChunk.msg (the interface package pi0_ros_msgs); registered
# with rosbags so bags can be written and read without the package built. test_replay.py checks
# that they match the .msg file.
ACTION_CHUNK_MSG = """\
std_msgs/Header header
string[] joint_names
uint32 horizon
uint32 action_dim
float64 dt
float32[] actions
float64 inference_latency
uint64 sequence
string model_name
"""
OUTPUT_TOPICS = ("action_chunk", "trajectory", "planned_joint_states", "markers")


class ReplayError(Exception):
    """A user-facing error (bad arguments, bag or parameters): printed, exit status 2."""


# ---------------------------------------------------------------------------------------------
# parameters


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested ros__parameters dicts -> dotted names, as rcl's YAML parser flattens them."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def node_parameters(path: str | Path, node: str) -> dict[str, Any]:
    """Parameters a ros-args ``--params-file`` gives node ``node`` (``/**`` first, then the
    node's own section, with or without a leading slash / namespace)."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ReplayError(f"cannot read parameter file {path}: {exc}") from exc
    if not isinstance(doc, Mapping):
        raise ReplayError(f"{path}: not a ros-args parameter file (top level is not a mapping)")
    params: dict[str, Any] = {}
    keys = [k for k in doc if k in ("/**", "**")]
    keys += [k for k in doc if k not in keys and str(k).rstrip("/").split("/")[-1] == node]
    for key in keys:
        section = doc[key] or {}
        if not isinstance(section, Mapping) or "ros__parameters" not in section:
            raise ReplayError(f"{path}: section '{key}' has no ros__parameters")
        params.update(flatten(section["ros__parameters"] or {}))
    return params


def policy_config(params: Mapping[str, Any]) -> Any:
    """The live node's NodeConfig from parameter values (same defaults, same validation)."""
    from pi0_ros.ros.params import PARAMETERS, config_from_parameters

    unknown = sorted(set(params) - set(PARAMETERS) - {"use_sim_time"})
    if unknown:
        log.warning("ignoring parameters the policy node does not declare: %s", unknown)
    try:
        return config_from_parameters(lambda name: params.get(name, PARAMETERS[name][0]))
    except ValueError as exc:
        raise ReplayError(f"invalid policy parameters: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# messages


def message_class(msgtype: str) -> Any:
    """'sensor_msgs/msg/Image' -> the rclpy message class."""
    package, _, name = msgtype.split("/")
    try:
        return getattr(importlib.import_module(f"{package}.msg"), name)
    except (ImportError, AttributeError) as exc:
        raise ReplayError(f"message type {msgtype} is not importable: {exc}") from exc


def typestore() -> Any:
    """rosbags typestore of ROS 2 Kilted + pi0_ros_msgs/msg/ActionChunk."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    store.register(get_types_from_msg(ACTION_CHUNK_MSG, ACTION_CHUNK_TYPE))
    return store


def action_chunk_bytes(
    store: Any, actions: np.ndarray, *, stamp_ns: int, dt: float, joint_names: Sequence[str],
    latency: float, sequence: int, model_name: str,
) -> bytes:
    """CDR bytes of a pi0_ros_msgs/ActionChunk (the fields of ``conversions.chunk_to_msg``)."""
    t = store.types
    sec, nanosec = divmod(int(stamp_ns), NS_PER_S)
    msg = t[ACTION_CHUNK_TYPE](
        header=t["std_msgs/msg/Header"](
            stamp=t["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec), frame_id=""),
        joint_names=list(joint_names),
        horizon=int(actions.shape[0]),
        action_dim=int(actions.shape[1]),
        dt=float(dt),
        actions=np.ascontiguousarray(actions, dtype=np.float32).reshape(-1),
        inference_latency=float(latency),
        sequence=int(sequence),
        model_name=model_name,
    )
    return bytes(store.serialize_cdr(msg, ACTION_CHUNK_TYPE))


class BagWriter:
    """rosbags Writer that takes rclpy messages (or ready CDR bytes) and creates connections on
    first use."""

    def __init__(self, path: Path, store: Any, storage: str = "sqlite3") -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        plugin = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}[storage]
        self._store = store
        self._writer = Writer(path, version=8, storage_plugin=plugin)
        self._writer.open()
        self._connections: dict[str, Any] = {}
        self.count = 0

    def write(self, topic: str, msgtype: str, log_ns: int, msg: Any) -> None:
        from rclpy.serialization import serialize_message

        if topic not in self._connections:
            self._connections[topic] = self._writer.add_connection(
                topic, msgtype, typestore=self._store)
        data = msg if isinstance(msg, bytes) else serialize_message(msg)
        self._writer.write(self._connections[topic], int(log_ns), data)
        self.count += 1

    def close(self) -> None:
        self._writer.close()


def read_action_chunks(bag: str | Path, topic: str | None = None) -> tuple[np.ndarray, list]:
    """(stamps int64 (N,), list of (H, D) float32 actions) of the ActionChunk messages of a bag
    (``topic`` or every ActionChunk connection). ``bag`` may be a replay output directory."""
    from rosbags.rosbag2 import Reader

    path = Path(bag)
    if not (path / "metadata.yaml").is_file() and (path / "bag" / "metadata.yaml").is_file():
        path = path / "bag"
    store = typestore()
    stamps, chunks = [], []
    try:
        with Reader(path) as reader:
            conns = [c for c in reader.connections if c.msgtype == ACTION_CHUNK_TYPE
                     and (topic is None or c.topic == topic)]
            if not conns:
                raise ReplayError(f"{bag}: no {ACTION_CHUNK_TYPE} messages")
            for conn, _, raw in reader.messages(connections=conns):
                msg = store.deserialize_cdr(raw, conn.msgtype)
                stamps.append(msg.header.stamp.sec * NS_PER_S + msg.header.stamp.nanosec)
                chunks.append(np.asarray(msg.actions, np.float32).reshape(
                    msg.horizon, msg.action_dim))
    except ReplayError:
        raise
    except Exception as exc:  # rosbags raises ReaderError, FileNotFoundError, ...
        raise ReplayError(f"cannot read bag {bag}: {exc}") from exc
    return np.asarray(stamps, np.int64), chunks


# ---------------------------------------------------------------------------------------------
# comparison


@dataclass
class Comparison:
    ok: bool
    message: str
    max_abs_diff: float = float("nan")


def compare_actions(
    stamps: np.ndarray, chunks: Sequence[np.ndarray], golden_stamps: np.ndarray,
    golden: Sequence[np.ndarray], atol: float,
) -> Comparison:
    """Same number of chunks, same stamps, same shapes and max |diff| <= atol."""
    if len(chunks) != len(golden):
        return Comparison(False, f"chunk count differs: {len(chunks)} vs golden {len(golden)}")
    if not np.array_equal(stamps, golden_stamps):
        i = int(np.argmax(stamps != golden_stamps))
        return Comparison(False, f"chunk {i} stamp differs: {stamps[i]} vs golden "
                                 f"{golden_stamps[i]} ns")
    worst, where = 0.0, (0, 0, 0)
    for i, (a, g) in enumerate(zip(chunks, golden)):
        if a.shape != g.shape:
            return Comparison(False, f"chunk {i} shape differs: {a.shape} vs golden {g.shape}")
        diff = np.abs(a.astype(np.float64) - g.astype(np.float64))
        if not np.all(np.isfinite(diff)):
            return Comparison(False, f"chunk {i} has non-finite values")
        if diff.size and diff.max() > worst:
            worst = float(diff.max())
            where = (i, *np.unravel_index(int(diff.argmax()), diff.shape))
    if worst > atol:
        return Comparison(False, f"actions differ: max |diff| {worst:.3g} > atol {atol:g} "
                                 f"(chunk {where[0]}, step {where[1]}, dim {where[2]})", worst)
    return Comparison(True, f"{len(chunks)} chunks match (max |diff| {worst:.3g} <= atol "
                            f"{atol:g})", worst)


def actions_digest(chunks: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in chunks:
        h.update(np.ascontiguousarray(a, np.float32).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# offline replay


@dataclass
class ChunkRecord:
    stamp_ns: int  # observation stamp: action k is for stamp + k * dt
    arrival_ns: int  # bag time the chunk reaches the executor
    actions: np.ndarray  # (H, D) float32
    latency: float  # wall seconds of policy.infer


@dataclass
class ReplayResult:
    chunks: list[ChunkRecord] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    observations: int = 0
    state_times: list[int] = field(default_factory=list)
    states: list[np.ndarray] = field(default_factory=list)
    command_times: list[int] = field(default_factory=list)
    commands: list[np.ndarray] = field(default_factory=list)
    executor_events: Counter = field(default_factory=Counter)
    executor_name: str = ""
    start_ns: int = 0
    end_ns: int = 0
    sync_dropped: int = 0
    prompt: str = ""
    wall_s: float = 0.0


class OfflineReplay:
    """Feeds bag messages (in log-time order) through the live node's pipeline on bag time.

    ``policy`` needs ``infer(obs, noise=...)`` and ``settings`` (horizon / model action dim);
    ``executor`` is a :class:`ControlExecutor` or None.
    """

    def __init__(
        self, config: Any, policy: Any, *, seed: int, executor: ControlExecutor | None,
        latency: float = 0.0, writer: BagWriter | None = None, store: Any = None,
        node_name: str = DEFAULT_NODE, model_name: str = "", progress: Callable | None = None,
    ) -> None:
        from pi0_ros.ros import viz
        from pi0_ros.ros.sync import make_synchronizer

        self.config = config
        self.policy = policy
        self.rng = np.random.default_rng(seed)
        self.executor = executor
        self.latency_ns = int(round(latency * NS_PER_S))
        self.writer = writer
        self.store = store
        self.ns = f"/{node_name.strip('/')}"
        self.model_name = model_name
        self.progress = progress
        n = len(config.cameras) + 1
        self.n_inputs = n
        slots = tuple(c.slot for c in config.cameras)
        self.slots = tuple(getattr(policy, "camera_slots", None) or slots)
        # The node prefers message_filters; the project's synchronizer has the same contract and
        # is always used here so replays are identical with or without message_filters.
        self.sync = make_synchronizer(n, config.sync_queue_size, config.sync_slop,
                                      prefer_message_filters=False)
        self.sync.register_callback(self._on_set)
        self.prompt = config.prompt
        self.result = ReplayResult(prompt=config.prompt)
        self.last_stamp = [-1] * n
        self.last_receipt: list[int | None] = [None] * n
        self.last_set_stamp = -1
        self.last_submit: int | None = None
        self.pending: list[ChunkRecord] = []  # computed, not yet arrived at the executor
        self.now = 0
        self.sequence = 0
        self.viz = viz
        self.latency_window = viz.LatencyWindow()
        self.next_diag: int | None = None
        self.diag_period = int(config.diagnostics_period * NS_PER_S)
        self._flushing = False

    # -- input side ----------------------------------------------------------------------------
    def feed(self, index: int, log_ns: int, msg: Any) -> None:
        """One camera (index < n-1) or JointState (index n-1) message received at ``log_ns``."""
        from pi0_ros.ros import conversions as conv

        self.advance(log_ns)
        counts = self.result.counts
        if index == self.n_inputs - 1:
            try:
                state = conv.joint_state_to_vector(msg, self.config.state_joint_names)
                self.result.state_times.append(conv.stamp_to_ns(msg.header.stamp))
                self.result.states.append(state)
            except conv.ConversionError:
                pass  # counted when (if) it is part of a synchronized set
        stamp = conv.stamp_to_ns(msg.header.stamp)
        if stamp == 0:
            counts["rejected.zero_stamp"] += 1
            return
        if stamp - log_ns > self.config.max_clock_skew * NS_PER_S:
            counts["rejected.future_stamp"] += 1
            return
        if stamp <= self.last_stamp[index]:
            counts["rejected.stamp_out_of_order"] += 1
            return
        self.last_stamp[index] = stamp
        self.last_receipt[index] = log_ns
        self.sync.add(index, stamp, msg)

    def set_prompt(self, log_ns: int, text: str) -> None:
        self.advance(log_ns)
        if not text.strip():
            self.result.counts["rejected.empty_prompt"] += 1
            return
        self.prompt = text
        self.result.prompt = text

    def _on_set(self, *msgs: Any) -> None:
        from pi0_ros.ros import conversions as conv
        from pi0_ros.ros.node import policy_observation

        config, counts, now = self.config, self.result.counts, self.now
        stamp = conv.stamp_to_ns(msgs[-1].header.stamp)
        if stamp <= self.last_set_stamp:
            counts["rejected.stamp_out_of_order"] += 1
            return
        self.last_set_stamp = stamp
        max_age = config.max_input_age * NS_PER_S
        if any(t is None or now - t > max_age for t in self.last_receipt):
            counts["rejected.input_silent"] += 1
            return
        if now - stamp > max_age:
            counts["rejected.stale_input"] += 1
            return
        try:
            images = {self.slots[i]: conv.to_rgb(m) for i, m in enumerate(msgs[:-1])}
            state = conv.joint_state_to_vector(msgs[-1], config.state_joint_names)
        except conv.ConversionError as exc:
            counts[f"rejected.{exc.reason}"] += 1
            return
        if len({img.shape for img in images.values()}) > 1:
            counts["mixed_camera_sizes"] += 1
        if (config.min_period and self.last_submit is not None
                and now - self.last_submit < config.min_period * NS_PER_S):
            counts["rate_limited"] += 1
            return
        self.last_submit = now
        self.result.observations += 1
        settings = self.policy.settings
        noise = self.rng.standard_normal(
            (settings.action_horizon, settings.model_action_dim)).astype(np.float32)
        t0 = time.perf_counter()
        out = self.policy.infer(policy_observation(images, state, self.prompt), noise=noise)
        latency = time.perf_counter() - t0
        actions = np.ascontiguousarray(out["actions"], dtype=np.float32)
        if actions.ndim != 2 or actions.shape[1] != len(config.action_joint_names):
            counts["rejected.bad_output"] += 1
            return
        if not np.all(np.isfinite(actions)):
            counts["rejected.nonfinite_output"] += 1
            return
        self.result.latencies.append(latency)
        self.latency_window.add(latency)
        record = ChunkRecord(stamp, now + self.latency_ns, actions, latency)
        self.result.chunks.append(record)
        self._publish_chunk(record)
        if self.latency_ns == 0:
            self._deliver(record)
        else:
            self.pending.append(record)
        if self.progress is not None:
            self.progress(self)

    def _publish_chunk(self, rec: ChunkRecord) -> None:
        from pi0_ros.ros import conversions as conv

        if self.writer is None:
            return
        config, ns, at = self.config, self.ns, rec.arrival_ns
        names = config.action_joint_names
        self.sequence += 1
        fields = dict(stamp_ns=rec.stamp_ns, dt=config.action_dt, joint_names=names,
                      sequence=self.sequence, model_name=self.model_name)
        try:  # the live node's builder when pi0_ros_msgs is built, else the rosbags type
            chunk = conv.chunk_to_msg(rec.actions, inference_latency=rec.latency, **fields)
        except ImportError:
            chunk = action_chunk_bytes(self.store, rec.actions, latency=rec.latency, **fields)
        self.writer.write(f"{ns}/action_chunk", ACTION_CHUNK_TYPE, at, chunk)
        self.writer.write(f"{ns}/trajectory", "trajectory_msgs/msg/JointTrajectory", at,
                          conv.chunk_to_trajectory(rec.actions, stamp_ns=rec.stamp_ns,
                                                   dt=config.action_dt, joint_names=names))
        self.writer.write(f"{ns}/planned_joint_states", "sensor_msgs/msg/JointState", at,
                          self.viz.planned_joint_state(rec.actions, names, config.viz.lookahead,
                                                       stamp_ns=at))
        text = self.viz.status_text(rec.latency, 0.0, self.sequence)
        self.writer.write(f"{ns}/markers", "visualization_msgs/msg/MarkerArray", at,
                          self.viz.chunk_markers(rec.actions,
                                                 path_indices=config.viz.path_indices,
                                                 frame_id=config.viz.frame_id, stamp_ns=at,
                                                 text=text))

    def _deliver(self, rec: ChunkRecord) -> None:
        if self.executor is not None:
            state = self.result.states[-1] if self.result.states else None
            self.executor.add_chunk(rec, self.config, state)

    # -- time ----------------------------------------------------------------------------------
    def advance(self, log_ns: int) -> None:
        """Move bag time to ``log_ns``: deliver arrived chunks, run executor ticks, diagnostics."""
        if not self.result.start_ns:
            self.result.start_ns = log_ns
            self.next_diag = log_ns + self.diag_period
        while True:
            due = [r for r in self.pending if r.arrival_ns <= log_ns]
            tick = self.executor.next_tick() if self.executor is not None else None
            first_chunk = min((r.arrival_ns for r in due), default=None)
            # Process events in time order: chunk arrivals, executor ticks, diagnostics.
            candidates = [t for t in (first_chunk, tick, self.next_diag)
                          if t is not None and t <= log_ns]
            if not candidates:
                break
            t = min(candidates)
            self.now = t
            if first_chunk is not None and t == first_chunk:
                rec = next(r for r in due if r.arrival_ns == t)
                self.pending.remove(rec)
                self._deliver(rec)
            elif tick is not None and t == tick:
                self._tick(t)
            else:
                self._diagnostics(t)
        self.now = max(self.now, log_ns)
        if not self._flushing:
            self.result.end_ns = max(self.result.end_ns, log_ns)

    def _tick(self, t: int) -> None:
        assert self.executor is not None
        command = self.executor.tick(t)
        if command is not None:
            self.result.command_times.append(t)
            self.result.commands.append(np.asarray(command.position, np.float64))
            if self.writer is not None:
                for topic, msgtype, msg in self.executor.messages(t, command):
                    self.writer.write(topic, msgtype, t, msg)

    def _diagnostics(self, t: int) -> None:
        from diagnostic_msgs.msg import DiagnosticStatus

        self.next_diag = t + self.diag_period
        if self.writer is None:
            return
        values: dict[str, object] = {"chunks_published": len(self.result.chunks),
                                     "observations": self.result.observations}
        lat = self.latency_window.summary()
        if lat is not None:
            values.update(latency_p50_ms=lat[0] * 1e3, latency_p95_ms=lat[1] * 1e3,
                          latency_max_ms=lat[2] * 1e3)
        values.update(sorted(self.result.counts.items()))
        msg = self.viz.diagnostics_message(
            name=f"{self.ns.strip('/')}: policy (replay)", hardware_id=self.model_name or "pi0",
            level=DiagnosticStatus.OK, message="replay", values=values, stamp_ns=t)
        self.writer.write("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray", t, msg)

    def finish(self) -> ReplayResult:
        """Flush: deliver pending chunks and run the executor to the end of the last chunk."""
        end = self.result.end_ns
        for rec in self.result.chunks:
            end = max(end, rec.arrival_ns + int(
                rec.actions.shape[0] * self.config.action_dt * NS_PER_S))
        self._flushing = True
        self.advance(end)
        self.result.sync_dropped = int(getattr(self.sync, "dropped", 0))
        if self.executor is not None:
            self.result.executor_events.update(self.executor.events())
            self.result.executor_name = self.executor.name
        return self.result


# ---------------------------------------------------------------------------------------------
# executor


class ControlExecutor:
    """``pi0_ros.control.StreamingExecutor`` on bag time, configured exactly as the live
    ``pi0_executor_node`` (its parameter mapping and its message builder).

    Like the node: the commanded state starts from the recorded joint state (mapped by name),
    chunks before that are ignored, chunks are submitted at their arrival with
    ``t0`` = observation stamp (latency compensation skips actions already in the past), and
    ticks run at ``control_rate`` from the first chunk's arrival on.
    """

    def __init__(self, node_config: Any, state_names: Sequence[str], node: str) -> None:
        from pi0_ros.control import StreamingExecutor

        self.cfg = node_config
        self.core = StreamingExecutor(node_config.executor, 1.0 / node_config.control_rate)
        self.period = int(round(NS_PER_S / node_config.control_rate))
        index = {n: i for i, n in enumerate(state_names)}
        self._state_index = [index.get(n) for n in node_config.executor.joint_names]
        self._next: int | None = None
        self._origin: int | None = None
        self._events: Counter = Counter()
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
        self.name = (f"pi0_ros.control.StreamingExecutor ({ex.strategy}, {ex.interpolation}, "
                     f"{node_config.control_rate:g} Hz)")

    def _seconds(self, t: int) -> float:
        if self._origin is None:
            self._origin = t
        return (t - self._origin) / NS_PER_S

    def _initialize(self, t: int, state: np.ndarray | None) -> bool:
        if self.core.initialized:
            return True
        if state is None or any(i is None for i in self._state_index):
            return False
        self.core.set_state(np.asarray([state[i] for i in self._state_index]), self._seconds(t))
        return True

    def add_chunk(self, rec: ChunkRecord, config: Any, state: np.ndarray | None) -> None:
        from pi0_ros.control import chunk_from_arrays

        t = rec.arrival_ns
        if not self._initialize(t, state):
            self._events["chunks_before_joint_state"] += 1
            return
        if self._next is None:
            self._next = t
        try:
            chunk = chunk_from_arrays(
                self._seconds(rec.stamp_ns), config.action_dt, config.action_joint_names,
                rec.actions.astype(np.float64), interpretation=self.cfg.interpretation,
                state0=self.core._q.copy())  # as the node: commanded state stands in for t0's
        except ValueError as exc:  # ChunkError carries the reason (non_finite, dt, ...)
            self._events[f"rejected.{getattr(exc, 'reason', 'invalid')}"] += 1
            return
        ok, reason = self.core.submit(chunk, self._seconds(t))
        self._events["chunks_accepted" if ok else f"rejected.{reason}"] += 1

    def next_tick(self) -> int | None:
        return self._next

    def tick(self, t: int) -> Any:
        assert self._next is not None
        self._next = t + self.period
        cmd = self.core.tick(self._seconds(t))
        self._events["hold_ticks" if cmd.holding else "track_ticks"] += 1
        return cmd

    def messages(self, t: int, command: Any) -> list[tuple[str, str, Any]]:
        from pi0_ros.ros.executor_node import command_messages

        return [(*self._topics[key], msg)
                for key, msg in command_messages(self.cfg, command, t).items()]

    def events(self) -> Mapping[str, int]:
        stats = self.core.stats
        return {**self._events, "seams": stats["seams"], "holds": stats["holds"]}


def _resolve(topic: str, ns: str) -> str:
    """A node-relative topic (``~/x`` or ``x``) as the live node in ``ns`` would resolve it."""
    if topic.startswith("~/"):
        return f"{ns}/{topic[2:]}"
    return topic if topic.startswith("/") else f"/{topic}"


def executor_config(params: Mapping[str, Any], config: Any) -> Any:
    """The live executor node's configuration from its parameter-file section ``params``;
    parameters the file does not set take the node's defaults, except ``joint_names``, which
    defaults to the policy's action joints (the executor must command the joints the chunks
    name)."""
    from pi0_ros.ros.executor_node import PARAMETERS, config_from_parameters

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


# ---------------------------------------------------------------------------------------------
# report and plots


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    v = np.asarray(values, np.float64) * 1e3
    p = np.percentile(v, [50, 90, 95, 99])
    return {"p50": p[0], "p90": p[1], "p95": p[2], "p99": p[3], "max": float(v.max()),
            "mean": float(v.mean())}


def seams(chunks: Sequence[ChunkRecord], dt: float) -> np.ndarray:
    """Per chunk switch: |new chunk - previous chunk| at the new chunk's arrival time (both
    linearly interpolated; the previous chunk held at its last action past its end). (N-1, D)."""
    out = []
    for prev, new in zip(chunks, chunks[1:]):
        t = new.arrival_ns
        out.append(np.abs(_chunk_at(new, t, dt) - _chunk_at(prev, t, dt)))
    return np.asarray(out, np.float64).reshape(-1, chunks[0].actions.shape[1] if chunks else 0)


def _chunk_at(rec: ChunkRecord, t: int, dt: float) -> np.ndarray:
    h = rec.actions.shape[0]
    k = float(np.clip((t - rec.stamp_ns) / NS_PER_S / dt, 0.0, h - 1))
    i = min(int(k), max(h - 2, 0))
    w = k - i if h > 1 else 0.0
    return (1 - w) * rec.actions[i].astype(np.float64) + w * rec.actions[min(i + 1, h - 1)]


def write_report(path: Path, result: ReplayResult, config: Any, *, bag: Path, output_bag: Path,
                 plots: Sequence[Path], seed: int, digest: str,
                 comparison: Comparison | None) -> None:
    names = config.action_joint_names
    duration = (result.end_ns - result.start_ns) / NS_PER_S if result.end_ns else 0.0
    lat = _percentiles(result.latencies)
    lines = [
        "# pi0_ros replay report",
        "",
        f"- input bag: `{bag}`",
        f"- output bag: `{output_bag}`",
        f"- checkpoint: `{config.model.checkpoint}` ({config.model.num_steps} denoising steps)",
        f"- prompt: \"{result.prompt}\"",
        f"- bag time replayed: {duration:.2f} s; wall time {result.wall_s:.1f} s",
        f"- noise seed: {seed}; actions sha256: `{digest}`",
        f"- executor: {result.executor_name or 'none'}",
        "",
        "## Inference",
        "",
        "| chunks | observations | rate cap | effective rate |",
        "|---|---|---|---|",
        f"| {len(result.chunks)} | {result.observations} | "
        f"{config.max_rate or 'none'} Hz | "
        f"{len(result.chunks) / duration if duration else 0:.2f} Hz |",
        "",
    ]
    if lat:
        lines += [
            "Latency of `Policy.infer` (wall clock, ms; offline replay runs inference "
            "synchronously, so this is pure model + processing time):",
            "",
            "| p50 | p90 | p95 | p99 | max | mean |",
            "|---|---|---|---|---|---|",
            "| " + " | ".join(f"{lat[k]:.1f}" for k in ("p50", "p90", "p95", "p99", "max",
                                                      "mean")) + " |",
            "",
        ]
    lines += ["## Dropped and rejected inputs", ""]
    counts = dict(sorted(result.counts.items()))
    counts["sync_unmatched"] = result.sync_dropped
    lines += ["| counter | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    lines += ["", "`rejected.*`: inputs the live node would reject (same checks and reasons). "
              "`rate_limited`: synchronized observations skipped by the `max_rate` cap (bag "
              "time). `sync_unmatched`: messages that left a synchronizer queue without being "
              "part of a set (expected for inputs faster than the slowest camera). The live "
              "node's latest-only slot drops (`dropped_observations`) do not happen offline.",
              ""]
    seam = seams(result.chunks, config.action_dt)
    lines += ["## Seams between consecutive chunks", ""]
    if len(seam):
        lines += [
            "|new chunk - previous chunk| at the switch time (robot units), per joint:", "",
            "| joint | mean | p95 | max |", "|---|---|---|---|",
        ]
        for j, name in enumerate(names):
            col = seam[:, j]
            lines.append(f"| {name} | {col.mean():.4f} | {np.percentile(col, 95):.4f} | "
                         f"{col.max():.4f} |")
        lines.append("")
    else:
        lines += ["fewer than two chunks", ""]
    if result.executor_events:
        lines += ["## Executor", "", "| event | count |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(result.executor_events.items())]
        lines += ["", f"{len(result.commands)} commands.", ""]
    if comparison is not None:
        lines += ["## Comparison", "", f"**{'PASS' if comparison.ok else 'FAIL'}**: "
                  f"{comparison.message}", ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({p.relative_to(path.parent).as_posix()})" for p in plots]
        lines.append("")
    path.write_text("\n".join(lines))


def write_plots(out_dir: Path, result: ReplayResult, config: Any) -> list[Path]:
    """One PNG per action joint: recorded state, predicted chunks, executed command."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = result.start_ns
    names = config.action_joint_names
    state_index = {n: i for i, n in enumerate(config.state_joint_names)}
    st = (np.asarray(result.state_times, np.float64) - t0) / NS_PER_S
    states = np.asarray(result.states) if result.states else np.zeros((0, 0))
    ct = (np.asarray(result.command_times, np.float64) - t0) / NS_PER_S
    cmds = np.asarray(result.commands) if result.commands else np.zeros((0, 0))
    paths = []
    for j, name in enumerate(names):
        fig, ax = plt.subplots(figsize=(10, 3.6), dpi=100)
        if name in state_index and len(states):
            ax.plot(st, states[:, state_index[name]], color="black", lw=1.6,
                    label="recorded state")
        for k, rec in enumerate(result.chunks):
            h = rec.actions.shape[0]
            tt = (rec.stamp_ns - t0) / NS_PER_S + np.arange(h) * config.action_dt
            ax.plot(tt, rec.actions[:, j], color=plt.cm.viridis((k % 10) / 10), lw=0.8,
                    alpha=0.6, label="predicted chunks" if k == 0 else None)
        if len(cmds):
            ax.plot(ct, cmds[:, j], color="tab:red", lw=1.2, ls="--",
                    label="executed command")
        ax.set_title(f"{name}: recorded state vs predicted chunks vs executed command")
        ax.set_xlabel("bag time [s]")
        ax.set_ylabel("position")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{j:02d}_{_safe(name)}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


# ---------------------------------------------------------------------------------------------
# offline driver


@dataclass
class ReplayOutput:
    result: ReplayResult
    bag: Path
    report: Path
    plots: list[Path]
    chunks_file: Path
    digest: str
    comparison: Comparison | None


def run_offline(
    bag: str | Path, config_file: str | Path, output: str | Path, *,
    checkpoint: str | None = None, seed: int = 0, node_name: str = DEFAULT_NODE,
    executor_node: str = DEFAULT_EXECUTOR_NODE, executor_config: str | Path | None = None,
    prompt_topic: str | None = None, latency: float = 0.0, storage: str = "sqlite3",
    plots: bool = True, compare: str | Path | None = None, atol: float = 0.0,
    duration: float | None = None, policy_factory: Callable | None = None,
    progress: Callable | None = None,
) -> ReplayOutput:
    """The offline replay (see the module docstring); raises ReplayError on bad input."""
    from rosbags.rosbag2 import Reader

    wall0 = time.perf_counter()
    bag = Path(bag)
    if not (bag / "metadata.yaml").is_file():
        raise ReplayError(f"{bag} is not a rosbag2 bag directory (no metadata.yaml)")
    params = node_parameters(config_file, node_name)
    if checkpoint:
        params["checkpoint"] = str(checkpoint)
    config = policy_config(params)
    exec_params = node_parameters(executor_config or config_file, executor_node)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    out_bag = out / "bag"
    if out_bag.exists():
        if not (out_bag / "metadata.yaml").is_file():
            raise ReplayError(f"{out_bag} exists and is not a bag; not overwriting")
        shutil.rmtree(out_bag)
    if policy_factory is None:
        from pi0_ros.ros.node import default_policy_factory as policy_factory
    slots = tuple(c.slot for c in config.cameras)
    try:
        policy = policy_factory(config, slots)
    except Exception as exc:
        raise ReplayError(f"cannot load the policy: {type(exc).__name__}: {exc}") from exc
    warm_up(policy, config)
    executor = make_executor(exec_params, config, executor_node)
    store = typestore()
    writer = BagWriter(out_bag, store, storage)
    model_name = str(getattr(policy, "model_name", "")) or Path(config.model.checkpoint).name
    replay = OfflineReplay(config, policy, seed=seed, executor=executor, latency=latency,
                           writer=writer, store=store, node_name=node_name,
                           model_name=model_name, progress=progress)
    topics = {c.topic: i for i, c in enumerate(config.cameras)}
    topics[config.joint_states_topic] = len(config.cameras)
    prompt_topic = prompt_topic or f"/{node_name.strip('/')}/prompt"
    try:
        with Reader(bag) as reader:
            conns = _check_connections(reader, config, topics, prompt_topic, bag)
            classes = {c.msgtype: message_class(c.msgtype) for c in conns}
            from rclpy.serialization import deserialize_message

            start = None
            for conn, log_ns, raw in reader.messages(connections=conns):
                start = log_ns if start is None else start
                if duration is not None and log_ns - start > duration * NS_PER_S:
                    break
                msg = deserialize_message(bytes(raw), classes[conn.msgtype])
                if conn.topic == prompt_topic:
                    replay.set_prompt(log_ns, msg.data)
                else:
                    replay.feed(topics[conn.topic], log_ns, msg)
        result = replay.finish()
    finally:
        writer.close()
    result.wall_s = time.perf_counter() - wall0
    chunks = [r.actions for r in result.chunks]
    stamps = np.asarray([r.stamp_ns for r in result.chunks], np.int64)
    chunks_file = out / "chunks.npz"
    np.savez(chunks_file, stamps=stamps, actions=np.asarray(chunks, np.float32).reshape(
        len(chunks), -1, len(config.action_joint_names)))
    digest = actions_digest(chunks)
    comparison = None
    if compare is not None:
        g_stamps, golden = read_action_chunks(compare)
        comparison = compare_actions(stamps, chunks, g_stamps, golden, atol)
    plot_paths = write_plots(out / "plots", result, config) if plots else []
    report = out / "report.md"
    write_report(report, result, config, bag=bag, output_bag=out_bag, plots=plot_paths,
                 seed=seed, digest=digest, comparison=comparison)
    return ReplayOutput(result, out_bag, report, plot_paths, chunks_file, digest, comparison)


def warm_up(policy: Any, config: Any, size: int = 224) -> None:
    """The node's warm-up (``model.warmup`` inferences on black frames, zero state), with its
    own noise so the replay's noise stream is untouched; checks the action width."""
    from pi0_ros.ros.node import policy_observation

    slots = tuple(getattr(policy, "camera_slots", None) or (c.slot for c in config.cameras))
    images = {slot: np.zeros((size, size, 3), np.uint8) for slot in slots}
    state = np.zeros(len(config.state_joint_names), np.float32)
    s = policy.settings
    noise = np.zeros((s.action_horizon, s.model_action_dim), np.float32)
    for _ in range(max(config.model.warmup, 1)):
        out = policy.infer(policy_observation(images, state, config.prompt), noise=noise)
    shape = np.asarray(out["actions"]).shape
    if len(shape) != 2 or shape[1] != len(config.action_joint_names):
        raise ReplayError(f"the policy outputs actions of shape {list(shape)} but "
                          f"actions.joint_names has {len(config.action_joint_names)} names "
                          "(checkpoint and parameters do not match)")


def _check_connections(reader: Any, config: Any, topics: Mapping[str, int], prompt_topic: str,
                       bag: Path) -> list:
    expected = {c.topic: ("sensor_msgs/msg/CompressedImage" if c.compressed
                          else "sensor_msgs/msg/Image") for c in config.cameras}
    expected[config.joint_states_topic] = "sensor_msgs/msg/JointState"
    present = {c.topic: c.msgtype for c in reader.connections}
    missing = [t for t in expected if t not in present]
    if missing:
        raise ReplayError(f"{bag} has no topic(s) {missing} named by the parameters; the bag has "
                          f"{sorted(present)}")
    for topic, msgtype in expected.items():
        if present[topic] != msgtype:
            raise ReplayError(f"{bag}: topic {topic} is {present[topic]} but the parameters "
                              f"expect {msgtype} (cameras.transports)")
    conns = [c for c in reader.connections if c.topic in topics]
    conns += [c for c in reader.connections
              if c.topic == prompt_topic and c.msgtype == "std_msgs/msg/String"]
    return conns


# ---------------------------------------------------------------------------------------------
# live mode


def play_live(bag: str | Path, *, rate: float = 1.0, clock: bool = False,
              clock_rate: float = 100.0, topics: Sequence[str] | None = None,
              wait: float = 5.0, args: Sequence[str] | None = None) -> int:
    """Publish a bag's messages at their recorded pace (``rate`` x), with /clock if asked."""
    import rclpy
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from rosbags.rosbag2 import Reader
    from rosgraph_msgs.msg import Clock

    from pi0_ros.ros.conversions import ns_to_stamp

    if not rate > 0:
        raise ReplayError(f"--rate must be > 0, got {rate}")
    bag = Path(bag)
    if not (bag / "metadata.yaml").is_file():
        raise ReplayError(f"{bag} is not a rosbag2 bag directory (no metadata.yaml)")
    rclpy.init(args=list(args) if args else None)
    node = rclpy.create_node("pi0_bag_player")
    try:
        with Reader(bag) as reader:
            conns = [c for c in reader.connections if topics is None or c.topic in topics]
            if not conns:
                raise ReplayError(f"{bag}: no messages on {list(topics or [])}")
            pubs = {}
            for c in conns:
                qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
                if c.msgtype == "std_msgs/msg/String":  # prompts: late joiners get the last one
                    qos.durability = DurabilityPolicy.TRANSIENT_LOCAL
                pubs[c.id] = node.create_publisher(message_class(c.msgtype), c.topic, qos)
            clock_pub = node.create_publisher(Clock, "/clock", 10) if clock else None
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and not all(
                    p.get_subscription_count() for p in pubs.values()
                    if p.topic_name != "/clock"):
                time.sleep(0.05)
            count, start_ns, wall0 = 0, None, time.monotonic()
            next_clock = 0.0
            for conn, log_ns, raw in reader.messages(connections=conns):
                if start_ns is None:
                    start_ns = log_ns
                target = wall0 + (log_ns - start_ns) / NS_PER_S / rate
                while True:
                    now = time.monotonic()
                    if clock_pub is not None and now >= next_clock:
                        bag_now = start_ns + int(min(now - wall0, (target - wall0))
                                                 * rate * NS_PER_S)
                        clock_pub.publish(Clock(clock=ns_to_stamp(bag_now)))
                        next_clock = now + 1.0 / clock_rate
                    if now >= target:
                        break
                    time.sleep(min(target - now, 1.0 / clock_rate if clock_pub else 0.05))
                if clock_pub is not None:
                    clock_pub.publish(Clock(clock=ns_to_stamp(log_ns)))
                pubs[conn.id].publish(bytes(raw))
                count += 1
            print(f"pi0-ros-replay: published {count} messages from {bag}", flush=True)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pi0-ros-replay",
        description="Replay a rosbag2 bag through the pi0 policy and executor (offline, "
        "deterministic, with report and plots) or publish it into running nodes (--live).",
    )
    p.add_argument("bag", help="rosbag2 bag directory (sqlite3 or mcap)")
    p.add_argument("--config", help="policy node ros-args parameter file (offline mode)")
    p.add_argument("--checkpoint", help="checkpoint directory (overrides the file's)")
    p.add_argument("--output", help="output directory: bag/, report.md, plots/, chunks.npz")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default %(default)s)")
    p.add_argument("--compare", metavar="GOLDEN_BAG",
                   help="exit 1 if the actions differ from this earlier output bag")
    p.add_argument("--atol", type=float, default=0.0,
                   help="--compare tolerance on |actions - golden| (default %(default)s)")
    p.add_argument("--node-name", default=DEFAULT_NODE,
                   help="policy node name in the parameter file (default %(default)s)")
    p.add_argument("--executor-node-name", default=DEFAULT_EXECUTOR_NODE,
                   help="executor node name in the parameter files (default %(default)s)")
    p.add_argument("--executor-config", help="executor parameter file (default: --config)")
    p.add_argument("--prompt-topic", help="std_msgs/String prompt topic (default /<node>/prompt)")
    p.add_argument("--latency", type=float, default=0.0,
                   help="simulated bag-time delay of each chunk, seconds (default 0)")
    p.add_argument("--duration", type=float, help="replay only the first N seconds of the bag")
    p.add_argument("--storage", choices=("sqlite3", "mcap"), default="sqlite3",
                   help="output bag storage (default %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    live = p.add_argument_group("live mode")
    live.add_argument("--live", action="store_true", help="publish the bag into running nodes")
    live.add_argument("--rate", type=float, default=1.0, help="playback rate (default 1.0)")
    live.add_argument("--clock", action="store_true", help="publish /clock (bag time)")
    live.add_argument("--topics", nargs="+", help="only these topics")
    live.add_argument("--wait", type=float, default=5.0,
                      help="seconds to wait for subscribers before playing (default 5)")
    return p


def _progress_printer(total_s: float | None, every: float = 1.0) -> Callable:
    """A progress callback printing one line per ``every`` seconds of bag time."""
    last = [-float("inf")]

    def show(replay: OfflineReplay) -> None:
        res = replay.result
        t = (replay.now - res.start_ns) / NS_PER_S
        if t - last[0] < every:
            return
        last[0] = t
        lat = _percentiles(res.latencies[-50:])
        of = f"/{total_s:.1f}" if total_s else ""
        rate = f"{len(res.chunks) / t:4.1f} Hz" if t >= 1.0 else "   - Hz"
        print(f"  bag t={t:5.1f}{of} s  chunks {len(res.chunks):4d}  latency p50 "
              f"{lat.get('p50', 0):6.1f} ms  rate {rate}", flush=True)

    return show


def _bag_duration(bag: Path) -> float | None:
    try:
        from rosbags.rosbag2 import Reader

        with Reader(bag) as reader:
            return reader.duration / NS_PER_S
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    args, ros_args = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    try:
        if args.live:
            return play_live(args.bag, rate=args.rate, clock=args.clock, topics=args.topics,
                             wait=args.wait, args=ros_args)
        if ros_args:
            parser.error(f"unrecognized arguments: {' '.join(ros_args)}")
        if not args.config or not args.output:
            parser.error("offline replay needs --config PARAMS.yaml and --output OUT_DIR "
                         "(or --live)")
        if args.compare is not None and not args.atol >= 0:
            parser.error(f"--atol must be >= 0, got {args.atol}")
        progress = None if args.quiet else _progress_printer(
            args.duration or _bag_duration(Path(args.bag)))
        out = run_offline(
            args.bag, args.config, args.output, checkpoint=args.checkpoint, seed=args.seed,
            node_name=args.node_name, executor_node=args.executor_node_name,
            executor_config=args.executor_config, prompt_topic=args.prompt_topic,
            latency=args.latency, storage=args.storage, plots=not args.no_plots,
            compare=args.compare, atol=args.atol, duration=args.duration, progress=progress,
        )
    except ReplayError as exc:
        print(f"pi0-ros-replay: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    res = out.result
    lat = _percentiles(res.latencies)
    print(f"replayed {(res.end_ns - res.start_ns) / NS_PER_S:.1f} s of bag in {res.wall_s:.1f} s:"
          f" {len(res.chunks)} chunks, latency p50 {lat.get('p50', 0):.1f} ms / p99 "
          f"{lat.get('p99', 0):.1f} ms, {len(res.commands)} executor commands")
    print(f"actions sha256: {out.digest}")
    print(f"output bag: {out.bag}")
    print(f"report:     {out.report}")
    if out.plots:
        print(f"plots:      {out.plots[0].parent}/ ({len(out.plots)} PNG)")
    if out.comparison is not None:
        print(f"compare:    {'PASS' if out.comparison.ok else 'FAIL'}: {out.comparison.message}")
        if not out.comparison.ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
