"""The executor's ``rtc`` strategy: a chunk computed with real-time chunking starts exactly at
the action index d its prefix assumed (``t0 + d dt``); when it cannot, the mismatch is counted
(``rtc_delay_mismatch``) and logged."""

import numpy as np
import pytest

from pi0_ros.control import ExecutorConfig, ExecutorDriver
from pi0_ros.control.stitching import JOIN_MAX_DURATION

NAMES = ("a", "b")
RATE, PERIOD = 500.0, 1.0 / 500.0
DT, H = 0.02, 50


def driver(strategy="rtc"):
    cfg = ExecutorConfig(NAMES, (-3.0, -3.0), (3.0, 3.0), (2.0, 2.0), (20.0, 20.0),
                         strategy=strategy)
    drv = ExecutorDriver(cfg, RATE, ("absolute",))
    drv.measure(NAMES, [0.1, -0.1], 0.0)
    return drv


def old_actions(t0=0.0):
    """The chunk being executed: a slow ramp (0.5 rad/s), action k for t0 + k dt."""
    t = t0 + DT * np.arange(H)
    return np.stack([0.1 + 0.5 * t, -0.1 - 0.25 * t], axis=1)


def new_actions(t0, d):
    """A chunk from the observation at t0 whose first d actions are the committed ones and
    whose later actions take another way (+0.4 rad/s on top)."""
    a = old_actions(t0)
    k = np.arange(H)
    a[:, 0] += 0.4 * DT * np.maximum(k - d + 1, 0)
    return a


def run(drv, t_from, t_to):
    for k in range(1, int(round((t_to - t_from) / PERIOD)) + 1):
        drv.tick(t_from + k * PERIOD)


def test_chunk_starts_exactly_at_its_delay_index():
    drv = driver()
    assert drv.submit(0.0, DT, NAMES, old_actions(), 0.0)[0]
    run(drv, 0.0, 0.15)
    t0, d, now = 0.10, 4, 0.15  # arrives 50 ms after its observation; d*dt = 80 ms
    t_d = t0 + d * DT
    grid = np.arange(now, now + 0.2, 0.001)
    before = [drv.core.reference(t) for t in grid]
    assert drv.submit(t0, DT, NAMES, new_actions(t0, d), now, rtc_delay=d) == (True, "ok")
    assert drv.counters()["rtc_delay_mismatch"] == 0
    after = [drv.core.reference(t) for t in grid]
    for t, b, a in zip(grid, before, after):
        if t < t_d - 1e-9:  # the executor keeps executing the old chunk up to action d
            np.testing.assert_array_equal(a, b, err_msg=f"t={t:.3f}: changed before action d")
    # From action d on it follows the new chunk: the old and new plans part right after t_d.
    i = int(np.searchsorted(grid, t_d + 0.005))
    assert abs(after[i][0, 0] - before[i][0, 0]) > 1e-4, "still on the old chunk after d"
    # ... C1 at the handover, and on the new chunk's own actions after the join.
    j = int(np.searchsorted(grid, t_d - 1e-9))
    np.testing.assert_allclose(after[j][:2], before[j][:2], atol=1e-9)
    for k in range(d + 14, d + 20):  # past the longest join (JOIN_MAX_DURATION)
        t = t0 + k * DT
        assert t > t_d + JOIN_MAX_DURATION
        np.testing.assert_allclose(drv.core.reference(t)[0], new_actions(t0, d)[k], atol=1e-9)


@pytest.mark.parametrize("case", ["late", "no_reference"])
def test_a_chunk_that_cannot_start_at_its_delay_is_counted(case, caplog):
    drv = driver()
    t0, d = 0.10, 4
    if case == "late":
        assert drv.submit(0.0, DT, NAMES, old_actions(), 0.0)[0]
        run(drv, 0.0, 0.20)
        now = 0.20  # action d's time (0.18) has passed: the chunk starts at action 5
    else:
        now = 0.15  # nothing executing (holding): the chunk starts at action 3
    ok, _ = drv.submit(t0, DT, NAMES, new_actions(t0, d), now, rtc_delay=d)
    assert ok
    assert drv.counters()["rtc_delay_mismatch"] == 1
    start = 5 if case == "late" else 3
    assert f"starts at action {start}, not at the delay d=4" in caplog.text


def test_other_strategies_and_zero_delay_never_count():
    for strategy, d in (("replace", 4), ("rtc", 0)):
        drv = driver(strategy)
        assert drv.submit(0.1, DT, NAMES, new_actions(0.1, 4), 0.2, rtc_delay=d)[0]
        assert drv.counters()["rtc_delay_mismatch"] == 0
