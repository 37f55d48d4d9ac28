"""Unit tests for pi0_ros.control.limits.RateLimiter (positions, velocity, acceleration)."""

import numpy as np
import pytest

from pi0_ros.control.limits import RateLimiter

LO, HI, VMAX, AMAX = -1.0, 1.0, 2.0, 20.0
RATES = [50.0, 500.0, 1000.0]
FD_EPS = 1e-12  # relative float rounding of finite differences of float64 positions
STOP_TOL = 1e-9  # rad/s, "at rest"


def limiter(d=2, q=None, v=None):
    lim = RateLimiter([LO] * d, [HI] * d, [VMAX] * d, [AMAX] * d)
    if q is not None:
        lim.q, lim.v = np.array(q, dtype=float), np.array(v, dtype=float)
    return lim


def run(lim, ref, period, n):
    """Positions (n+1, D) from following ``ref(t) -> (q, v) or None`` for n ticks."""
    qs = [lim.q.copy()]
    for k in range(1, n + 1):
        r = ref(k * period)
        qs.append(lim.step(*(r if r is not None else (None, None)), period).copy())
    return np.array(qs)


def assert_within(qs, period):
    v = np.diff(qs, axis=0) / period
    a = np.diff(v, axis=0) / period
    assert np.all(qs >= LO) and np.all(qs <= HI)
    assert np.all(np.abs(v) <= VMAX * (1 + FD_EPS) + FD_EPS / period)
    assert np.all(np.abs(a) <= AMAX * (1 + FD_EPS) + 4 * FD_EPS / period**2)
    return v, a


@pytest.mark.parametrize("rate", RATES)
def test_feasible_reference_is_followed_exactly(rate):
    ref = lambda t: (np.array([0.3 * np.sin(2 * t), 0.3 * np.cos(2 * t)]),  # noqa: E731
                     np.array([0.6 * np.cos(2 * t), -0.6 * np.sin(2 * t)]))
    period = 1.0 / rate
    lim = limiter(2, ref(0.0)[0], (ref(0.0)[0] - ref(-period)[0]) / period)
    qs = run(lim, ref, period, int(rate))
    expected = np.array([ref(k * period)[0] for k in range(1, int(rate) + 1)])
    np.testing.assert_allclose(qs[1:], expected, atol=1e-12)
    assert lim.exact
    assert_within(qs, period)


@pytest.mark.parametrize("rate", RATES)
def test_step_is_rate_limited_and_settles_without_zigzag(rate):
    lim, period = limiter(1), 1.0 / rate
    lim.reset([-0.5])
    qs = run(lim, lambda t: (np.array([0.5]), np.zeros(1)), period, int(2 * rate))
    v, a = assert_within(qs, period)
    assert np.max(np.abs(v)) == pytest.approx(VMAX)  # it did hit the velocity limit
    assert np.max(np.abs(a)) == pytest.approx(AMAX)  # and the acceleration limit
    assert qs[-1, 0] == pytest.approx(0.5, abs=1e-9) and abs(v[-1, 0]) < STOP_TOL
    assert np.max(qs) <= 0.5 + 1e-9  # no overshoot
    assert np.sum(np.diff(np.sign(v[np.abs(v[:, 0]) > 1e-9, 0])) != 0) == 0  # no zig-zag


@pytest.mark.parametrize("rate", RATES)
def test_infeasible_reference_is_cut_to_the_limits(rate):
    lim, period = limiter(), 1.0 / rate
    rng = np.random.default_rng(int(rate))
    jumps = rng.uniform(-0.8, 0.8, (40, 2))
    ref = lambda t: (jumps[int(t * 20) % 40], np.zeros(2))  # noqa: E731  20 Hz square steps
    assert_within(run(lim, ref, period, int(2 * rate)), period)


@pytest.mark.parametrize("rate", RATES)
def test_position_limit_brakes_to_rest_at_the_limit(rate):
    lim, period = limiter(1), 1.0 / rate
    lim.reset([0.0])
    qs = run(lim, lambda t: (np.array([5.0]), np.zeros(1)), period, int(2 * rate))
    v, _ = assert_within(qs, period)
    assert qs[-1, 0] <= HI and qs[-1, 0] > HI - 1e-3  # parked at the limit
    assert abs(v[-1, 0]) < STOP_TOL
    # braking started before the limit: the speed falls while the position still rises
    k_peak = int(np.argmax(v[:, 0]))
    assert qs[k_peak, 0] < HI - VMAX**2 / (2 * AMAX) * 0.9


def test_reference_moving_past_a_limit_is_tracked_at_the_limit():
    lim, period = limiter(1, [0.8], [0.5]), 0.002
    ref = lambda t: (np.array([0.8 + 0.5 * t]), np.array([0.5]))  # noqa: E731  crosses 1 at 0.4
    qs = run(lim, ref, period, 500)
    v, _ = assert_within(qs, period)
    np.testing.assert_allclose(qs[1:150, 0], [0.8 + 0.5 * k * period for k in range(1, 150)],
                               atol=1e-12)  # exact while the brakes are not needed
    assert qs[-1, 0] <= HI and abs(v[-1, 0]) < STOP_TOL


@pytest.mark.parametrize("rate", RATES)
def test_hold_decelerates_at_amax_then_stands(rate):
    lim, period = limiter(1, [-0.8], [1.5]), 1.0 / rate
    run(lim, lambda t: (np.array([-0.8 + 1.5 * t]), np.array([1.5])), period, int(0.2 * rate))
    assert lim.v[0] == pytest.approx(1.5)
    qs = run(lim, lambda t: None, period, int(0.3 * rate))
    v, a = assert_within(qs, period)
    np.testing.assert_allclose(v[0, 0], 1.5 - AMAX * period, rtol=1e-9)
    n_brake = int(np.ceil(1.5 / (AMAX * period)))
    np.testing.assert_allclose(a[:n_brake - 2, 0], -AMAX, rtol=1e-6)  # the last is partial
    np.testing.assert_allclose(v[n_brake:, 0], 0.0, atol=STOP_TOL)


def test_jittered_periods_keep_finite_differences_within_limits():
    lim = limiter()
    rng = np.random.default_rng(0)
    periods = rng.uniform(0.0016, 0.0024, 800)
    t, qs, vs = 0.0, [lim.q.copy()], []
    for p in periods:
        t += p
        q = lim.step(np.array([0.9 * np.sin(6 * t), 0.9 * np.sign(np.sin(3 * t))]),
                     np.zeros(2), p).copy()
        vs.append((q - qs[-1]) / p)
        qs.append(q)
    vs = np.array(vs)
    assert np.all(np.abs(vs) <= VMAX * (1 + FD_EPS) + 1e-9)
    assert np.all(np.abs(np.diff(vs, axis=0)) / periods[1:, None] <= AMAX * (1 + 1e-9) + 1e-6)


def test_fast_path_computes_what_the_general_step_computes():
    rng = np.random.default_rng(1)
    fast_taken = 0
    for _ in range(400):
        q, v = rng.uniform(-1, 1, 3), rng.uniform(-2, 2, 3)
        a, b = limiter(3, q, v), limiter(3, q, v)
        period = rng.choice([0.001, 0.002, 0.02])
        q_ref = q + period * (v + rng.normal(0, rng.choice([1e-3, 0.1, 10.0]), 3))
        v_ref = (q_ref - q) / period + rng.normal(0, rng.choice([1e-4, 1.0]), 3)
        fast_taken += a._deadbeat_free((q_ref - q) / period, v_ref, period)
        fast = a.step(q_ref, v_ref, period)
        general = b._general(q_ref, v_ref, period, 1.0 / period)
        np.testing.assert_allclose(fast, general, rtol=0, atol=1e-12)
        np.testing.assert_allclose(a.v, b.v, rtol=1e-9, atol=1e-9)
        assert a.exact == b.exact
    assert 20 < fast_taken < 380  # both paths were exercised
