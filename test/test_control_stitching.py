"""Unit tests for pi0_ros.control.stitching: replace's join, crossfade, temporal ensemble."""

import math

import numpy as np
import pytest

from pi0_ros.control.chunk import ActionChunk, ChunkError
from pi0_ros.control.stitching import (
    JOIN_MAX_DURATION,
    JOIN_MIN_DURATION,
    Blend,
    Ensemble,
    Joined,
    excess,
    within,
)
from pi0_ros.control.trajectory import ChunkTrajectory

NAMES = ("a", "b")
EXACT = 1e-9  # rad (rad/s): values that must agree up to float rounding
FD_STEP = 1e-6  # s, central-difference step
FD_TOL = 1e-4  # relative / absolute tolerance of those central differences


def traj(values, t0, dt=0.05, h=20, start=-np.inf):
    """A chunk whose actions follow ``values(t)`` (a function of time, (2,) per t)."""
    times = t0 + dt * np.arange(h)
    acts = np.array([values(t) for t in times])
    return ChunkTrajectory(ActionChunk(t0, dt, NAMES, acts), start=start)


def const(c):
    return lambda t: np.array([c, -c])


def sine(t):
    return np.array([0.3 * np.sin(2 * t), 0.2 * np.cos(3 * t)])


def fd(plan, t, row):
    return (plan.eval(t + FD_STEP)[row] - plan.eval(t - FD_STEP)[row]) / (2 * FD_STEP)


def assert_derivatives(plan, times):
    for t in times:
        x = plan.eval(t)
        np.testing.assert_allclose(x[1], fd(plan, t, 0), rtol=FD_TOL, atol=FD_TOL)
        np.testing.assert_allclose(x[2], fd(plan, t, 1), rtol=FD_TOL, atol=1e-2)


# -- replace: the C1 join ---------------------------------------------------------------------

def test_join_matches_q_and_v_at_both_ends():
    tr = traj(sine, t0=0.0, start=0.12)  # first future action at 0.15
    q, v = np.array([0.5, -0.5]), np.array([1.0, -2.0])
    j = Joined(tr, 0.08, q, v)
    assert j.t_switch == pytest.approx(0.15)  # 70 ms away: the first future action itself
    np.testing.assert_allclose(j.eval(0.08)[0], q, atol=EXACT)
    np.testing.assert_allclose(j.eval(0.08)[1], v, atol=EXACT)
    end, chunk = j.join.eval(j.t_switch), tr.eval(j.t_switch)
    np.testing.assert_allclose(end[0], chunk[0], atol=EXACT)
    np.testing.assert_allclose(end[1], chunk[1], atol=1e-8)
    for t in np.linspace(0.16, tr.t_end, 7):  # after the switch: the chunk itself
        np.testing.assert_array_equal(j.eval(t), tr.eval(t))


def test_join_lasts_at_least_the_minimum_duration():
    tr = traj(sine, t0=0.0, start=0.149)  # first future action at 0.15, 1 ms after the seam
    j = Joined(tr, 0.149, sine(0.149), np.zeros(2))
    assert j.t_switch == pytest.approx(0.149 + JOIN_MIN_DURATION)
    np.testing.assert_allclose(j.eval(j.t_switch)[:2], tr.eval(j.t_switch)[:2], atol=1e-8)


def test_join_is_stretched_to_stay_within_limits_when_it_can():
    tr = traj(const(0.3), t0=0.0)  # a chunk at rest 0.3 rad away
    vmax, amax = np.full(2, 2.0), np.full(2, 40.0)
    short = Joined(tr, 0.0, np.zeros(2), np.zeros(2))
    assert not within(short.join, vmax, amax)  # 6 * 0.3 / 0.05^2 = 720 rad/s^2
    j = Joined(tr, 0.0, np.zeros(2), np.zeros(2), limits=(vmax, amax))
    assert within(j.join, vmax, amax)
    assert JOIN_MIN_DURATION < j.t_switch <= JOIN_MAX_DURATION
    # where no duration fits, the join that exceeds the limits least
    tight = (vmax * 1e-2, amax * 1e-2)
    best = Joined(tr, 0.0, np.zeros(2), np.zeros(2), limits=tight)
    ladder = [Joined(tr, 0.0, np.zeros(2), np.zeros(2), min_duration=d)
              for d in JOIN_MIN_DURATION * 1.25 ** np.arange(8) if d <= JOIN_MAX_DURATION]
    assert excess(best.join, *tight) == min(excess(j.join, *tight) for j in ladder) > 1.0


def test_within_is_exact_for_a_cubic():
    tr = traj(const(0.1), t0=0.0)
    j = Joined(tr, 0.0, np.zeros(2), np.zeros(2))  # rest to rest over 50 ms
    peak_v, peak_a = 1.5 * 0.1 / 0.05, 6 * 0.1 / 0.05**2
    assert within(j.join, np.full(2, peak_v * 1.001), np.full(2, peak_a * 1.001))
    assert not within(j.join, np.full(2, peak_v * 0.999), np.full(2, peak_a * 1.001))
    assert not within(j.join, np.full(2, peak_v * 1.001), np.full(2, peak_a * 0.999))


def test_join_into_a_chunk_that_ends_at_the_seam_is_too_short():
    tr = traj(const(0.0), t0=0.0, h=3)  # ends at 0.1
    with pytest.raises(ChunkError) as info:
        Joined(tr, 0.1 - 1e-4, np.zeros(2), np.zeros(2))
    assert info.value.reason == "too_short"


# -- crossfade ---------------------------------------------------------------------------------

def blend_pair(window=0.1):
    old = Joined(traj(const(0.0), t0=0.0), 0.0, np.zeros(2), np.zeros(2))
    new = Joined(traj(const(0.4), t0=0.0, start=0.2), 0.2, old.eval(0.2)[0],
                 old.eval(0.2)[1])
    return old, new, Blend(old, new, 0.2, window)


def test_crossfade_midway_is_between_old_and_new():
    old, new, b = blend_pair()
    t = 0.25  # half the window: min-jerk weight exactly 1/2
    q_old, q_new, q = old.eval(t)[0], new.eval(t)[0], b.eval(t)[0]
    np.testing.assert_allclose(q, (q_old + q_new) / 2, atol=EXACT)
    assert np.all(np.abs(q_new - q_old) > 0.05)  # they do differ: a real blend
    lo, hi = np.minimum(q_old, q_new), np.maximum(q_old, q_new)
    assert np.all((lo < q) & (q < hi))


def test_crossfade_starts_on_old_and_lands_on_new_with_matching_velocity():
    old, new, b = blend_pair()
    for t, ref in ((0.2, old), (0.3, new), (0.35, new)):
        np.testing.assert_allclose(b.eval(t)[:2], ref.eval(t)[:2], atol=EXACT)
    assert b.settle(0.31) is new
    assert b.settle(0.25) is b


def test_crossfade_velocity_and_acceleration_include_the_weight_derivatives():
    """The w' d term: with old and new both at rest, the blend's velocity is w' (new - old)."""
    old, new, b = blend_pair()
    assert_derivatives(b, np.linspace(0.203, 0.297, 8))  # not at the join (0.25)
    t = 0.25
    assert np.all(np.abs(b.eval(t)[1]) > 1.0)  # = 1.875 / window * (new - old) at s = 1/2
    np.testing.assert_allclose(b.eval(t)[1] - (0.5 * (old.eval(t)[1] + new.eval(t)[1])),
                               1.875 / 0.1 * (new.eval(t)[0] - old.eval(t)[0]), rtol=1e-9)


# -- temporal ensemble -------------------------------------------------------------------------

RAMP = 0.05


def ensemble(values, decay, arrivals):
    """Members with constant chunks ``values`` joining at ``arrivals`` (each from the state
    of the ensemble so far, as the executor does)."""
    ens = Ensemble(decay, RAMP)
    for i, (c, t_s) in enumerate(zip(values, arrivals)):
        state = ens.eval(t_s) if ens.members else np.zeros((3, 2))
        ens.add(Joined(traj(const(c), t0=t_s - 0.02, h=40, start=t_s), t_s, state[0],
                       state[1]), i)
    return ens


@pytest.mark.parametrize("decay", [0.5, 0.0, -0.5])
def test_ensemble_uses_act_weights_oldest_first(decay):
    ens = ensemble([0.1, 0.3], decay, [0.0, 0.1])
    t = 0.5  # after every ramp-in and every join, before any ramp-out
    w = np.exp(-decay * np.arange(2))  # ACT: w_0 for the oldest chunk
    expected = (w[0] * 0.1 + w[1] * 0.3) / w.sum()
    np.testing.assert_allclose(ens.eval(t)[0], [expected, -expected], atol=EXACT)
    if decay > 0:
        assert expected < 0.2  # the older chunk (0.1) weighs more
    elif decay < 0:
        assert expected > 0.2


def test_ensemble_of_three_overlapping_chunks():
    ens = ensemble([0.0, 0.3, 0.6], 0.2, [0.0, 0.1, 0.2])
    w = np.exp(-0.2 * np.arange(3))
    expected = (w * [0.0, 0.3, 0.6]).sum() / w.sum()
    np.testing.assert_allclose(ens.eval(0.6)[0][0], expected, atol=EXACT)
    np.testing.assert_allclose(ens.eval(0.6)[1], 0.0, atol=EXACT)


def test_ensemble_does_not_jump_when_a_chunk_joins():
    ens = ensemble([0.1], 0.01, [0.0])
    before = ens.eval(0.3)
    ens.add(Joined(traj(const(0.5), t0=0.28, h=40, start=0.3), 0.3, before[0], before[1]), 1)
    after = ens.eval(0.3)
    np.testing.assert_allclose(after[:2], before[:2], atol=EXACT)
    assert_derivatives(ens, np.linspace(0.301, 0.36, 7))  # through the ramp-in
    later = ens.eval(0.3 + RAMP + 0.2)[0][0]
    assert 0.1 + 0.05 < later < 0.5 - 0.05  # ...and the newcomer does get averaged in


def test_ensemble_does_not_jump_when_a_chunk_leaves():
    ens = ensemble([0.1, 0.5], 0.01, [0.0, 0.1])
    t_end = ens.members[0][0].t_end  # the oldest ends first
    left, right = ens.eval(t_end - 1e-9), ens.eval(t_end + 1e-9)
    np.testing.assert_allclose(left[:2], right[:2], atol=1e-6)
    np.testing.assert_allclose(right[0], [0.5, -0.5], atol=1e-6)  # only the newer is left
    assert_derivatives(ens, np.linspace(t_end - RAMP + 1e-3, t_end - 1e-3, 7))


def test_ensemble_weights_ramp_smoothly():
    ens = ensemble([0.1, 0.5], 0.0, [0.0, 0.1])
    w_in = [ens.weights(t)[1][0] for t in (0.1, 0.1 + RAMP / 2, 0.1 + RAMP)]
    assert w_in == pytest.approx([0.0, 0.5, 1.0])
    t_end = ens.members[0][0].t_end
    w_out = [ens.weights(t)[0][0] for t in (t_end - RAMP, t_end - RAMP / 2, t_end, t_end + 1)]
    assert w_out == pytest.approx([1.0, 0.5, 0.0, 0.0])


def test_ensemble_with_one_member_is_that_member():
    ens = ensemble([0.2], 0.01, [0.0])
    member = ens.members[0][0]
    for t in (0.0, 0.01, 0.3):
        np.testing.assert_array_equal(ens.eval(t), member.eval(t))


def test_ensemble_drops_ended_members_at_the_next_add():
    ens = ensemble([0.1, 0.2], 0.01, [0.0, 0.1])
    t_late = ens.members[0][0].t_end + 0.01
    state = ens.eval(t_late)
    ens.add(Joined(traj(const(0.3), t0=t_late, h=40), t_late, state[0], state[1]), 2)
    assert [i for _, i in ens.members] == [1, 2]
    assert math.isfinite(ens.eval(t_late + 0.1)[0][0])
