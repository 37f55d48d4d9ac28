"""pi0_ros.stats.percentiles: the one latency summary of the benchmarks and reports."""

from __future__ import annotations

import numpy as np
import pytest

from pi0_ros.stats import PERCENTILES, percentiles


def test_percentiles_match_numpy_with_scale_and_suffix():
    values = np.random.default_rng(0).exponential(0.01, 257)  # seconds, skewed like latencies
    got = percentiles(values, scale=1e3, suffix="_ms")
    ms = values * 1e3
    for q in PERCENTILES:
        assert got[f"p{q}_ms"] == pytest.approx(np.percentile(ms, q), rel=1e-12)
    assert got["max_ms"] == pytest.approx(ms.max()) and got["mean_ms"] == pytest.approx(ms.mean())
    assert got["n"] == 257
    assert set(got) == {"p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms", "n"}


def test_percentiles_small_inputs():
    assert percentiles([]) == {}
    one = percentiles([4.0])
    assert one["p50"] == one["p99"] == one["max"] == one["mean"] == 4.0 and one["n"] == 1
    # linear interpolation between order statistics (numpy's default), not nearest rank
    assert percentiles([0.0, 10.0])["p90"] == pytest.approx(9.0)
