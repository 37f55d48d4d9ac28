"""Latency summaries: the one percentile helper of every benchmark, replay and diagnostics report,
so that "p95" means the same numbers (numpy's linear interpolation) everywhere; and the
thread-safe latency / rate windows of the pipeline's diagnostics."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

import numpy as np

PERCENTILES = (50, 90, 95, 99)


def percentiles(values: Sequence[float] | np.ndarray, *, scale: float = 1.0,
                suffix: str = "") -> dict[str, float]:
    """``p50``, ``p90``, ``p95``, ``p99``, ``max`` and ``mean`` of ``values`` times ``scale``
    (``1e3``: seconds to milliseconds), each key followed by ``suffix`` (e.g. ``"_ms"``), plus
    ``n`` (the count); ``{}`` for no values.

        percentiles([0.010, 0.012, 0.030], scale=1e3)["p50"]   # 12.0 (ms)
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1) * scale
    if v.size == 0:
        return {}
    out = {f"p{q}{suffix}": float(x) for q, x in zip(PERCENTILES, np.percentile(v, PERCENTILES))}
    out[f"max{suffix}"] = float(v.max())
    out[f"mean{suffix}"] = float(v.mean())
    out["n"] = int(v.size)
    return out


class LatencyWindow:
    """The last ``size`` latencies (seconds); p50 / p95 / max over them. Thread-safe."""

    def __init__(self, size: int = 200) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(float(seconds))

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def summary(self) -> tuple[float, float, float] | None:
        """(p50, p95, max) in seconds, or None before the first value."""
        with self._lock:
            if not self._values:
                return None
            values = np.fromiter(self._values, dtype=np.float64)
        p50, p95 = np.percentile(values, [50, 95])
        return float(p50), float(p95), float(values.max())


class RateMeter:
    """Events per second over the last ``window`` seconds of the caller's clock. Thread-safe.

    Before a full window has passed since the first tick (or ``clear``), the rate is taken over
    the time elapsed since then, so it is neither zero nor inflated while starting.
    """

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self._times: deque[float] = deque()
        self._start: float | None = None
        self._lock = threading.Lock()

    def tick(self, now: float) -> None:
        with self._lock:
            if self._start is None:
                self._start = now
            self._times.append(now)
            self._trim(now)

    def rate(self, now: float) -> float:
        with self._lock:
            self._trim(now)
            if self._start is None or not self._times:
                return 0.0
            span = min(self.window, now - self._start)
            if span <= 0.0:
                return 0.0
            return len(self._times) / span

    def clear(self) -> None:
        with self._lock:
            self._times.clear()
            self._start = None

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] < now - self.window:
            self._times.popleft()
