"""Bag I/O of pi0-ros-replay: the rosbags typestore (+ pi0_ros_msgs/ActionChunk), an output bag
writer, reading ActionChunks back, and publishing a bag into running nodes (``--live``)."""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

NS_PER_S = 1_000_000_000


class ReplayError(Exception):
    """A user-facing error (bad arguments, bag or parameters): printed, exit status 2."""


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
builtin_interfaces/Time[] input_stamps
uint32 rtc_delay
"""
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
    latency: float, sequence: int, model_name: str, input_stamps: Sequence[int] = (),
    rtc_delay: int = 0,
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
        input_stamps=[t["builtin_interfaces/msg/Time"](sec=s // NS_PER_S, nanosec=s % NS_PER_S)
                      for s in map(int, input_stamps)],
        rtc_delay=int(rtc_delay),
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
# prompt topic

STRING_TYPE = "std_msgs/msg/String"
PROMPT_WORDS = ("prompt", "instruction")  # String topics with these in the name look like prompts


def choose_prompt_topic(connections: Sequence[tuple[str, str]], node: str,
                        explicit: str | None = None) -> tuple[str | None, list[str]]:
    """Which of a bag's (topic, type) connections the replay reads prompts from, and the
    prompt-like std_msgs/String topics it leaves unread (to warn about).

    ``explicit`` (``--prompt-topic``) must be a String topic of the bag. Otherwise the node's
    own ``/<node>/prompt`` (what the live node subscribes to as ``~/prompt``), else the bag's
    one String topic whose last name is ``prompt`` (``/prompt``, ``/robot1/prompt``, ...);
    with several such topics none is guessed."""
    strings = sorted({t for t, typ in connections if typ == STRING_TYPE})
    types = dict(connections)
    if explicit:
        if explicit not in types:
            raise ReplayError(f"--prompt-topic {explicit}: not in the bag (its std_msgs/String "
                              f"topics: {strings or 'none'})")
        if types[explicit] != STRING_TYPE:
            raise ReplayError(f"--prompt-topic {explicit}: is {types[explicit]}, expected "
                              f"{STRING_TYPE}")
        chosen: str | None = explicit
    else:
        own = f"/{node.strip('/')}/prompt"
        named = [t for t in strings if t.rstrip("/").split("/")[-1] == "prompt"]
        chosen = own if own in strings else (named[0] if len(named) == 1 else None)
    unread = [t for t in strings if t != chosen
              and any(w in t.rsplit("/", 1)[-1].lower() for w in PROMPT_WORDS)]
    return chosen, unread


# ---------------------------------------------------------------------------------------------
# live mode


def play_live(bag: str | Path, *, rate: float = 1.0, clock: bool = False,
              clock_rate: float = 100.0, topics: Sequence[str] | None = None,
              wait: float = 5.0, args: Sequence[str] | None = None, loop: bool = False) -> int:
    """Publish a bag's messages at their recorded pace (``rate`` x), with /clock if asked.

    ``loop``: start over at the end, until interrupted (Ctrl-C: exit status 0). Like
    ``ros2 bag play --loop``, the messages and /clock go back to the bag's start each time; the
    policy node resets its input history on such a clock jump (``clock_jumps_back``)."""
    import rclpy
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from rosbags.rosbag2 import Reader
    from rosgraph_msgs.msg import Clock

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
            count, passes = 0, 0
            try:
                while True:
                    count += _play_once(reader, conns, pubs, clock_pub, rate, clock_rate)
                    passes += 1
                    if not loop:
                        break
                    print(f"pi0-ros-replay: end of {bag} (pass {passes}), looping", flush=True)
            except KeyboardInterrupt:
                if not loop:
                    raise
            print(f"pi0-ros-replay: published {count} messages from {bag}"
                  + (f" ({passes} full passes)" if loop else ""), flush=True)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0




def _play_once(reader: Any, conns: Sequence[Any], pubs: dict, clock_pub: Any, rate: float,
               clock_rate: float) -> int:
    """One pass over the bag at ``rate`` x its recorded pace; returns the message count."""
    from rosgraph_msgs.msg import Clock

    from pi0_ros.ros.conversions import ns_to_stamp

    count, start_ns, wall0 = 0, None, time.monotonic()
    next_clock = 0.0
    for conn, log_ns, raw in reader.messages(connections=conns):
        if start_ns is None:
            start_ns = log_ns
        target = wall0 + (log_ns - start_ns) / NS_PER_S / rate
        while True:
            now = time.monotonic()
            if clock_pub is not None and now >= next_clock:
                bag_now = start_ns + int(min(now - wall0, (target - wall0)) * rate * NS_PER_S)
                clock_pub.publish(Clock(clock=ns_to_stamp(bag_now)))
                next_clock = now + 1.0 / clock_rate
            if now >= target:
                break
            time.sleep(min(target - now, 1.0 / clock_rate if clock_pub else 0.05))
        if clock_pub is not None:
            clock_pub.publish(Clock(clock=ns_to_stamp(log_ns)))
        pubs[conn.id].publish(bytes(raw))
        count += 1
    return count
