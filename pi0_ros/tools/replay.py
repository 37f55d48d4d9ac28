"""pi0-ros-replay: run a recorded rosbag2 bag through the policy and the executor, offline or live.

Offline (deterministic, no ROS graph)::

    pi0-ros-replay BAG --config PARAMS.yaml [--checkpoint DIR] --output OUT_DIR [--seed N]
                   [--compare GOLDEN_BAG --atol X]

``PARAMS.yaml`` is the policy node's ros-args parameter file (the same file configures the live
node); an executor section in it (or ``--executor-config``) configures the executor. The bag's
camera topics (Image or CompressedImage), joint states and optional prompt (std_msgs/String on
``--prompt-topic``, default ``/<node>/prompt`` or the bag's one ``.../prompt`` topic) go
through the live nodes' own code: ``ros.params.config_from_parameters``,
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

    pi0-ros-replay BAG --live [--rate R] [--clock] [--loop] [--topics T ...] [--ros-args ...]

Exit status: 0 success, 1 ``--compare`` mismatch, 2 usage / input error.

Size (~690 lines, over the house's ~600): the offline loop on bag time, its driver and the CLI;
bag I/O, the executor side and the report are in replay_bag.py, replay_executor.py and
replay_report.py.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from pi0_ros.stats import percentiles
from pi0_ros.tools.replay_bag import (  # noqa: F401  (re-exported: the replay's public API)
    ACTION_CHUNK_MSG,
    ACTION_CHUNK_TYPE,
    BagWriter,
    ReplayError,
    action_chunk_bytes,
    choose_prompt_topic,
    message_class,
    play_live,
    read_action_chunks,
    typestore,
)
from pi0_ros.tools.replay_executor import ControlExecutor, _resolve, make_executor
from pi0_ros.tools.replay_report import (  # noqa: F401  (re-exported)
    Comparison,
    actions_digest,
    compare_actions,
    executor_summary,
    quiet_repeated_rejections,
    seams,
    write_plots,
    write_report,
)

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
DEFAULT_NODE = "pi0_policy_node"
DEFAULT_EXECUTOR_NODE = "pi0_executor_node"
OUTPUT_TYPES = {  # ros/outputs.chunk_messages key -> message type in the output bag
    "chunk": ACTION_CHUNK_TYPE,
    "trajectory": "trajectory_msgs/msg/JointTrajectory",
    "planned": "sensor_msgs/msg/JointState",
    "markers": "visualization_msgs/msg/MarkerArray",
}


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
    """The live node's NodeConfig from parameter values (same defaults, same validation; a
    name the node does not declare is refused, naming the closest declared one)."""
    from pi0_ros.pipeline import config_from_values

    try:
        return config_from_values(dict(params))
    except ValueError as exc:
        raise ReplayError(f"invalid policy parameters: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# offline replay


@dataclass
class ChunkRecord:
    stamp_ns: int  # observation stamp: action k is for stamp + k * dt
    arrival_ns: int  # bag time the chunk reaches the executor
    actions: np.ndarray  # (H, D) float32
    latency: float  # wall seconds of policy.infer
    input_stamps: tuple[int, ...] = ()  # the observation's inputs (cameras, joint state)
    rtc_delay: int = 0  # RTC: the chunk starts at this action (ActionChunk.rtc_delay)


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
    prompts: list[tuple[int, str]] = field(default_factory=list)
    diagnostics: list[tuple[int, int, str]] = field(default_factory=list)  # (t, level, message)
    wall_s: float = 0.0


class OfflineReplay:
    """Feeds bag messages (in log-time order) through the live node's pipeline on bag time.

    The pipeline (``pi0_ros.pipeline.PolicyPipeline``) is the node's: the same gate, synchronizer
    contract, assembly, noise, result checks, counters and diagnostics, with bag time as its
    clock. The policy is bound by :meth:`bind`; ``executor`` is a :class:`ControlExecutor` or
    None. ``observations``: re-run exactly these sets (each a tuple of input stamps: cameras,
    then joint state; a live run's ActionChunk ``input_stamps``) instead of the approximate-time
    synchronizer's choice, without the rate cap.
    """

    def __init__(
        self, config: Any, *, executor: ControlExecutor | None,
        latency: float = 0.0, writer: BagWriter | None = None, store: Any = None,
        node_name: str = DEFAULT_NODE, progress: Callable | None = None,
        observations: Sequence[Sequence[int]] | None = None,
    ) -> None:
        from pi0_ros.pipeline import PolicyPipeline
        from pi0_ros.ros import conversions as conv
        from pi0_ros.ros.sync import make_synchronizer

        from pi0_ros.ros.sync import KeyedSynchronizer

        if observations is not None:
            # The observations are chosen by the live run: its rate cap already decided.
            config = dataclasses.replace(config, max_rate=0.0)

            def make_sync(n: int, _queue: int, _slop: float) -> Any:
                return KeyedSynchronizer(n, observations)
        else:
            def make_sync(n: int, queue: int, slop: float) -> Any:
                # The node prefers message_filters; the project's synchronizer has the same
                # contract and is used here so replays are identical with or without it.
                return make_synchronizer(n, queue, slop, prefer_message_filters=False)
        self.config = config
        self.executor = executor
        self.latency_ns = int(round(latency * NS_PER_S))
        self.writer = writer
        self.store = store
        self.ns = f"/{node_name.strip('/')}"
        self.progress = progress
        self._msgs_built = _msgs_built()  # pi0_ros_msgs importable: its ActionChunk, else rosbags'
        self.n_inputs = len(config.cameras) + 1
        self.now = 0
        self.pipeline = PolicyPipeline(
            config, clock=lambda: self.now, image_of=conv.to_rgb,
            state_of=conv.joint_state_to_vector, make_sync=make_sync,
            sink=self._on_observation, monotonic=time.perf_counter, logger=log)
        # RTC: the chunks reach the executor `latency` s of bag time after acceptance.
        self.pipeline.delivery_delay = latency
        self.result = ReplayResult(prompt=config.prompt)
        self.pending: list[ChunkRecord] = []  # computed, not yet arrived at the executor
        self.next_diag: int | None = None
        self.next_watch: int | None = None
        self.diag_period = int(config.diagnostics_period * NS_PER_S)
        # The node's silence watchdog period, on bag time.
        self.watch_period = int(min(config.max_input_age / 4.0, 0.1) * NS_PER_S)
        self._flushing = False

    def bind(self, policy: Any) -> None:
        """Bind and warm up the policy (the node's configure); the gate opens (activate) at the
        bag's first message."""
        self.pipeline.bind(policy)

    # -- input side ----------------------------------------------------------------------------
    def feed(self, index: int, log_ns: int, msg: Any) -> None:
        """One camera (index < n-1) or JointState (index n-1) message received at ``log_ns``."""
        from pi0_ros.ros import conversions as conv

        self.advance(log_ns)
        if index == self.n_inputs - 1:
            try:
                state = conv.joint_state_to_vector(msg, self.config.state_joint_names)
            except conv.ConversionError:
                state = None  # counted by the pipeline when (if) it is part of a set
            if state is not None:
                self.result.state_times.append(conv.stamp_to_ns(msg.header.stamp))
                self.result.states.append(state)
                if self.executor is not None:
                    self.executor.joint_state(log_ns, state)
        self.pipeline.on_input(index, conv.stamp_to_ns(msg.header.stamp), msg)

    def set_prompt(self, log_ns: int, text: str) -> None:
        self.advance(log_ns)
        if self.pipeline.set_prompt(text):
            self.result.prompt = text
            self.result.prompts.append((log_ns, text))

    def _on_observation(self, obs: Any) -> None:
        """Pipeline sink: infer synchronously (no latest-only drops offline)."""
        pipe = self.pipeline
        self.result.observations += 1
        t0 = time.perf_counter()
        try:
            chunk = pipe.infer(obs)
        except Exception as exc:  # the node's worker reports it the same way and keeps going
            pipe.reject("inference_error", f"infer failed: {type(exc).__name__}: {exc}")
            return
        wall = time.perf_counter() - t0
        chunk = pipe.accept(chunk)
        if chunk is None:
            return
        self.result.latencies.append(wall)
        record = ChunkRecord(obs.stamp_ns, self.now + self.latency_ns, chunk.actions, wall,
                             obs.input_stamps, chunk.rtc_delay)
        self.result.chunks.append(record)
        self._write_chunk(chunk, record.arrival_ns)
        if self.latency_ns == 0:
            self._deliver(record)
        else:
            self.pending.append(record)
        if self.progress is not None:
            self.progress(self)

    def _write_chunk(self, chunk: Any, at: int) -> None:
        from pi0_ros.ros import outputs

        if self.writer is None:
            return
        chunk_type = None if self._msgs_built else self._chunk_bytes
        msgs = outputs.chunk_messages(self.config, chunk, now_ns=at,
                                      model_name=self.pipeline.policy.model_name,
                                      rate_hz=self.pipeline.output_rate_hz(),
                                      chunk_type=chunk_type)
        for key, msg in msgs.items():
            topic = f"{self.ns}/{outputs.OUTPUT_TOPICS[key][2:]}"
            self.writer.write(topic, OUTPUT_TYPES[key], at, msg)

    def _chunk_bytes(self, actions: np.ndarray, **fields: Any) -> bytes:
        fields["latency"] = fields.pop("inference_latency")
        return action_chunk_bytes(self.store, actions, **fields)

    def _deliver(self, rec: ChunkRecord) -> None:
        if self.executor is not None:
            state = self.result.states[-1] if self.result.states else None
            self.executor.add_chunk(rec, self.config, state)

    # -- time ----------------------------------------------------------------------------------
    def advance(self, log_ns: int) -> None:
        """Move bag time to ``log_ns``: deliver arrived chunks, run executor ticks, the silence
        watchdog and diagnostics, in time order."""
        if not self.result.start_ns:
            self.result.start_ns = self.now = log_ns
            self.next_diag = log_ns + self.diag_period
            self.next_watch = log_ns + self.watch_period
            self.pipeline.start()
        while True:
            due = [r for r in self.pending if r.arrival_ns <= log_ns]
            tick = self.executor.next_tick() if self.executor is not None else None
            first_chunk = min((r.arrival_ns for r in due), default=None)
            # After the bag's last message (flushing the executor) bag time stands still for the
            # pipeline, as sim time does for a live node when the player stops its /clock.
            watch = (None, None) if self._flushing else (self.next_watch, self.next_diag)
            candidates = [t for t in (first_chunk, tick, *watch)
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
            elif t == self.next_watch:
                self.next_watch = t + self.watch_period
                self.pipeline.check_silence()
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
        """The node's /diagnostics (same level, message and values), on bag time."""
        from pi0_ros.ros import outputs

        self.next_diag = t + self.diag_period
        level, message, values = self.pipeline.diagnostics("active")
        self.result.diagnostics.append((t, level, message))
        if self.writer is None:
            return
        msg = outputs.diagnostics(f"{self.ns.strip('/')}: policy",
                                  self.pipeline.policy.model_name or "pi0", level, message,
                                  values, t)
        self.writer.write("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray", t, msg)

    def finish(self) -> ReplayResult:
        """Flush: deliver pending chunks and run the executor to the end of the last chunk."""
        end = self.result.end_ns
        for rec in self.result.chunks:
            end = max(end, rec.arrival_ns + int(
                rec.actions.shape[0] * self.config.action_dt * NS_PER_S))
        self._flushing = True
        self.advance(end)
        self.result.counts.update(self.pipeline.counts())
        sync = self.pipeline.sync
        self.result.sync_dropped = int(getattr(sync, "dropped", 0))
        if self.executor is not None:
            self.result.executor_events.update(self.executor.events())
            self.result.executor_name = self.executor.name
        return self.result


def _msgs_built() -> bool:
    try:
        import pi0_ros_msgs.msg  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_topics(config: Any, node_ns: str) -> Any:
    """The node's input topics as a node named ``node_ns`` in the root namespace resolves them
    (relative ``joint_states`` -> ``/joint_states``; ``~/x`` -> ``/<node>/x``): bag topics are
    absolute."""
    cameras = tuple(dataclasses.replace(c, topic=_resolve(c.topic, node_ns))
                    for c in config.cameras)
    return dataclasses.replace(config, cameras=cameras,
                               joint_states_topic=_resolve(config.joint_states_topic, node_ns))



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
    checkpoint: str | None = None, seed: int | None = None, node_name: str = DEFAULT_NODE,
    executor_node: str = DEFAULT_EXECUTOR_NODE, executor_config: str | Path | None = None,
    prompt_topic: str | None = None, latency: float = 0.0, storage: str = "sqlite3",
    plots: bool = True, compare: str | Path | None = None, atol: float = 0.0,
    duration: float | None = None, policy_factory: Callable | None = None,
    progress: Callable | None = None, observations: Sequence[Sequence[int]] | None = None,
    units: Mapping[str, str] | None = None,
) -> ReplayOutput:
    """The offline replay (see the module docstring); raises ReplayError on bad input.

    ``seed``: overrides the parameter file's ``model.seed``; ``observations``: re-run exactly
    these input-stamp sets (a live run's chunks, ``read_action_chunks(..., with_inputs=True)``)
    for the live-vs-replay parity check."""
    from rosbags.rosbag2 import Reader

    from pi0_ros.pipeline import load_policy

    wall0 = time.perf_counter()
    bag = Path(bag)
    if not (bag / "metadata.yaml").is_file():
        raise ReplayError(f"{bag} is not a rosbag2 bag directory (no metadata.yaml)")
    params = node_parameters(config_file, node_name)
    if checkpoint:
        params["checkpoint"] = str(checkpoint)
    if seed is not None:
        params["model.seed"] = int(seed)
    config = resolve_topics(policy_config(params), f"/{node_name.strip('/')}")
    exec_params = node_parameters(executor_config or config_file, executor_node)
    executor = make_executor(exec_params, config, executor_node)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    out_bag = out / "bag"
    if out_bag.exists():
        if not (out_bag / "metadata.yaml").is_file():
            raise ReplayError(f"{out_bag} exists and is not a bag; not overwriting")
        shutil.rmtree(out_bag)
    factory = policy_factory or load_policy
    try:
        policy = factory(config, tuple(c.slot for c in config.cameras))
    except Exception as exc:
        raise ReplayError(f"cannot load the policy: {type(exc).__name__}: {exc}") from exc
    store = typestore()
    replay = OfflineReplay(config, executor=executor, latency=latency, store=store,
                           node_name=node_name, progress=progress, observations=observations)
    try:
        replay.bind(policy)
    except Exception as exc:
        policy.close()
        raise ReplayError(f"cannot use the policy: {type(exc).__name__}: {exc}") from exc
    writer = replay.writer = BagWriter(out_bag, store, storage)
    topics = {c.topic: i for i, c in enumerate(config.cameras)}
    topics[config.joint_states_topic] = len(config.cameras)
    try:
        with Reader(bag) as reader:
            prompt_topic = _prompt_topic(reader, node_name, prompt_topic)
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
        policy.close()
    result.wall_s = time.perf_counter() - wall0
    chunks = [r.actions for r in result.chunks]
    stamps = np.asarray([r.stamp_ns for r in result.chunks], np.int64)
    chunks_file = out / "chunks.npz"
    dims = len(config.action_joint_names)
    np.savez(chunks_file, stamps=stamps, actions=np.asarray(chunks, np.float32).reshape(
        len(chunks), -1, dims) if chunks else np.zeros((0, 0, dims), np.float32))
    digest = actions_digest(chunks)
    comparison = None
    if compare is not None:
        g_stamps, golden = read_action_chunks(compare)
        comparison = compare_actions(stamps, chunks, g_stamps, golden, atol,
                                     config.action_joint_names)
    plot_paths = write_plots(out / "plots", result, config, units) if plots else []
    report = out / "report.md"
    write_report(report, result, config, bag=bag, output_bag=out_bag, plots=plot_paths,
                 seed=config.model.seed, digest=digest, comparison=comparison)
    return ReplayOutput(result, out_bag, report, plot_paths, chunks_file, digest, comparison)


def _prompt_topic(reader: Any, node_name: str, explicit: str | None) -> str | None:
    """The bag's prompt topic (``replay_bag.choose_prompt_topic``); warns about prompt-like
    String topics left unread."""
    chosen, unread = choose_prompt_topic(
        [(c.topic, c.msgtype) for c in reader.connections], node_name, explicit)
    if chosen and not explicit:
        log.info("prompts from the bag's %s", chosen)
    for topic in unread:
        log.warning("the bag's %s (std_msgs/String) is not read%s; replay it as the prompt "
                    "with --prompt-topic %s", topic, f" (prompts come from {chosen})"
                    if chosen else "", topic)
    return chosen


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
    p.add_argument("--seed", type=int, default=None,
                   help="noise seed (default: the parameter file's model.seed)")
    p.add_argument("--compare", metavar="GOLDEN_BAG",
                   help="exit 1 if the actions differ from this earlier output bag")
    p.add_argument("--atol", type=float, default=0.0,
                   help="--compare tolerance on |actions - golden| (default %(default)s)")
    p.add_argument("--node-name", default=DEFAULT_NODE,
                   help="policy node name in the parameter file (default %(default)s)")
    p.add_argument("--executor-node-name", default=DEFAULT_EXECUTOR_NODE,
                   help="executor node name in the parameter files (default %(default)s)")
    p.add_argument("--executor-config", help="executor parameter file (default: --config)")
    p.add_argument("--prompt-topic",
                   help="the bag's std_msgs/String prompt topic (default: /<node>/prompt, else "
                   "the bag's one topic named .../prompt; other prompt-like topics are warned "
                   "about)")
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
    live.add_argument("--loop", action="store_true",
                      help="play the bag again and again until Ctrl-C (/clock goes back)")
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
        lat = percentiles(res.latencies[-50:], scale=1e3)
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
    quiet_repeated_rejections()  # one log line per executor rejection reason; counts below
    parser = build_parser()
    try:
        if args.live:
            if ros_args and ros_args[0] != "--ros-args":  # only ROS arguments go to rclpy
                parser.error(f"unrecognized arguments: {' '.join(ros_args)} (ROS arguments "
                             "go after --ros-args)")
            return play_live(args.bag, rate=args.rate, clock=args.clock, topics=args.topics,
                             wait=args.wait, args=ros_args, loop=args.loop)
        if args.loop:
            parser.error("--loop is a --live option (the offline replay reads the bag once)")
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
    lat = percentiles(res.latencies, scale=1e3)
    print(f"replayed {(res.end_ns - res.start_ns) / NS_PER_S:.1f} s of bag in {res.wall_s:.1f} s:"
          f" {len(res.chunks)} chunks, latency p50 {lat.get('p50', 0):.1f} ms / p99 "
          f"{lat.get('p99', 0):.1f} ms, {len(res.commands)} executor commands")
    print(f"actions sha256: {out.digest}")
    print(f"output bag: {out.bag}")
    print(f"report:     {out.report}")
    if out.plots:
        print(f"plots:      {out.plots[0].parent}/ ({len(out.plots)} PNG)")
    if executor_summary(res):
        print(executor_summary(res))
    if out.comparison is not None:
        print(f"compare:    {'PASS' if out.comparison.ok else 'FAIL'}: {out.comparison.message}")
        if not out.comparison.ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
