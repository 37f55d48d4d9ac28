"""ExecutorDriver (the node's and the replay's shared driver) and the fault-probe defects of
issue 14: activation outside the limits, dt / stamp ranges, a state that never becomes
non-finite, future stamps and clock jumps that never lock chunks out, the closed loop
(tracking tolerance, feedback timeout)."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pi0_ros.control import ExecutorConfig, ExecutorDriver
from pi0_ros.control.driver import ERROR, OK, WARN

NAMES = ("a", "b")
LO, HI = -2.8973, 2.8973  # rad (a Franka joint 1)
VMAX, AMAX = 2.0, 20.0
RATE = 500.0
PERIOD = 1.0 / RATE
TOL = 0.2  # rad, tracking tolerance in the closed-loop tests
FB_TIMEOUT = 0.1  # s


def driver(tolerance=0.0, feedback_timeout=0.0, **kw):
    cfg = ExecutorConfig(NAMES, (LO, LO), (HI, HI), (VMAX, VMAX), (AMAX, AMAX), **kw)
    return ExecutorDriver(cfg, RATE, ("absolute",), tracking_tolerance=(tolerance,),
                          feedback_timeout=feedback_timeout)


def chunk(value, h=20, dt=0.05):
    return np.tile(np.asarray(value, dtype=float), (h, 1))


def ticks(drv, t0, t1, measure=False):
    """Commands at every period in (t0, t1]; ``measure``: the arm follows each command."""
    out = []
    for k in range(1, int(round((t1 - t0) * RATE)) + 1):
        t = t0 + k * PERIOD
        cmd = drv.tick(t)
        out.append(cmd)
        if measure and cmd is not None:
            drv.measure(NAMES, cmd.position, t)
    return out


# -- initialization ---------------------------------------------------------------------------

def test_initializes_from_the_measured_state_by_name():
    drv = driver()
    assert drv.tick(0.0) is None and drv.diagnostics().level == ERROR
    ok, _ = drv.measure(("x", "b", "a"), [9.0, 0.2, -0.1], 0.0)  # extra joint, any order
    assert ok and drv.initialized
    np.testing.assert_array_equal(drv.position, [-0.1, 0.2])
    assert drv.measure(("a",), [0.0], 0.0)[0] is False  # a configured joint missing
    assert drv.counters()["joint_state.joint_state_names"] == 1


def test_activation_outside_the_limits_is_refused_with_an_error():
    """Fault probe: 3.5 rad against a 2.8973 limit was clamped silently (a 0.60 rad step)."""
    drv = driver()
    ok, reason = drv.measure(NAMES, [3.5, 0.0], 0.0)
    assert not ok and reason == "state_outside_limits" and not drv.initialized
    assert drv.tick(0.002) is None  # nothing commanded at all
    diag = drv.diagnostics()
    assert diag.level == ERROR and "a=3.5" in diag.message and "2.8973" in diag.message
    assert drv.counters()["activation_refused"] == 1
    ok, _ = drv.measure(NAMES, [2.8, 0.0], 0.01)  # the arm moved inside: it starts there
    assert ok and drv.tick(0.012).position[0] == 2.8 and drv.fault is None


def test_chunks_before_the_joint_state_are_counted_not_executed():
    drv = driver()
    assert drv.submit(0.0, 0.05, NAMES, chunk([0.1, 0.1]), 0.0) == (False, "no_joint_state")
    assert drv.counters()["chunks_before_joint_state"] == 1


# -- chunk validation -------------------------------------------------------------------------

@pytest.mark.parametrize("dt", [1e-200, 1e-5, 0.0, -0.05, 10.5, math.inf, math.nan])
def test_dt_outside_its_range_is_rejected(dt):
    """Fault probe: dt = 1e-200 was accepted and turned the state into NaN for good."""
    drv = driver()
    drv.measure(NAMES, [0.0, 0.0], 0.0)
    assert drv.submit(0.001, dt, NAMES, chunk([0.1, 0.1]), 0.0) == (False, "dt")
    assert drv.counters()["rejected.dt"] == 1
    assert drv.submit(0.0, 0.05, NAMES, chunk([0.1, 0.1]), 0.0) == (True, "ok")
    assert np.all(np.isfinite(ticks(drv, 0.0, 0.1)[-1].position))


def test_too_few_joints_is_dimension_not_interpretation():
    drv = driver()
    drv.measure(NAMES, [0.0, 0.0], 0.0)
    assert drv.submit(0.0, 0.05, ("a",), chunk([0.1]), 0.0) == (False, "dimension")
    assert drv.submit(0.0, 0.05, ("b", "a"), chunk([0.1, 0.1]), 0.0) == (False, "joint_names")


def test_a_future_stamp_is_rejected_and_never_locks_out_later_chunks():
    """Fault probe: a chunk stamped +1 h made every later chunk "stale" until re-activation."""
    drv = driver()
    drv.measure(NAMES, [0.0, 0.0], 0.0)
    assert drv.submit(3600.0, 0.05, NAMES, chunk([0.1, 0.1]), 0.0) == (False, "future_stamp")
    assert drv.submit(5.0, 0.05, NAMES, chunk([0.1, 0.1]), 0.0) == (False, "future_stamp")
    assert drv.submit(0.0, 0.05, NAMES, chunk([0.1, 0.1]), 0.01) == (True, "ok")


def test_a_clock_jump_back_does_not_lock_out_chunks():
    """A looping bag / reset sim clock: time goes back 100 s; chunks are accepted again."""
    drv = driver()
    drv.measure(NAMES, [0.0, 0.0], 100.0)
    assert drv.submit(100.0, 0.05, NAMES, chunk([0.1, 0.1]), 100.0)[0]
    ticks(drv, 100.0, 100.2, measure=True)
    drv.measure(NAMES, drv.position, 0.0)
    cmd = drv.tick(0.002)
    assert cmd.holding and np.all(np.isfinite(cmd.position))
    assert drv.submit(0.0, 0.05, NAMES, chunk([0.2, 0.2]), 0.004) == (True, "ok")
    cmds = ticks(drv, 0.004, 0.5, measure=True)
    assert not cmds[-1].holding or np.allclose(cmds[-1].position, 0.2)
    assert drv.counters()["clock_jumps"] >= 1


def test_a_tick_before_the_previous_one_repeats_it_and_a_jump_forward_holds():
    drv = driver()
    drv.measure(NAMES, [0.0, 0.0], 0.0)
    drv.submit(0.0, 0.05, NAMES, chunk([0.3, 0.3]), 0.0)
    a = drv.tick(0.01)
    assert drv.tick(0.005) is a  # a small step back: the same command
    b = drv.tick(1e6)  # far ahead: the chunk is over, decelerate within the limits
    assert b.holding and np.all(np.abs(b.position - a.position) <= VMAX * 0.02 + 1e-12)


# -- never non-finite -------------------------------------------------------------------------

EXTREME = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=64),
                    st.sampled_from([0.0, 1e-300, -1e-300, 1e300, -1e300, 1e-100, 1e100]))
OPS = st.lists(st.one_of(
    st.tuples(st.just("submit"), EXTREME, EXTREME, EXTREME, st.integers(1, 8)),
    st.tuples(st.just("tick"), EXTREME),
    st.tuples(st.just("advance"), st.floats(-10.0, 10.0)),  # clock jumps back and forward
    st.tuples(st.just("measure"), EXTREME, EXTREME),
), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, tolerance=st.sampled_from([0.0, TOL]),
       feedback=st.sampled_from([0.0, FB_TIMEOUT]))
@example(ops=[("tick", 2.2250738585e-313)], tolerance=0.0, feedback=0.0)  # 1/period = inf
@example(ops=[("submit", 1e-200, 0.5, 1e-3, 8), ("tick", 0.002), ("tick", 0.002)],
         tolerance=0.0, feedback=0.0)  # the fault probe's poisoning chunk
@example(ops=[("submit", 0.05, 1e300, 0.0, 8), ("tick", 0.002)], tolerance=0.0, feedback=0.0)
def test_the_state_never_becomes_non_finite(ops, tolerance, feedback):
    """Extreme dt, magnitudes and stamps, clock jumps back and forward: every command finite
    and within the position limits, the commanded state finite, and a normal chunk afterwards
    is accepted and executed."""
    drv = driver(tolerance, feedback)
    now = 0.0
    drv.measure(NAMES, [0.0, 0.0], now)
    for op in ops:
        if op[0] == "submit":
            _, dt, value, stamp, h = op
            drv.submit(now + stamp, dt, NAMES, np.full((h, 2), value), now)
        elif op[0] == "tick":  # forward by up to 1e6 s (float64 time keeps ~1e-10 s there)
            now += min(abs(op[1]), 1e6)
            cmd = drv.tick(now)
        elif op[0] == "advance":
            now += op[1]
            cmd = drv.tick(now)
        else:
            drv.measure(NAMES, [op[1], op[2]], now)
        if op[0] in ("tick", "advance") and cmd is not None:
            assert np.all(np.isfinite(cmd.position)) and np.all(np.isfinite(cmd.velocity))
            assert np.all(np.isfinite(cmd.acceleration))
            assert np.all(cmd.position >= LO) and np.all(cmd.position <= HI)
        assert np.all(np.isfinite(drv.position))
    if not drv.initialized:
        return
    now += 10.0  # well past everything (clock jumps are re-based on tick / submit)
    drv.measure(NAMES, drv.position, now)
    drv.tick(now)
    target = np.clip(drv.position + 0.05, LO, HI)
    assert drv.submit(now, 0.05, NAMES, chunk(target), now) == (True, "ok")
    cmd = ticks(drv, now, now + 0.1, measure=True)[-1]
    assert np.all(np.isfinite(cmd.position)) and drv.counters()["faults"] == 0


# -- closed loop ------------------------------------------------------------------------------

def test_tracking_error_beyond_tolerance_holds_at_the_measured_state_and_reports():
    drv = driver(tolerance=TOL)
    drv.measure(NAMES, [0.0, 0.0], 0.0)
    drv.submit(0.0, 0.05, NAMES, chunk([0.3, 0.3], h=40), 0.0)
    cmds = ticks(drv, 0.0, 0.1, measure=True)
    assert not cmds[-1].holding and drv.diagnostics().level == OK
    t = 0.1
    blocked = cmds[-1].position + [0.0, TOL + 0.05]  # joint b pushed away (blocked, hit)
    drv.measure(NAMES, blocked, t)
    assert drv.fault == "tracking_error"
    diag = drv.diagnostics(t)
    assert diag.level == ERROR and "b " in diag.message and "tracking" in diag.message
    assert drv.counters()["tracking_faults"] == 1
    nxt = drv.tick(t + PERIOD)
    assert nxt.holding
    np.testing.assert_allclose(nxt.position, blocked)  # holds where the arm is
    # a new chunk resumes from there and clears the fault
    assert drv.submit(t, 0.05, NAMES, chunk(blocked, h=40), t + PERIOD)[0]
    assert drv.fault is None


def test_tracking_within_tolerance_never_holds():
    drv = driver(tolerance=TOL)
    drv.measure(NAMES, [0.0, 0.0], 0.0)
    drv.submit(0.0, 0.05, NAMES, chunk([0.3, 0.3], h=40), 0.0)
    for cmd in ticks(drv, 0.0, 0.5):
        drv.measure(NAMES, cmd.position + TOL * 0.9, 0.0)  # lagging, within tolerance
    assert drv.fault is None and drv.counters().get("tracking_faults", 0) == 0


def test_feedback_timeout_holds_rejects_and_recovers():
    drv = driver(feedback_timeout=FB_TIMEOUT)
    drv.measure(NAMES, [0.0, 0.0], 0.0)
    drv.submit(0.0, 0.05, NAMES, chunk([0.3, 0.3], h=40), 0.0)
    cmds = ticks(drv, 0.0, FB_TIMEOUT)  # no joint state after t=0
    assert not cmds[-1].holding
    cmd = drv.tick(FB_TIMEOUT + PERIOD)
    assert cmd.holding and drv.fault == "feedback_timeout"
    diag = drv.diagnostics(FB_TIMEOUT + PERIOD)
    assert diag.level == ERROR and "feedback" in diag.message
    t = FB_TIMEOUT + 2 * PERIOD
    assert drv.submit(t, 0.05, NAMES, chunk([0.3, 0.3]), t) == (False, "feedback_timeout")
    drv.measure(NAMES, cmd.position, t)
    assert drv.fault is None
    assert drv.submit(t, 0.05, NAMES, chunk([0.3, 0.3]), t)[0]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), noise=st.sampled_from([0.01, 0.1, 0.3]),
       drop=st.floats(0.0, 0.3), gap=st.floats(0.0, 0.3))
def test_closed_loop_property(seed, noise, drop, gap):
    """Random measurement error and dropouts (and one long gap): after every measurement
    beyond the tolerance the next command holds at that measurement; every tick with the last
    measurement older than the timeout holds; nothing holds otherwise once tracking."""
    rng = np.random.default_rng(seed)
    drv = driver(tolerance=TOL, feedback_timeout=FB_TIMEOUT)
    drv.measure(NAMES, [0.0, 0.0], 0.0)
    last_meas, t, cmd, n_chunk = 0.0, 0.0, None, 0
    gap_at = 0.3
    while t < 0.8:
        if t >= 0.1 * n_chunk:
            n_chunk += 1
            target = np.clip(drv.position + rng.normal(0, 0.05, 2), LO, HI)
            drv.submit(t, 0.05, NAMES, chunk(target, h=20), t)
        t += PERIOD
        cmd = drv.tick(t)
        stale = t - last_meas > FB_TIMEOUT
        assert not stale or cmd.holding
        in_gap = gap_at <= t < gap_at + gap
        if cmd is not None and not in_gap and rng.random() >= drop:
            meas = cmd.position + rng.normal(0, noise, 2)
            drv.measure(NAMES, meas, t)
            last_meas = t
            if np.any(np.abs(meas - cmd.position) > TOL):
                assert drv.fault == "tracking_error"
                nxt = drv.tick(t + 1e-6)
                assert nxt.holding
                if np.all((meas >= LO) & (meas <= HI)):  # (beyond a limit: holds the command)
                    np.testing.assert_allclose(nxt.position, meas)
            elif drv.fault != "feedback_timeout":
                assert drv.diagnostics(t).level in (OK, WARN, ERROR)


def test_diagnostics_values_are_the_counters():
    drv = driver()
    drv.measure(NAMES, [0.0, 0.0], 0.0)
    drv.submit(0.0, 1e-200, NAMES, chunk([0.1, 0.1]), 0.0)
    drv.submit(0.0, 0.05, NAMES, chunk([0.1, 0.1]), 0.0)
    ticks(drv, 0.0, 0.01)
    vals = drv.diagnostics().values
    assert vals["rejected.dt"] == "1" and vals["chunks_accepted"] == "1"
    assert vals["track_ticks"] == "5" and vals["seams"] == "1"


def test_actions_far_outside_the_limits_reject_the_chunk():
    """A chunk that starts where the arm is and then leaves for 1e300: its spline's derivatives
    would overflow; rejected whole as ``out_of_range``, the command stays finite."""
    drv = driver()
    drv.measure(NAMES, [0.0, 0.0], 0.0)
    acts = np.zeros((8, 2))
    acts[4:] = 1e300
    assert drv.submit(0.0, 0.05, NAMES, acts, 0.0) == (False, "out_of_range")
    acts[4:] = HI + 0.5  # beyond the limit by less than the margin: accepted, tracked at it
    assert drv.submit(0.0, 0.05, NAMES, acts, 0.0)[0]
    cmds = ticks(drv, 0.0, 0.5)
    assert all(np.all(np.isfinite(c.position)) and np.all(c.position <= HI) for c in cmds)
