"""Jerk-limited tracking (ruckig) and its fallback: property tests on fuzzed chunk streams with
jittered ticks -- no command beyond a position, velocity, acceleration or jerk limit, no NaN --
and the exact limiter taking over when ruckig is not importable."""

import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_control_properties import STOP_SUBMITS, TIMEOUT, streams

from pi0_ros.control import ActionChunk, ExecutorConfig, StreamingExecutor
from pi0_ros.control import jerk
from pi0_ros.control.limits import RateLimiter

ruckig = pytest.importorskip("ruckig")

NAMES = ("a", "b")
LIMIT, VMAX, AMAX, JMAX = 1.0, 2.0, 20.0, 400.0
REL = 1e-9  # relative float rounding allowed on a bound
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def config(**kw):
    kw = {"chunk_timeout": TIMEOUT, **kw}
    return ExecutorConfig(NAMES, (-LIMIT,) * 2, (LIMIT,) * 2, (VMAX,) * 2, (AMAX,) * 2,
                          jerk_max=(JMAX,) * 2, **kw)


def simulate(s, *, beyond=0.0, duration=1.2):
    """Run stream ``s`` through a jerk-limited executor; ``beyond``: chunks also aim up to that
    far past the position limits. Returns tick times and the commands."""
    rng = np.random.default_rng(s.seed)
    ex = StreamingExecutor(config(strategy=s.strategy, interpolation=s.interpolation,
                                  max_seam_jump=10.0), 1.0 / s.rate)
    assert ex.tracker == "ruckig"
    ex.set_state([0.0, 0.0], 0.0)
    t, next_chunk, ts, cmds, accepted = 0.0, 0.0, [], [], []
    while t < duration:
        t += (1.0 - s.jitter * rng.random()) / s.rate
        if t >= next_chunk and t < STOP_SUBMITS:
            next_chunk += s.chunk_period
            if rng.random() >= s.drop:
                t0 = t - max(0.0, s.latency + s.latency_jitter * rng.normal())
                acts = ex.position + np.cumsum(rng.normal(0, s.noise, (s.horizon, 2)), axis=0)
                if beyond:
                    acts += np.linspace(0, rng.uniform(-1, 1) * (LIMIT + beyond), s.horizon)[
                        :, None]
                if ex.submit(ActionChunk(t0, s.dt, NAMES, acts), t)[0]:
                    accepted.append(t)
        ts.append(t), cmds.append(ex.tick(t))
    return np.array(ts), cmds, accepted, ex


def check_limits(ts, cmds):
    q = np.array([c.position for c in cmds])
    v = np.array([c.velocity for c in cmds])
    a = np.array([c.acceleration for c in cmds])
    assert np.all(np.isfinite(q)) and np.all(np.isfinite(v)) and np.all(np.isfinite(a))
    assert np.all(np.abs(q) <= LIMIT)
    assert np.all(np.abs(v) <= VMAX * (1 + REL))
    assert np.all(np.abs(a) <= AMAX * (1 + REL))
    dt = np.diff(ts)[:, None]
    assert np.all(np.abs(np.diff(a, axis=0)) <= JMAX * dt * (1 + REL) + 1e-9)
    # Divided differences of the positions themselves (what a controller differentiating the
    # commands sees, jittered ticks included): 1! q[t0,t1], 2! q[t0..t2], 3! q[t0..t3].
    d1 = np.diff(q, axis=0) / dt
    d2 = 2 * np.diff(d1, axis=0) / (ts[2:] - ts[:-2])[:, None]
    d3 = 3 * np.diff(d2, axis=0) / (ts[3:] - ts[:-3])[:, None]
    fp = 1e-13  # rad: float rounding of positions, divided by the spans
    assert np.all(np.abs(d1) <= VMAX * (1 + REL) + fp / dt)
    assert np.all(np.abs(d2) <= AMAX * (1 + REL) + 8 * fp / dt[1:] ** 2)
    assert np.all(np.abs(d3) <= JMAX * (1 + 1e-6) + 48 * fp / dt[2:] ** 3)


@SETTINGS
@given(s=streams())
def test_jerk_limited_stream_is_within_every_limit(s):
    ts, cmds, accepted, ex = simulate(s)
    check_limits(ts, cmds)
    assert ex._limiter.clamped == 0  # the braking check kept it inside, not the safety net
    last = accepted[-1] if accepted else 0.0
    late = ts > last + TIMEOUT + 1e-9
    assert all(c.holding for c, lt in zip(cmds, late) if lt)


@SETTINGS
@given(s=streams(), beyond=st.floats(0.1, 0.9))
def test_chunks_beyond_the_position_limits_stop_in_time(s, beyond):
    """Chunks that run past the limits: the command stops at them within a, j limits (the
    jerk-limited braking check; the final clamp never acts)."""
    s.noise = 0.03
    ts, cmds, _, ex = simulate(s, beyond=beyond)
    check_limits(ts, cmds)
    assert ex._limiter.clamped == 0


def test_a_feasible_reference_is_followed_exactly():
    """A slow sine within every limit: the command lands on the reference at each tick."""
    ex = StreamingExecutor(config(chunk_timeout=5.0), 0.002)
    times = 0.05 * np.arange(60)
    acts = 0.2 * np.sin(times)[:, None] * np.ones((1, 2))
    ex.set_state(acts[0], 0.0)
    ex.submit(ActionChunk(0.0, 0.05, NAMES, acts), 0.0)
    errs = []
    for k in range(1, 1250):
        t = 0.002 * k
        cmd, ref = ex.tick(t), ex.reference(t)
        errs.append(np.max(np.abs(cmd.position - ref[0])))
    assert max(errs[100:]) < 1e-9  # from 0.2 s on: the join (an acceleration step) caught up


def test_seam_acceleration_is_continuous_where_the_exact_limiter_steps():
    """What issue 14 measured: the exact limiter's acceleration jumps at a seam; ruckig's
    changes by at most jmax per second."""
    def run(**kw):
        cfg = ExecutorConfig(("a",), (-2.0,), (2.0,), (1.5,), (15.0,), chunk_timeout=0.35, **kw)
        ex = StreamingExecutor(cfg, 0.002)
        ex.set_state([0.0], 0.0)
        out = []
        for k in range(1, 600):
            t = 0.002 * k
            if k % 125 == 1:
                acts = 0.6 * np.sin(2 * (t - 0.08 + 0.05 * np.arange(16))) + 0.04 * (k % 3 - 1)
                ex.submit(ActionChunk(t - 0.08, 0.05, ("a",), acts[:, None]), t)
            out.append(ex.tick(t).acceleration[0])
        return np.abs(np.diff(out)) / 0.002

    assert run().max() > 2 * 300.0  # the exact limiter: jerk unbounded at seams
    assert run(jerk_max=(300.0,)).max() <= 300.0 * (1 + REL)


def test_fallback_without_ruckig(monkeypatch, caplog):
    monkeypatch.setattr(jerk, "ruckig", None)
    with caplog.at_level(logging.WARNING):
        ex = StreamingExecutor(config(), 0.002)
    assert ex.tracker == "exact" and isinstance(ex._limiter, RateLimiter)
    assert "ruckig not importable" in caplog.text
    with pytest.raises(ValueError, match="ruckig"):
        StreamingExecutor(config(tracker="ruckig"), 0.002)


def test_tracker_exact_and_no_jerk_use_the_rate_limiter():
    assert StreamingExecutor(config(tracker="exact"), 0.002).tracker == "exact"
    cfg = ExecutorConfig(NAMES, (-1.0,) * 2, (1.0,) * 2, (1.0,) * 2, (10.0,) * 2)
    assert StreamingExecutor(cfg, 0.002).tracker == "exact"


@pytest.mark.parametrize("kw", [dict(jerk_max=(0.0, 1.0)), dict(jerk_max=(1.0,)),
                                dict(tracker="bogus")])
def test_bad_jerk_config_is_refused(kw):
    with pytest.raises(ValueError):
        ExecutorConfig(NAMES, (-1.0,) * 2, (1.0,) * 2, (1.0,) * 2, (10.0,) * 2, **kw)


def test_a_reference_beyond_only_the_jerk_limit_is_not_followed_beyond_it():
    """0.03 sin(25 t): v 0.75 <= 2, a 18.75 <= 20, but jerk 469 > 400 rad/s^3. Once the
    command is on it, taking the reference as is (the direct path) would exceed jmax."""
    ex = StreamingExecutor(config(chunk_timeout=5.0), 0.002)
    times = 0.01 * np.arange(200)
    acts = 0.03 * np.sin(25.0 * times)[:, None] * np.ones((1, 2))
    ex.set_state(acts[0], 0.0)
    ex.submit(ActionChunk(0.0, 0.01, NAMES, acts), 0.0)
    ts = 0.002 * np.arange(1, 900)
    check_limits(ts, [ex.tick(t) for t in ts])
