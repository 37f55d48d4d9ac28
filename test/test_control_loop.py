"""DeadlineLoop (the executor node's and the bench's bare loop) and the real-time requests."""

import threading

import pytest

from pi0_ros.control.loop import DeadlineLoop, request_realtime


class FakeClock:
    """A steady clock that only moves when told (and by 1 us per read, so spins end)."""

    def __init__(self):
        self.t = 100.0

    def __call__(self):
        self.t += 1e-6
        return self.t


def test_ticks_at_deadlines_and_counts_missed_ticks_without_replaying_them():
    clock, period, seen = FakeClock(), 0.01, []
    stop = threading.Event()

    def tick(now):
        seen.append(now)
        if len(seen) == 3:
            clock.t += 3.5 * period  # a stall: the next wake-up is 3.5 periods late
        if len(seen) == 6:
            stop.set()

    loop = DeadlineLoop(period, tick, clock=clock)
    loop.run(stop)
    assert loop.ticks == 6 and loop.missed_ticks == 2  # deadlines 4 and 5; 6 runs late
    gaps = [b - a for a, b in zip(seen, seen[1:])]
    assert all(g >= period * 0.4 for g in gaps)  # one tick per deadline, never a burst
    assert sorted(loop.period_errors)[-2] < 1e-4  # only the stalled tick was late: back on grid


def test_a_failing_tick_is_counted_and_the_loop_goes_on():
    stop, errors, n = threading.Event(), [], [0]

    def tick(now):
        n[0] += 1
        if n[0] == 2:
            raise RuntimeError("boom")
        if n[0] == 4:
            stop.set()

    loop = DeadlineLoop(0.001, tick, on_error=errors.append)
    loop.run(stop)
    assert loop.tick_errors == 1 and "boom" in str(errors[0]) and n[0] == 4


def test_stop_ends_a_long_wait_at_once():
    """The wait is on the stop event: a 10 s period does not delay shutdown."""
    stop = threading.Event()
    loop = DeadlineLoop(10.0, lambda now: None)
    thread = threading.Thread(target=loop.run, args=(stop,))
    thread.start()
    stop.set()
    thread.join(timeout=1.0)
    assert not thread.is_alive() and loop.ticks == 0


def test_realtime_refusals_are_reported_not_raised():
    granted, refused = request_realtime(150, [4095])
    assert granted == []
    assert any("expected 1..99" in r for r in refused)
    assert any("CPU affinity [4095] refused by the OS" in r for r in refused)


def test_realtime_not_requested_asks_nothing():
    assert request_realtime(0, ()) == ([], [])


def test_stats():
    loop = DeadlineLoop(0.001, lambda now: None)
    loop.period_errors = [0.0001] * 99 + [0.002]
    st = loop.stats()
    assert st["period_error_max_ms"] == pytest.approx(2.0)
    assert st["period_error_p50_ms"] == pytest.approx(0.1)
