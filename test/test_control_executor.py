"""Unit tests for pi0_ros.control.executor: rejections, watchdog, interpretations, strategies,
the streaming facade used by the node and the replay."""

import logging

import numpy as np
import pytest

from pi0_ros.control import (
    ActionChunk,
    ChunkExecutor,
    ExecutorConfig,
    StreamingExecutor,
    chunk_from_arrays,
)
from pi0_ros.control import stitching, trajectory
from pi0_ros.control.limits import MAX_PERIOD

NAMES = ("a", "b")
VMAX, AMAX = 2.0, 20.0
PERIOD = 0.002
SETTLE_TOL = 1e-6  # rad, a command that has converged onto a constant chunk
FD_EPS = 1e-12  # relative float rounding of finite differences


def cfg(strategy="replace", **kw):
    return ExecutorConfig(NAMES, (-1.0, -1.0), (1.0, 1.0), (VMAX, VMAX), (AMAX, AMAX),
                          strategy=strategy, **kw)


def const_chunk(value, t0, h=20, dt=0.05, names=NAMES, **kw):
    row = np.broadcast_to(np.asarray(value, dtype=float), (len(names),))
    return ActionChunk(t0, dt, names, np.tile(row, (h, 1)), **kw)


def run(ex, t0, t1, period=PERIOD):
    """Commands from t0 (exclusive) to t1 (inclusive)."""
    n = int(round((t1 - t0) / period))
    return [ex.step(t0 + k * period, period) for k in range(1, n + 1)]


def positions(cmds):
    return np.array([c.position for c in cmds])


# -- rejections -------------------------------------------------------------------------------

def test_each_rejection_reason_is_returned_counted_and_logged(caplog):
    ex = StreamingExecutor(cfg(), PERIOD)
    ex.set_state([0.0, 0.0], 0.0)
    assert ex.submit(const_chunk(0.1, 0.0), 0.0) == (True, "ok")
    for k in range(1, 51):
        ex.tick(k * PERIOD)  # the commanded state is at t = 0.1
    bad = const_chunk(0.1, 0.01)
    object.__setattr__(bad, "actions", np.full((20, 2), np.nan))  # built by other code
    cases = [
        (lambda: ex.submit(const_chunk([0.1] * 3, 0.1, names=("a", "b", "c")), 0.1),
         "dimension"),
        (lambda: ex.submit(const_chunk(0.1, 0.1, names=("b", "a")), 0.1), "joint_names"),
        (lambda: ex.submit(const_chunk(0.1, 0.1, names=("a", "x")), 0.1), "joint_names"),
        (lambda: ex.submit(bad, 0.1), "non_finite"),
        (lambda: ex.submit_arrays(0.1, 0.05, NAMES, [[np.inf, 0.0]], 0.1), "non_finite"),
        (lambda: ex.submit_arrays(0.1, 0.05, NAMES, np.zeros(5), 0.1), "dimension"),
        (lambda: ex.submit_arrays(0.1, 0.0, NAMES, np.zeros((3, 2)), 0.1), "dt"),
        (lambda: ex.submit_arrays(0.1, -0.05, NAMES, np.zeros((3, 2)), 0.1), "dt"),
        (lambda: ex.submit(const_chunk(0.1, 0.0), 0.1), "stale"),  # same stamp
        (lambda: ex.submit(const_chunk(0.1, -0.5), 0.1), "stale"),  # older
        (lambda: ex.submit(const_chunk(0.1, 0.02, h=2), 0.1), "all_past"),  # last at 0.07
        (lambda: ex.submit(const_chunk(0.1, 0.0505, h=2), 0.1), "too_short"),  # ends 0.1005
        (lambda: ex.submit(const_chunk(0.9, 0.04), 0.1), "seam_jump"),
    ]
    with caplog.at_level(logging.WARNING, logger="pi0_ros.control.executor"):
        for submit, reason in cases:
            assert submit() == (False, reason)
    expected = {}
    for _, reason in cases:
        expected[reason] = expected.get(reason, 0) + 1
    assert ex.stats["rejected"] == expected and ex.stats["seams"] == 1
    assert sum("chunk rejected" in r.message for r in caplog.records) == len(cases)


def test_a_rejected_chunk_changes_nothing():
    a, b = ChunkExecutor(cfg(), [0.0, 0.0], 0.0), ChunkExecutor(cfg(), [0.0, 0.0], 0.0)
    for ex in (a, b):
        ex.submit(const_chunk(0.2, 0.0), 0.0)
        run(ex, 0.0, 0.1)
    assert b.submit(const_chunk(0.95, 0.08), 0.1)[1] == "seam_jump"
    np.testing.assert_array_equal(positions(run(a, 0.1, 0.5)), positions(run(b, 0.1, 0.5)))


def test_seam_jump_is_measured_against_where_the_reference_will_be():
    ex = ChunkExecutor(cfg(max_seam_jump=0.2), [0.0, 0.0], 0.0)
    ramp = ActionChunk(0.0, 0.05, NAMES, np.outer(np.arange(20) * 0.05, [1.0, 1.0]))
    assert ex.submit(ramp, 0.0)[0]  # 1 rad/s
    run(ex, 0.0, 0.3)
    # the robot is at 0.3 now and will be at ~0.4 when a new chunk at 0.4 takes over: accepted
    assert ex.submit(const_chunk(0.4, 0.29, h=10), 0.3)[0]


# -- watchdog ----------------------------------------------------------------------------------

def test_timeout_decelerates_within_amax_holds_and_resumes_smoothly():
    ex = ChunkExecutor(cfg(chunk_timeout=0.3), [0.0, 0.0], 0.0)
    ramp = ActionChunk(0.0, 0.05, NAMES, np.outer(np.arange(40) * 0.02, [1.0, -1.0]))
    ex.submit(ramp, 0.0)  # 2 s of chunk at 0.4 rad/s, but no fresh one after it
    cmds = run(ex, 0.0, 0.7)
    hold = [c.holding for c in cmds]
    k = hold.index(True)
    assert k * PERIOD == pytest.approx(0.3, abs=1.5 * PERIOD) and all(hold[k:])
    assert ex.stats["holds"] == 1
    q = positions(cmds)
    v = np.diff(q, axis=0) / PERIOD
    assert np.all(np.abs(np.diff(v, axis=0)) / PERIOD <= AMAX * (1 + 1e-9))
    np.testing.assert_allclose(v[-10:], 0.0, atol=1e-12)
    assert abs(q[-1, 0] - 0.12) < 0.4**2 / (2 * AMAX) + 0.4 * PERIOD  # braking distance only
    assert np.all(cmds[-1].velocity == 0.0)
    # a fresh chunk resumes from the held state without a jump
    assert ex.submit(const_chunk([0.35, -0.35], 0.69), 0.7)[0]
    resumed = run(ex, 0.7, 0.98)
    assert not any(c.holding for c in resumed)
    q2 = positions(cmds[-1:] + resumed)
    assert np.max(np.abs(np.diff(q2, axis=0))) <= VMAX * PERIOD * (1 + 1e-9)
    np.testing.assert_allclose(q2[-1], [0.35, -0.35], atol=SETTLE_TOL)
    assert ex.stats["holds"] == 1


def test_chunk_that_runs_out_is_never_extrapolated():
    ex = ChunkExecutor(cfg(chunk_timeout=10.0), [0.0, 0.0], 0.0)
    ramp = ActionChunk(0.0, 0.05, NAMES, np.outer(np.arange(9) * 0.025, [1.0, 1.0]))
    ex.submit(ramp, 0.0)  # 0.5 rad/s until t_end = 0.4, at 0.2 rad
    cmds = run(ex, 0.0, 0.8)
    ts = PERIOD * np.arange(1, len(cmds) + 1)
    assert not any(c.holding for c, t in zip(cmds, ts) if t <= 0.4 - 1e-9)
    assert all(c.holding for c, t in zip(cmds, ts) if t > 0.4 + 1e-9)
    final = cmds[-1].position[0]
    assert 0.2 <= final <= 0.2 + 0.5**2 / (2 * AMAX) + 0.5 * PERIOD  # stopped, not continued
    assert ex.reference(0.41) is None


def test_no_chunk_at_all_holds_still():
    ex = ChunkExecutor(cfg(), [0.3, -0.3], 0.0)
    cmds = run(ex, 0.0, 0.1)
    assert all(c.holding for c in cmds) and ex.stats["holds"] == 0  # never tracked: no hold
    np.testing.assert_array_equal(positions(cmds), [[0.3, -0.3]] * len(cmds))


# -- interpretations and latency through the executor -----------------------------------------

@pytest.mark.parametrize("interp, acts, state0, expected", [
    ("absolute", [[0.3, -0.2]] * 10, None, [0.3, -0.2]),
    ("delta", [[0.1, -0.1]] * 10, [0.2, 0.2], [0.3, 0.1]),
    ("velocity", [[0.5, -0.5]] * 4 + [[0.0, 0.0]] * 6, [0.0, 0.1], [0.1, -0.0]),
    (("delta", "absolute"), [[0.1, 0.4]] * 10, [0.2, 0.0], [0.3, 0.4]),
])
def test_interpretations_end_where_the_chunk_says(interp, acts, state0, expected):
    ex = ChunkExecutor(cfg(chunk_timeout=5.0), [0.0, 0.0], 0.0)
    c = chunk_from_arrays(0.0, 0.05, NAMES, np.array(acts), interpretation=interp,
                          state0=state0)
    assert ex.submit(c, 0.0)[0]
    q = positions(run(ex, 0.0, 0.45))
    np.testing.assert_allclose(q[-1], expected, atol=2e-3)


def test_past_actions_are_skipped_not_replayed():
    ex = ChunkExecutor(ExecutorConfig(("a", "g"), (-1, -1), (1, 1), (5, 5), (100, 100)),
                       [0.0, 0.0], now=0.0)
    acts = np.array([[0.3, 0.5]] * 3 + [[0.1, 0.5]] * 10)  # first 3 rows are past at now=0.12
    chunk = chunk_from_arrays(0.0, 0.05, ("a", "g"), acts, interpretation=("delta", "absolute"),
                              state0=[0.05, 0.0])
    assert np.allclose(chunk.to_positions()[0], [0.35, 0.5])
    assert ex.submit(chunk, 0.12) == (True, "ok")
    qs = positions(run(ex, 0.12, 0.42))
    assert qs[:, 0].max() <= 0.15 + 1e-9  # never moved toward the past 0.35 target
    np.testing.assert_allclose(qs[-1], [0.15, 0.5], atol=SETTLE_TOL)


# -- strategies through the executor -----------------------------------------------------------

def stitched(strategy, **kw):
    """Chunk A (0.1) accepted at 0, chunk B (0.4) at 0.3; returns the executor at t = 0.3."""
    ex = ChunkExecutor(cfg(strategy, max_seam_jump=1.0, **kw), [0.1, -0.1], 0.0)
    assert ex.submit(const_chunk([0.1, -0.1], 0.0, h=30), 0.0)[0]
    run(ex, 0.0, 0.3)
    assert ex.submit(const_chunk([0.4, -0.4], 0.29, h=30), 0.3)[0]
    return ex


def test_replace_follows_the_new_chunk_after_its_join():
    ex = stitched("replace")
    join_end = ex._plan.t_switch
    assert 0.3 < join_end <= 0.3 + stitching.JOIN_MAX_DURATION
    for t in (join_end + 0.01, 0.8):
        np.testing.assert_allclose(ex.reference(t)[0], [0.4, -0.4], atol=1e-12)
    np.testing.assert_allclose(positions(run(ex, 0.3, 0.8))[-1], [0.4, -0.4], atol=SETTLE_TOL)


def test_crossfade_reference_is_between_old_and_new_midway():
    ex = stitched("crossfade", crossfade_window=0.2)
    q = ex.reference(0.4)[0][0]  # midway: w = 1/2 of old (0.1) and new (its join at 0.4)
    new_at = ex._plan.new.eval(0.4)[0][0]
    assert q == pytest.approx((0.1 + new_at) / 2, abs=1e-12) and 0.1 < q < new_at
    np.testing.assert_allclose(ex.reference(0.55)[0], [0.4, -0.4], atol=1e-12)


def test_temporal_ensemble_reference_is_the_weighted_average():
    ex = stitched("temporal_ensemble", ensemble_decay=0.5, crossfade_window=0.05)
    w = np.exp(-0.5 * np.arange(2))
    expected = (w[0] * 0.1 + w[1] * 0.4) / w.sum()
    np.testing.assert_allclose(ex.reference(0.9)[0], [expected, -expected], atol=1e-12)
    np.testing.assert_allclose(positions(run(ex, 0.3, 0.9))[-1], [expected, -expected],
                               atol=SETTLE_TOL)


@pytest.mark.parametrize("strategy", ["replace", "crossfade", "temporal_ensemble"])
def test_reference_q_and_v_are_continuous_at_the_seam(strategy):
    ex = ChunkExecutor(cfg(strategy, max_seam_jump=1.0), [0.0, 0.0], 0.0)
    ramp = ActionChunk(0.0, 0.05, NAMES, np.outer(np.arange(30) * 0.025, [1.0, -1.0]))
    ex.submit(ramp, 0.0)
    run(ex, 0.0, 0.3)
    before = ex.reference(0.3)
    ex.submit(const_chunk([0.3, -0.1], 0.25), 0.301)
    after = ex.reference(0.3)
    np.testing.assert_allclose(after[:2], before[:2], atol=1e-12)


def test_command_reports_the_reference_velocity_while_tracking_exactly():
    ex = ChunkExecutor(cfg(), [0.0, 0.0], 0.0)
    ramp = ActionChunk(0.0, 0.05, NAMES, np.outer(np.arange(30) * 0.025, [1.0, -1.0]))
    ex.submit(ramp, 0.0)
    cmd = run(ex, 0.0, 0.5)[-1]
    np.testing.assert_allclose(cmd.position, ex.reference(0.5)[0], atol=1e-12)
    np.testing.assert_allclose(cmd.velocity, [0.5, -0.5], atol=1e-9)


def test_tick_never_solves_a_spline_or_builds_a_join(monkeypatch):
    for strategy in ("replace", "crossfade", "temporal_ensemble"):
        ex = ChunkExecutor(cfg(strategy), [0.0, 0.0], 0.0)
        ex.submit(const_chunk([0.1, 0.0], 0.0, h=30), 0.0)
        run(ex, 0.0, 0.1)
        ex.submit(const_chunk([0.2, 0.0], 0.09, h=30), 0.1)

        def forbidden(*args, **kwargs):
            raise AssertionError("submit-time work done in tick")

        with monkeypatch.context() as m:
            m.setattr(trajectory, "spline_coefficients", forbidden)
            m.setattr(trajectory, "hermite", forbidden)
            m.setattr(stitching, "hermite", forbidden)
            m.setattr(np.linalg, "inv", forbidden)
            m.setattr(np.linalg, "solve", forbidden)
            run(ex, 0.1, 0.6)


# -- streaming facade ---------------------------------------------------------------------------

def test_streaming_api_and_chunk_from_arrays():
    ex = StreamingExecutor(cfg(), default_period=PERIOD)
    assert not ex.initialized
    ex.set_state([0.2, 0.0], 0.0)
    assert ex.initialized
    chunk = chunk_from_arrays(0.0, 0.05, NAMES, np.tile([0.3, 0.0], 10), horizon=10,
                              action_dim=2)
    assert ex.submit(chunk, 0.0) == (True, "ok")
    cmds = [ex.tick(k * PERIOD) for k in range(1, 400)]
    assert cmds[0].status == "track"
    assert abs(cmds[200].position[0] - 0.3) < 1e-3
    assert cmds[-1].status == "hold" and abs(cmds[-1].velocity[0]) < 1e-9
    np.testing.assert_array_equal(ex.position, cmds[-1].position)


def test_tick_at_the_same_time_repeats_and_a_gap_moves_one_slow_tick_at_most():
    ex = StreamingExecutor(cfg(), default_period=PERIOD)
    ex.set_state([0.0, 0.0], 10.0)
    first = ex.tick(10.0)  # no time elapsed since set_state: at rest, where it is
    np.testing.assert_array_equal(first.position, [0.0, 0.0])
    ex.submit(const_chunk([0.5, 0.5], 10.0), 10.0)
    a = ex.tick(10.002)
    assert ex.tick(10.002) is a and ex.tick(10.001) is a
    b = ex.tick(11.0)  # a 1 s gap: integrated as one MAX_PERIOD tick
    step = np.abs(b.position - a.position)
    assert np.all(step <= (np.abs(a.velocity) + AMAX * MAX_PERIOD) * MAX_PERIOD + 1e-12)


def test_set_state_clamps_validates_and_drops_the_reference():
    ex = StreamingExecutor(cfg(), default_period=PERIOD)
    ex.set_state([0.0, 0.0], 0.0)
    ex.submit(const_chunk([0.3, 0.3], 0.0), 0.0)
    ex.tick(0.002)
    ex.set_state([1.0005, -1.0005], 0.004)  # within STATE_LIMIT_TOLERANCE: clamped
    np.testing.assert_array_equal(ex.position, [1.0, -1.0])
    assert ex.reference(0.01) is None and ex.tick(0.006).holding
    with pytest.raises(ValueError):
        ex.set_state([np.nan, 0.0], 0.01)
    with pytest.raises(ValueError):
        ex.set_state([0.0], 0.01)


def test_node_reject_hook_counts():
    ex = StreamingExecutor(cfg(), default_period=PERIOD)
    assert ex.reject("invalid") == (False, "invalid")
    assert ex.stats["rejected"] == {"invalid": 1}


@pytest.mark.parametrize("kwargs", [
    dict(strategy="bogus"), dict(interpolation="quintic"), dict(crossfade_window=0.0),
    dict(chunk_timeout=-1.0), dict(max_seam_jump=0.0), dict(ensemble_decay=float("nan")),
])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        cfg(**kwargs)


def test_config_rejects_bad_limits():
    with pytest.raises(ValueError, match="velocity_max"):
        ExecutorConfig(NAMES, (-1, -1), (1, 1), (0.0, 1.0), (1, 1))
    with pytest.raises(ValueError, match="position_min"):
        ExecutorConfig(NAMES, (1, -1), (0, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="acceleration_max has 1"):
        ExecutorConfig(NAMES, (-1, -1), (1, 1), (1, 1), (1,))
    with pytest.raises(ValueError, match="finite"):
        ExecutorConfig(NAMES, (-1, -1), (1, float("inf")), (1, 1), (1, 1))
