"""ApproximateTimeSynchronizer: message_filters' contract, edge cases and property tests.

The reference is message_filters itself when importable, else ``_Reference``: a line-by-line
transcription of ``ApproximateTimeSynchronizer.add`` from ros2/message_filters
(``src/message_filters/__init__.py``) on integer nanosecond stamps.
"""

from __future__ import annotations

import itertools
import random
import threading
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pi0_ros.ros.sync import (
    ApproximateTimeSynchronizer,
    MessageFiltersSynchronizer,
    make_synchronizer,
    slop_to_ns,
)

S = 1_000_000_000


class _Msg:
    """A message with only the fields the synchronizers read."""

    def __init__(self, stamp_ns: int, data: object = None) -> None:
        sec, nanosec = divmod(stamp_ns, S)
        self.header = types.SimpleNamespace(stamp=types.SimpleNamespace(sec=sec, nanosec=nanosec))
        self.stamp_ns = stamp_ns
        self.data = data

    def __repr__(self) -> str:
        return f"_Msg({self.stamp_ns}, {self.data!r})"


class _Reference:
    """message_filters' ApproximateTimeSynchronizer.add, transcribed onto int nanoseconds."""

    def __init__(self, n: int, queue_size: int, slop: float) -> None:
        self.queues: list[dict[int, object]] = [{} for _ in range(n)]
        self.queue_size = queue_size
        self.slop = slop_to_ns(slop)
        self.out: list[tuple] = []

    def add(self, msg: _Msg, my_queue_index: int) -> None:
        stamp = msg.stamp_ns
        my_queue = self.queues[my_queue_index]
        my_queue[stamp] = msg
        while len(my_queue) > self.queue_size:
            del my_queue[min(my_queue)]
        search_queues = self.queues[:my_queue_index] + self.queues[my_queue_index + 1 :]
        stamps = []
        for queue in search_queues:
            topic_stamps = []
            for s in queue:
                stamp_delta = abs(s - stamp)
                if stamp_delta > self.slop:
                    continue
                topic_stamps.append((s, stamp_delta))
            if not topic_stamps:
                return
            topic_stamps = sorted(topic_stamps, key=lambda x: x[1])
            stamps.append(topic_stamps)
        for vv in itertools.product(*[next(zip(*s)) for s in stamps]):
            vv = list(vv)
            vv.insert(my_queue_index, stamp)
            qt = list(zip(self.queues, vv))
            if (max(vv) - min(vv)) < self.slop and len([1 for q, t in qt if t not in q]) == 0:
                self.out.append(tuple(q[t] for q, t in qt))
                for q, t in qt:
                    del q[t]
                break


def _collect(sync: ApproximateTimeSynchronizer) -> list[tuple]:
    out: list[tuple] = []
    sync.register_callback(lambda *msgs: out.append(msgs))
    return out


def _feed(sync, events):
    for index, msg in events:
        sync.add(index, msg.stamp_ns, msg)


# --- message_filters' own test cases (test/test_approxsync.py) -------------------------------


def test_pairs_with_equal_stamps_combine():
    sync = ApproximateTimeSynchronizer(2, 1, 0.1)
    out = _collect(sync)
    for t in range(10):
        out.clear()
        m0, m1 = _Msg(t * S, 33), _Msg(t * S, 34)
        assert not sync.add(0, m0.stamp_ns, m0)
        assert out == []
        assert sync.add(1, m1.stamp_ns, m1)
        assert out == [(m0, m1)]


@pytest.mark.parametrize("n", range(1, 10))
def test_scrambled_sequences_recombine(n):
    rng = random.Random(0)
    seq0 = [_Msg(t * S, rng.random()) for t in range(n)]
    seq1 = [_Msg(t * S, rng.random()) for t in range(n)]
    sync = ApproximateTimeSynchronizer(2, n, 0.1)
    out = _collect(sync)
    for msg in rng.sample(seq0, n):
        sync.add(0, msg.stamp_ns, msg)
    assert out == []
    for msg in rng.sample(seq1, n):
        sync.add(1, msg.stamp_ns, msg)
    assert set(out) == set(zip(seq0, seq1))


# --- edge cases of the contract ---------------------------------------------------------------


def test_slop_boundary_candidate_but_not_emitted():
    # |delta| == slop is a candidate (not "far over the slop"), but the spread must be < slop.
    sync = ApproximateTimeSynchronizer(2, 5, 0.1)
    out = _collect(sync)
    a, b = _Msg(0), _Msg(slop_to_ns(0.1))
    _feed(sync, [(0, a), (1, b)])
    assert out == []
    c = _Msg(slop_to_ns(0.1) - 1)
    _feed(sync, [(0, c)])
    assert out == [(c, b)]


def test_queue_overflow_drops_oldest_and_counts():
    sync = ApproximateTimeSynchronizer(2, 3, 0.01)
    out = _collect(sync)
    msgs = [_Msg(t * S) for t in range(5)]
    _feed(sync, [(0, m) for m in msgs])
    assert sync.queue_lengths() == [3, 0]
    assert sync.dropped == 2
    # the dropped stamps 0 and 1 can no longer be matched, 2..4 can
    _feed(sync, [(1, _Msg(0)), (1, _Msg(1 * S))])
    assert out == []
    m = _Msg(3 * S)
    _feed(sync, [(1, m)])
    assert out == [(msgs[3], m)]


def test_new_message_older_than_a_full_queue_is_dropped_at_once():
    sync = ApproximateTimeSynchronizer(2, 2, 0.5)
    out = _collect(sync)
    _feed(sync, [(1, _Msg(0))])
    _feed(sync, [(0, _Msg(5 * S)), (0, _Msg(6 * S))])
    _feed(sync, [(0, _Msg(0))])  # oldest in a full queue: trimmed before matching
    assert out == []
    assert sync.queue_lengths() == [2, 1]


def test_same_stamp_replaces_and_counts_a_drop():
    sync = ApproximateTimeSynchronizer(2, 5, 0.1)
    out = _collect(sync)
    first, second, other = _Msg(S, "a"), _Msg(S, "b"), _Msg(S)
    _feed(sync, [(0, first), (0, second), (1, other)])
    assert out == [(second, other)]
    assert sync.dropped == 1


def test_nearest_candidate_wins_and_older_messages_stay_queued():
    sync = ApproximateTimeSynchronizer(2, 10, 0.05)
    out = _collect(sync)
    c0, c1 = _Msg(1_000_000_000), _Msg(1_030_000_000)
    _feed(sync, [(0, c0), (0, c1)])
    j = _Msg(1_035_000_000)
    _feed(sync, [(1, j)])
    assert out == [(c1, j)]
    assert sync.queue_lengths() == [1, 0]  # c0 is kept (message_filters does not purge)


def test_single_input_emits_each_message():
    sync = ApproximateTimeSynchronizer(1, 2, 0.01)
    out = _collect(sync)
    msgs = [_Msg(t) for t in (5, 3, 9)]
    _feed(sync, [(0, m) for m in msgs])
    assert out == [(m,) for m in msgs]


def test_four_inputs_emit_in_input_order():
    sync = ApproximateTimeSynchronizer(4, 3, 0.02)
    out = _collect(sync)
    msgs = [_Msg(S + i * 1_000_000, i) for i in range(4)]
    _feed(sync, [(3, msgs[3]), (1, msgs[1]), (0, msgs[0])])
    assert out == []
    _feed(sync, [(2, msgs[2])])
    assert out == [tuple(msgs)]
    assert sync.emitted == 1


def test_callback_runs_outside_the_lock():
    sync = ApproximateTimeSynchronizer(2, 3, 0.1)
    seen = []

    def reenter(a, b):
        seen.append((a, b))
        if len(seen) == 1:  # re-entrant add from the callback must not deadlock
            sync.add(0, 7 * S, _Msg(7 * S))

    sync.register_callback(reenter)
    _feed(sync, [(0, _Msg(S)), (1, _Msg(S))])
    assert len(seen) == 1
    assert sync.queue_lengths() == [1, 0]


def test_clear_empties_the_queues():
    sync = ApproximateTimeSynchronizer(2, 3, 0.1)
    _feed(sync, [(0, _Msg(S)), (0, _Msg(2 * S))])
    sync.clear()
    assert sync.queue_lengths() == [0, 0]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 1, 0.1), "num_inputs"),
        ((2, 0, 0.1), "queue_size"),
        ((2, 1, -0.1), "-0.1"),
        ((2, 1, float("nan")), "nan"),
    ],
)
def test_invalid_arguments_raise_naming_the_value(args, match):
    with pytest.raises(ValueError, match=match):
        ApproximateTimeSynchronizer(*args)


def test_concurrent_adds_keep_every_message_accounted_for():
    n_per_thread = 300
    sync = ApproximateTimeSynchronizer(3, 5, 0.001)
    out = _collect(sync)

    def producer(index):
        for t in range(n_per_thread):
            msg = _Msg(t * 10_000_000 + index)
            sync.add(index, msg.stamp_ns, msg)

    threads = [threading.Thread(target=producer, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    matched = 3 * len(out)
    assert matched + sync.dropped + sum(sync.queue_lengths()) == 3 * n_per_thread
    for msgs in out:
        stamps = [m.stamp_ns for m in msgs]
        assert max(stamps) - min(stamps) < slop_to_ns(0.001)


# --- property: same emitted sets as the reference ---------------------------------------------

events_strategy = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 40).map(lambda t: t * 10_000_000)),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    events=events_strategy,
    queue_size=st.integers(1, 6),
    slop=st.sampled_from([0.005, 0.01, 0.025, 0.05, 0.2]),
    n=st.integers(1, 3),
)
def test_matches_message_filters_reference(events, queue_size, slop, n):
    ref = _Reference(n, queue_size, slop)
    sync = ApproximateTimeSynchronizer(n, queue_size, slop)
    out = _collect(sync)
    for index, stamp in events:
        index %= n
        msg = _Msg(stamp)
        ref.add(msg, index)
        sync.add(index, stamp, msg)
    assert out == ref.out
    assert sync.queue_lengths() == [len(q) for q in ref.queues]
    for msgs in out:  # every emitted set is within slop and in input order
        stamps = [m.stamp_ns for m in msgs]
        assert max(stamps) - min(stamps) < slop_to_ns(slop)


@settings(max_examples=100, deadline=None)
@given(events=events_strategy, queue_size=st.integers(1, 6))
def test_every_message_is_emitted_dropped_or_queued(events, queue_size):
    sync = ApproximateTimeSynchronizer(3, queue_size, 0.03)
    out = _collect(sync)
    for index, stamp in events:
        sync.add(index, stamp, _Msg(stamp))
    assert 3 * len(out) + sync.dropped + sum(sync.queue_lengths()) == len(events)


# --- message_filters adapter ------------------------------------------------------------------


def _stub_message_filters():
    """A stand-in module whose synchronizer is the transcribed reference."""

    class SimpleFilter:
        def __init__(self):
            self.callbacks = []

        def registerCallback(self, cb, *args):
            self.callbacks.append((cb, args))

        def signalMessage(self, *msgs):
            for cb, args in self.callbacks:
                cb(*(msgs + args))

    class Approx(SimpleFilter):
        def __init__(self, fs, queue_size, slop):
            super().__init__()
            self.ref = _Reference(len(fs), queue_size, slop)
            self.queues = self.ref.queues
            self.lock = threading.Lock()
            for i, f in enumerate(fs):
                f.registerCallback(self.add, i)

        def add(self, msg, index):
            before = len(self.ref.out)
            self.ref.add(msg, index)
            if len(self.ref.out) > before:
                self.signalMessage(*self.ref.out[-1])

    return types.SimpleNamespace(SimpleFilter=SimpleFilter, ApproximateTimeSynchronizer=Approx)


def test_message_filters_adapter_has_the_same_interface(monkeypatch):
    import sys

    stub = _stub_message_filters()
    monkeypatch.setitem(sys.modules, "message_filters", stub)
    sync = make_synchronizer(2, 3, 0.1)
    assert isinstance(sync, MessageFiltersSynchronizer)
    out = []
    sync.register_callback(lambda *m: out.append(m))
    a, b = _Msg(S), _Msg(S + 1000)
    assert not sync.add(0, a.stamp_ns, a)
    assert sync.add(1, b.stamp_ns, b)
    assert out == [(a, b)]
    assert sync.emitted == 1
    sync.add(0, 5 * S, _Msg(5 * S))
    assert sync.queue_lengths() == [1, 0]
    sync.clear()
    assert sync.queue_lengths() == [0, 0]


def test_make_synchronizer_falls_back_without_message_filters(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "message_filters", None)  # import raises ImportError
    assert isinstance(make_synchronizer(2, 3, 0.1), ApproximateTimeSynchronizer)
    assert isinstance(
        make_synchronizer(2, 3, 0.1, prefer_message_filters=False), ApproximateTimeSynchronizer
    )
