"""The control loop's timing (no rclpy): a deadline loop on the steady clock, real-time requests.

:class:`DeadlineLoop` wakes at absolute deadlines ``t0 + k * period`` of ``time.monotonic``
(CLOCK_MONOTONIC: never stepped, never slowed by sim time -- sim time changes what a tick
samples, not when it runs): it sleeps until ``SPIN_TAIL`` before the deadline, then spins, so
``sleep``'s late wake-up (50-100 us) does not add to the period error. A tick that wakes more
than a period late counts the ticks it missed and skips them (never replays a burst). The
executor node and ``pi0-ros-bench --executor``'s bare loop run the same class, so the bench's
comparison isolates the executor's own cost.

:func:`request_realtime` asks the OS for SCHED_FIFO and a CPU affinity for the calling thread
and says what it got: a refusal (no CAP_SYS_NICE / rtprio limit, no such CPU) is reported, not
raised, so the node runs either way and logs it clearly.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

SPIN_TAIL = 0.0003  # s before a deadline where the loop stops sleeping and spins
KEEP_ERRORS = 200_000  # period errors kept (then the older half is dropped)


class DeadlineLoop:
    """``loop = DeadlineLoop(period, tick)``; ``loop.run(stop_event)`` calls ``tick(now)`` at
    every deadline until ``stop_event`` is set. ``tick`` exceptions are counted in
    ``tick_errors`` and passed to ``on_error``; the loop goes on."""

    def __init__(self, period: float, tick: Callable[[float], None], *,
                 clock: Callable[[], float] = time.monotonic,
                 on_error: Callable[[BaseException], None] | None = None):
        if not period > 0:
            raise ValueError(f"period must be > 0 s, got {period}")
        self.period, self.tick, self.clock, self.on_error = period, tick, clock, on_error
        self.ticks = 0
        self.missed_ticks = 0
        self.tick_errors = 0
        self.period_errors: list[float] = []  # s, |wake-up - deadline| of every tick

    def run(self, stop: threading.Event) -> None:
        period, clock = self.period, self.clock
        deadline = clock() + period
        while not stop.is_set():
            remaining = deadline - clock()
            if remaining > SPIN_TAIL:
                # Event.wait, not time.sleep: a stop request ends the wait at once.
                if stop.wait(remaining - SPIN_TAIL):
                    break
            while clock() < deadline:  # spin-wait tail
                pass
            now = clock()
            err = now - deadline
            if err > period:  # woke too late for one or more ticks: count, don't replay
                missed = int(err // period)
                self.missed_ticks += missed
                deadline += missed * period
            self.period_errors.append(abs(err))
            if len(self.period_errors) > KEEP_ERRORS:
                del self.period_errors[:KEEP_ERRORS // 2]
            self.ticks += 1
            try:
                self.tick(now)
            except Exception as exc:  # the loop must outlive any one bad tick
                self.tick_errors += 1
                if self.on_error is not None:
                    self.on_error(exc)
            deadline += period

    def stats(self, last: int | None = None) -> dict:
        """ticks, missed_ticks, tick_errors and the period error's p50 / p99 / max in ms (over
        the ``last`` ticks, or all kept)."""
        errs = np.asarray(self.period_errors[-last:] if last else self.period_errors) * 1e3
        out = {"ticks": self.ticks, "missed_ticks": self.missed_ticks,
               "tick_errors": self.tick_errors}
        for key, q in (("p50", 50), ("p99", 99)):
            out[f"period_error_{key}_ms"] = float(np.percentile(errs, q)) if errs.size else None
        out["period_error_max_ms"] = float(errs.max()) if errs.size else None
        return out


def request_realtime(priority: int = 0, cpus: Sequence[int] = ()) -> tuple[list[str], list[str]]:
    """For the calling thread: SCHED_FIFO at ``priority`` (1..99; 0 = don't ask) and the CPU
    affinity ``cpus`` (empty = don't ask). Returns ``(granted, refused)``, one sentence each."""
    granted, refused = [], []
    tid = threading.get_native_id()
    if priority:
        if not 1 <= priority <= 99:
            refused.append(f"SCHED_FIFO priority {priority}: expected 1..99")
        elif not hasattr(os, "sched_setscheduler"):
            refused.append("SCHED_FIFO: not supported on this OS")
        else:
            try:
                os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(priority))
                granted.append(f"SCHED_FIFO priority {priority}")
            except OSError as exc:
                refused.append(f"SCHED_FIFO priority {priority} refused by the OS ({exc}); "
                               "grant CAP_SYS_NICE or an rtprio limit (limits.conf) to get it; "
                               "running SCHED_OTHER")
    if cpus:
        cpus = sorted({int(c) for c in cpus})
        if not hasattr(os, "sched_setaffinity"):
            refused.append("CPU affinity: not supported on this OS")
        else:
            try:
                os.sched_setaffinity(tid, cpus)
                granted.append(f"CPU affinity {cpus}")
            except (OSError, ValueError) as exc:
                refused.append(f"CPU affinity {cpus} refused by the OS ({exc}); "
                               f"running on CPUs {sorted(os.sched_getaffinity(tid))}")
    return granted, refused
