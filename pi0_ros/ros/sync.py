"""Approximate-time synchronization of camera images and joint states.

The contract is message_filters' Python ``ApproximateTimeSynchronizer`` (ros2/message_filters,
``src/message_filters/__init__.py``), reproduced on integer nanosecond stamps so that it runs
without rclpy and can be property-tested against a reference:

- one queue per input, keyed by stamp (a second message with the same stamp replaces the first);
  a queue longer than ``queue_size`` drops its oldest stamps;
- when a message arrives, every *other* queue contributes the stamps within ``slop`` of the new
  stamp (``|delta| <= slop``), sorted by ``|delta|``; the candidate sets are tried in
  ``itertools.product`` order and the first set with ``max - min < slop`` (strict) whose members
  are all still queued is emitted, and its members are removed from their queues;
- messages older than an emitted set are *not* removed (message_filters keeps them; they fall out
  of the queue by size). The node rejects sets that are not newer than the last one it used.

``make_synchronizer`` uses message_filters itself when it is importable and this class otherwise;
both expose ``add(index, stamp_ns, msg)``. The callback is called outside the lock with one
message per input, in input order.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Any

NS_PER_S = 1_000_000_000

SyncCallback = Callable[..., None]


def slop_to_ns(slop: float) -> int:
    """Seconds -> nanoseconds exactly as ``rclpy.duration.Duration(seconds=slop)`` truncates."""
    return int(slop * NS_PER_S)


class ApproximateTimeSynchronizer:
    """message_filters' approximate-time policy for ``num_inputs`` inputs (see module docstring).

    Thread-safe: ``add`` may be called from several executor threads.
    ``dropped`` counts messages that left a queue without being part of an emitted set
    (overflow of ``queue_size`` or replaced by a message with the same stamp).
    """

    def __init__(
        self, num_inputs: int, queue_size: int, slop: float, callback: SyncCallback | None = None
    ) -> None:
        if num_inputs < 1:
            raise ValueError(f"num_inputs must be >= 1, got {num_inputs}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if not slop >= 0.0:
            raise ValueError(f"slop must be >= 0 seconds, got {slop}")
        self.queue_size = int(queue_size)
        self.slop_ns = slop_to_ns(slop)
        self._queues: list[dict[int, Any]] = [{} for _ in range(num_inputs)]
        self._callbacks: list[SyncCallback] = [callback] if callback is not None else []
        self._lock = threading.Lock()
        self.dropped = 0
        self.emitted = 0

    @property
    def num_inputs(self) -> int:
        return len(self._queues)

    def register_callback(self, callback: SyncCallback) -> None:
        self._callbacks.append(callback)

    def queue_lengths(self) -> list[int]:
        with self._lock:
            return [len(q) for q in self._queues]

    def clear(self) -> None:
        with self._lock:
            for q in self._queues:
                q.clear()

    def add(self, index: int, stamp_ns: int, msg: Any) -> bool:
        """Queue ``msg`` (stamped ``stamp_ns``) on input ``index``; True if a set was emitted."""
        with self._lock:
            matched = self._add_locked(index, int(stamp_ns), msg)
        if matched is None:
            return False
        for callback in self._callbacks:
            callback(*matched)
        return True

    def _add_locked(self, index: int, stamp: int, msg: Any) -> list[Any] | None:
        queue = self._queues[index]
        if stamp in queue:
            self.dropped += 1
        queue[stamp] = msg
        while len(queue) > self.queue_size:
            del queue[min(queue)]
            self.dropped += 1
        # Per other input: its stamps within slop of the new one, nearest first.
        candidates: list[list[int]] = []
        for i, other in enumerate(self._queues):
            if i == index:
                continue
            # Stable sort by |delta| over the queue's insertion order, as message_filters does.
            near = sorted(
                (s for s in other if abs(s - stamp) <= self.slop_ns), key=lambda s: abs(s - stamp)
            )
            if not near:
                return None
            candidates.append(near)
        for combo in itertools.product(*candidates):
            stamps = list(combo)
            stamps.insert(index, stamp)
            if max(stamps) - min(stamps) < self.slop_ns and all(
                s in q for q, s in zip(self._queues, stamps)
            ):
                msgs = [q.pop(s) for q, s in zip(self._queues, stamps)]
                self.emitted += 1
                return msgs
        return None


class MessageFiltersSynchronizer:
    """The same ``add(index, stamp_ns, msg)`` interface on top of message_filters itself.

    Messages must carry ``header.stamp`` (message_filters reads it; ``stamp_ns`` is ignored).
    """

    def __init__(
        self,
        message_filters: Any,
        num_inputs: int,
        queue_size: int,
        slop: float,
        callback: SyncCallback | None = None,
    ) -> None:
        if num_inputs < 1:
            raise ValueError(f"num_inputs must be >= 1, got {num_inputs}")
        self._inputs = [message_filters.SimpleFilter() for _ in range(num_inputs)]
        self._sync = message_filters.ApproximateTimeSynchronizer(self._inputs, queue_size, slop)
        self._emitted = 0
        self._sync.registerCallback(self._count)
        if callback is not None:
            self._sync.registerCallback(callback)
        self.dropped = 0  # message_filters does not report drops

    def _count(self, *_msgs: Any) -> None:
        self._emitted += 1

    @property
    def emitted(self) -> int:
        return self._emitted

    @property
    def num_inputs(self) -> int:
        return len(self._inputs)

    def register_callback(self, callback: SyncCallback) -> None:
        self._sync.registerCallback(callback)

    def queue_lengths(self) -> list[int]:
        return [len(q) for q in self._sync.queues]

    def clear(self) -> None:
        with self._sync.lock:
            for q in self._sync.queues:
                q.clear()

    def add(self, index: int, stamp_ns: int, msg: Any) -> bool:
        before = self._emitted
        self._inputs[index].signalMessage(msg)
        return self._emitted != before


class KeyedSynchronizer:
    """Emits exactly the sets named by ``keys`` (one stamp per input, in input order), each as
    soon as its last message has arrived; every other message is dropped (``dropped``).

    The offline replay uses it to re-run the observations a live run answered (ActionChunk
    ``input_stamps``): which set the approximate-time policy forms depends on the order messages
    arrive in, which DDS does not keep across topics, so a live run is reproduced from its sets.
    """

    def __init__(self, num_inputs: int, keys: Sequence[Sequence[int]],
                 callback: SyncCallback | None = None) -> None:
        self._keys = {tuple(int(s) for s in k) for k in keys}
        if any(len(k) != num_inputs for k in self._keys):
            raise ValueError(f"every key needs {num_inputs} stamps (one per input)")
        self._wanted = [{k[i] for k in self._keys} for i in range(num_inputs)]
        self._held: list[dict[int, Any]] = [{} for _ in range(num_inputs)]
        self._callbacks: list[SyncCallback] = [callback] if callback is not None else []
        self.dropped = 0

    @property
    def num_inputs(self) -> int:
        return len(self._held)

    def register_callback(self, callback: SyncCallback) -> None:
        self._callbacks.append(callback)

    def queue_lengths(self) -> list[int]:
        return [len(q) for q in self._held]

    def add(self, index: int, stamp_ns: int, msg: Any) -> bool:
        if stamp_ns not in self._wanted[index]:
            self.dropped += 1
            return False
        self._held[index][stamp_ns] = msg
        done = sorted(k for k in self._keys
                      if k[index] == stamp_ns and all(s in h for s, h in zip(k, self._held)))
        for key in done:
            self._keys.discard(key)
            msgs = [h[s] for s, h in zip(key, self._held)]
            for callback in self._callbacks:
                callback(*msgs)
        return bool(done)


def make_synchronizer(
    num_inputs: int,
    queue_size: int,
    slop: float,
    callback: SyncCallback | None = None,
    *,
    prefer_message_filters: bool = True,
) -> ApproximateTimeSynchronizer | MessageFiltersSynchronizer:
    """message_filters' synchronizer when importable (and preferred), else the local one."""
    if prefer_message_filters:
        try:
            import message_filters
        except ImportError:
            pass
        else:
            return MessageFiltersSynchronizer(
                message_filters, num_inputs, queue_size, slop, callback
            )
    return ApproximateTimeSynchronizer(num_inputs, queue_size, slop, callback)
