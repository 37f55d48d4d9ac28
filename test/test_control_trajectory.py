"""Unit tests for pi0_ros.control.trajectory: ChunkTrajectory.sample, joins, min-jerk."""

import numpy as np
import pytest

from pi0_ros.control.chunk import ActionChunk, ChunkError
from pi0_ros.control.trajectory import ChunkTrajectory, hermite, min_jerk

NAMES = ("a", "b")
EXACT = 1e-12  # rad, float64 rounding of a few terms
FD_STEP = 1e-6  # s, central-difference step for derivative checks
FD_TOL = 1e-5  # relative tolerance of a central difference with FD_STEP
SIDE = 1e-9  # s, "just left / just right" of a knot


def chunk(acts, t0=0.0, dt=0.1, **kw):
    acts = np.asarray(acts, dtype=float)
    names = NAMES[:acts.shape[1]] if acts.shape[1] <= 2 else tuple(f"j{i}" for i in
                                                                     range(acts.shape[1]))
    return ActionChunk(t0, dt, names, acts, **kw)


def random_chunk(seed, h=12, d=2, dt=0.05, t0=0.3):
    rng = np.random.default_rng(seed)
    return chunk(np.cumsum(rng.normal(0, 0.1, (h, d)), axis=0), t0=t0, dt=dt)


def central(traj, t, row):
    hi, lo = traj.sample(t + FD_STEP), traj.sample(t - FD_STEP)
    return (hi[row] - lo[row]) / (2 * FD_STEP)


@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_passes_through_every_knot(interp):
    c = random_chunk(0)
    traj = ChunkTrajectory(c, interpolation=interp)
    for t, p in zip(c.times, c.to_positions()):
        np.testing.assert_allclose(traj.sample(t)[0], p, atol=EXACT)


def test_linear_is_the_chord():
    c = chunk([[0.0, 1.0], [1.0, -1.0], [3.0, -1.0]], dt=0.5)
    traj = ChunkTrajectory(c, interpolation="linear")
    q, v, a = traj.sample(0.25)
    np.testing.assert_allclose(q, [0.5, 0.0], atol=EXACT)
    np.testing.assert_allclose(v, [2.0, -4.0], atol=EXACT)
    np.testing.assert_allclose(a, [0.0, 0.0], atol=EXACT)
    np.testing.assert_allclose(traj.sample(0.75)[1], [4.0, 0.0], atol=EXACT)


def piece(c, s):
    """q, v, a of one power-basis piece c (4, D) at local time s."""
    return (c[0] + s * (c[1] + s * (c[2] + s * c[3])), c[1] + s * (2 * c[2] + 3 * s * c[3]),
            2 * c[2] + 6 * s * c[3])


def test_cubic_is_c2_at_inner_knots_and_natural_at_the_ends():
    c = random_chunk(1)
    traj = ChunkTrajectory(c, interpolation="cubic")
    coeffs, h = traj.piecewise._c, c.dt
    for i in range(1, c.horizon - 1):  # the left piece's end == the right piece's start
        for left, right in zip(piece(coeffs[i - 1], h), piece(coeffs[i], 0.0)):
            np.testing.assert_allclose(left, right, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(traj.sample(c.times[0])[2], 0.0, atol=1e-9)  # natural: q'' = 0
    np.testing.assert_allclose(traj.sample(c.t_end)[2], 0.0, atol=1e-9)


def test_linear_velocity_steps_at_knots():
    c = chunk([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dt=0.5)
    traj = ChunkTrajectory(c, interpolation="linear")
    assert traj.sample(0.5 - SIDE)[1][0] == pytest.approx(2.0)
    assert traj.sample(0.5 + SIDE)[1][0] == pytest.approx(0.0)


def test_cubic_velocity_and_acceleration_are_derivatives():
    c = random_chunk(2)
    traj = ChunkTrajectory(c)
    for t in np.linspace(c.t0 + 0.01, c.t_end - 0.01, 17):
        q, v, a = traj.sample(t)
        np.testing.assert_allclose(v, central(traj, t, 0), rtol=FD_TOL, atol=FD_TOL)
        np.testing.assert_allclose(a, central(traj, t, 1), rtol=FD_TOL, atol=1e-3)


def test_cubic_reproduces_a_straight_line_exactly():
    t = 0.2 * np.arange(8)
    c = chunk(np.stack([1.0 + 2.0 * t, -3.0 * t], axis=1), dt=0.2)
    traj = ChunkTrajectory(c)
    for ti in np.linspace(0.0, c.t_end, 29):
        q, v, a = traj.sample(ti)
        np.testing.assert_allclose(q, [1.0 + 2.0 * ti, -3.0 * ti], atol=1e-12)
        np.testing.assert_allclose(v, [2.0, -3.0], atol=1e-10)
        np.testing.assert_allclose(a, [0.0, 0.0], atol=1e-9)


def natural_spline_reference(times, pos, t):
    """Textbook natural cubic spline (full linear solve, second-derivative form) at t."""
    n, h = len(times), np.diff(times)
    a, r = np.zeros((n, n)), np.zeros_like(pos)
    a[0, 0] = a[-1, -1] = 1.0
    for i in range(1, n - 1):
        a[i, i - 1], a[i, i], a[i, i + 1] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        r[i] = 6 * ((pos[i + 1] - pos[i]) / h[i] - (pos[i] - pos[i - 1]) / h[i - 1])
    m = np.linalg.solve(a, r)
    i = min(int(np.searchsorted(times, t, side="right")) - 1, n - 2)
    u, w = (t - times[i]) / h[i], (times[i + 1] - t) / h[i]
    curve = (w - w**3) * m[i] + (u - u**3) * m[i + 1]
    return w * pos[i] + u * pos[i + 1] - h[i] ** 2 / 6 * curve


@pytest.mark.parametrize("rate", [50.0, 500.0, 1000.0])
def test_sampling_at_any_control_rate_matches_a_reference_spline(rate):
    c = random_chunk(3)
    traj = ChunkTrajectory(c)
    phase = np.random.default_rng(int(rate)).uniform(0, 1.0 / rate)
    for t in np.arange(c.t0 + phase, c.t_end, 1.0 / rate):
        expected = natural_spline_reference(c.times, c.to_positions(), t)
        np.testing.assert_allclose(traj.sample(t)[0], expected, atol=1e-12)


def test_never_extrapolated_past_the_end_or_before_the_start():
    c = random_chunk(4)
    traj = ChunkTrajectory(c)
    traj.sample(c.t_end)  # the end itself is inside
    with pytest.raises(ValueError, match="never extrapolated"):
        traj.sample(c.t_end + 1e-6)
    with pytest.raises(ValueError, match="never extrapolated"):
        traj.sample(c.t0 - 1e-6)


def test_past_actions_are_dropped_before_fitting():
    """Knots are the actions at or after `start`; earlier ones change nothing, bit for bit."""
    c = random_chunk(5, t0=0.0, dt=0.05)
    start = 0.12  # actions 0, 1, 2 (t = 0, 0.05, 0.10) are past
    traj = ChunkTrajectory(c, start=start)
    assert traj.first == 3 and traj.t_start == pytest.approx(0.15)
    poisoned = c.actions.copy()
    poisoned[:3] = 1e6
    other = ChunkTrajectory(chunk(poisoned, t0=0.0, dt=0.05), start=start)
    for t in np.linspace(0.15, c.t_end, 23):
        np.testing.assert_array_equal(traj.sample(t)[0], other.sample(t)[0])
    with pytest.raises(ValueError):
        traj.sample(0.14)  # a past action's time is outside the trajectory


def test_action_exactly_at_start_is_kept_and_all_past_raises():
    c = chunk(np.zeros((3, 2)), t0=0.0, dt=0.1)
    assert ChunkTrajectory(c, start=0.2).first == 2  # t = 0.2 is not in the past
    with pytest.raises(ChunkError) as info:
        ChunkTrajectory(c, start=0.2 + 1e-6)
    assert info.value.reason == "all_past"


def test_single_knot_is_a_point_at_rest():
    c = chunk([[0.4, -0.4]])
    q, v, a = ChunkTrajectory(c).sample(0.0)
    np.testing.assert_array_equal(q, [0.4, -0.4])
    np.testing.assert_array_equal(v, 0.0)
    np.testing.assert_array_equal(a, 0.0)


def test_hermite_matches_position_and_velocity_at_both_ends():
    q0, v0, q1, v1 = np.array([0.1, -1.0]), np.array([2.0, 0.0]), np.array([0.5, 1.0]), \
        np.array([-1.0, 3.0])
    seg = hermite(1.0, q0, v0, 1.2, q1, v1)
    start, end = seg.eval(1.0), seg.eval(1.2)
    np.testing.assert_allclose(start[0], q0, atol=EXACT)
    np.testing.assert_allclose(start[1], v0, atol=1e-11)
    np.testing.assert_allclose(end[0], q1, atol=1e-11)
    np.testing.assert_allclose(end[1], v1, atol=1e-10)


def test_min_jerk_weight_and_its_derivatives():
    assert min_jerk(-0.5) == (0.0, 0.0, 0.0) and min_jerk(1.5) == (1.0, 0.0, 0.0)
    assert min_jerk(0.5)[0] == pytest.approx(0.5)
    for s in np.linspace(0.05, 0.95, 10):
        w, w1, w2 = min_jerk(s)
        assert 0.0 < w < 1.0 and w1 > 0.0
        assert w1 == pytest.approx((min_jerk(s + FD_STEP)[0] - min_jerk(s - FD_STEP)[0])
                                   / (2 * FD_STEP), rel=FD_TOL)
        assert w2 == pytest.approx((min_jerk(s + FD_STEP)[1] - min_jerk(s - FD_STEP)[1])
                                   / (2 * FD_STEP), rel=FD_TOL, abs=FD_TOL)
