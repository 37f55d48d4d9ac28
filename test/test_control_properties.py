"""Property tests (hypothesis): random chunk streams, latencies, rates, jitter and dropouts.

Each example drives a StreamingExecutor the way the node does (submit at arrival with
t0 = observation time, tick at the control rate) and checks the contract on what comes out:
no NaN, positions within limits, finite-difference |v| <= vmax and |a| <= amax, no jump at
seams, holding after the timeout, past actions without any influence, and -- with limits set
high, so the command is the reference -- the stitched reference continuous in q and v at
every seam.
"""

from dataclasses import dataclass, field

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pi0_ros.control import STRATEGIES, ActionChunk, ExecutorConfig, StreamingExecutor

NAMES = ("a", "b")
LIMIT, VMAX, AMAX = 1.0, 2.0, 20.0
TIMEOUT = 0.25  # s, chunk_timeout of the streams
STOP_SUBMITS = 0.8  # s, no chunk arrives after this: the tail must end in a hold
FD_EPS = 1e-12  # relative float rounding of finite differences of float64 positions
SEAM_TOL = 1e-9  # rad, rad/s: reference q, v before vs after a seam
SEAM_SIDE = 1e-7  # s, "just after the seam"
REF_ACC_BOUND = 1e4  # rad/s^2, generous bound on the reference's acceleration right after
PAST_EPS = 1e-9  # s, documented: an action this close before `now` still counts as future
PAST_MARK = 5.0  # value of every past action in the marker test (limits are +-10 there)
FUTURE_MAX = 0.3  # rad, largest future action in the marker test
OVERSHOOT_TOL = 0.2  # rad above FUTURE_MAX that joins + tracking may overshoot

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Stream:
    """One random stream of chunks: what the policy sends and when."""

    strategy: str
    interpolation: str
    seed: int
    rate: float
    jitter: float  # fraction by which a tick period may come early
    latency: float  # s, mean age of a chunk's t0 at arrival
    latency_jitter: float
    chunk_period: float  # s between inferences
    drop: float  # probability an inference is lost
    horizon: int
    dt: float
    noise: float  # rad, step size of the chunks' random walk


@st.composite
def streams(draw, strategies=STRATEGIES):
    return Stream(
        strategy=draw(st.sampled_from(strategies)),
        interpolation=draw(st.sampled_from(["linear", "cubic"])),
        seed=draw(st.integers(0, 2**31 - 1)),
        rate=draw(st.sampled_from([50.0, 100.0, 500.0, 1000.0])),
        jitter=draw(st.sampled_from([0.0, 0.1])),
        latency=draw(st.floats(0.0, 0.15)),
        latency_jitter=draw(st.floats(0.0, 0.05)),
        chunk_period=draw(st.floats(0.1, 0.3)),
        drop=draw(st.floats(0.0, 0.5)),
        horizon=draw(st.integers(4, 50)),
        dt=draw(st.sampled_from([0.02, 0.05, 0.1])),
        noise=draw(st.sampled_from([0.005, 0.03, 0.1])),
    )


@dataclass
class Run:
    t: np.ndarray  # (N,) tick times
    q: np.ndarray  # (N, D) commanded positions
    holding: np.ndarray  # (N,) bool
    ref: list = field(default_factory=list)  # (N,) reference (3, D) at each tick, or None
    accepted: list = field(default_factory=list)  # arrival times of accepted chunks
    seams: list = field(default_factory=list)  # (t_s, reference before, after) per seam


def simulate(s: Stream, *, limit=LIMIT, vmax=VMAX, amax=AMAX, past=None, duration=1.4,
             record_reference=False, max_seam_jump=0.5) -> Run:
    """Run the stream; ``past(rng, shape)`` overrides the values of actions already past at
    arrival (drawn from a separate generator, so the rest of the stream is unchanged)."""
    rng, past_rng = np.random.default_rng(s.seed), np.random.default_rng(s.seed + 1)
    cfg = ExecutorConfig(NAMES, (-limit,) * 2, (limit,) * 2, (vmax,) * 2, (amax,) * 2,
                         strategy=s.strategy, interpolation=s.interpolation,
                         chunk_timeout=TIMEOUT, max_seam_jump=max_seam_jump)
    ex = StreamingExecutor(cfg, 1.0 / s.rate)
    ex.set_state([0.0, 0.0], 0.0)
    ts, qs, holds, out = [], [], [], Run(None, None, None)
    t, next_chunk = 0.0, 0.0
    while t < duration:
        t += (1.0 - s.jitter * rng.random()) / s.rate
        if t >= next_chunk and t < STOP_SUBMITS:
            next_chunk += s.chunk_period
            if rng.random() >= s.drop:
                t0 = t - max(0.0, s.latency + s.latency_jitter * rng.normal())
                acts = ex.position + np.cumsum(rng.normal(0, s.noise, (s.horizon, 2)), axis=0)
                is_past = t0 + s.dt * np.arange(s.horizon) < t - PAST_EPS
                if past is not None:
                    acts[is_past] = past(past_rng, acts[is_past].shape)
                t_s = ex._t
                before = ex.reference(t_s) if record_reference else None
                # What the old reference itself does just after t_s: with linear
                # interpolation t_s may be one of its knots, where its own velocity steps.
                old_after = ex.reference(t_s + SEAM_SIDE) if record_reference else None
                ok, _ = ex.submit(ActionChunk(t0, s.dt, NAMES, acts), t)
                if ok:
                    out.accepted.append(t)
                    if record_reference and before is not None:
                        out.seams.append((t_s, before, ex.reference(t_s),
                                          ex.reference(t_s + SEAM_SIDE), old_after))
        cmd = ex.tick(t)
        ts.append(t), qs.append(cmd.position), holds.append(cmd.holding)
        if record_reference:
            out.ref.append(ex.reference(t))
    out.t, out.q, out.holding = np.array(ts), np.array(qs), np.array(holds)
    return out


def finite_differences(run: Run):
    dt = np.diff(run.t)
    v = np.diff(run.q, axis=0) / dt[:, None]
    a = np.diff(v, axis=0) / dt[1:, None]
    return dt, v, a


@SETTINGS
@given(s=streams())
def test_stream_is_safe(s):
    run = simulate(s)
    dt, v, a = finite_differences(run)
    assert np.all(np.isfinite(run.q))
    assert np.all(np.abs(run.q) <= LIMIT)
    assert np.all(np.abs(v) <= VMAX * (1 + FD_EPS) + FD_EPS / dt[:, None])
    assert np.all(np.abs(a) <= AMAX * (1 + FD_EPS) + 4 * FD_EPS / dt[1:, None] ** 2)
    # no position jump at a seam: the command moves at most vmax * period there too
    for t_arr in run.accepted:
        k = int(np.searchsorted(run.t, t_arr))
        if 0 < k < len(run.t):
            assert np.all(np.abs(run.q[k] - run.q[k - 1]) <= VMAX * dt[k - 1] * (1 + 1e-9))
    # hold after timeout: holding from last arrival + timeout on, at rest once braked
    last = run.accepted[-1] if run.accepted else 0.0
    late = run.t > last + TIMEOUT + 1e-9
    assert np.all(run.holding[late])
    rest = run.t[1:] > last + TIMEOUT + VMAX / AMAX + 2.0 / s.rate
    assert np.all(v[rest] == 0.0)


@SETTINGS
@given(s=streams())
def test_past_actions_have_no_influence(s):
    """Bit-identical commands whatever values the already-past actions hold."""
    a = simulate(s, past=lambda rng, shape: rng.uniform(-0.4, 0.4, shape))
    b = simulate(s, past=lambda rng, shape: np.full(shape, 0.37))
    np.testing.assert_array_equal(a.q, b.q)


@SETTINGS
@given(s=streams(), latency=st.floats(0.06, 0.3))
def test_past_actions_are_never_executed(s, latency):
    """Past actions marked far away (PAST_MARK): the command never heads toward them."""
    s.latency, s.noise, s.drop = latency, 0.01, 0.0
    s.horizon = max(s.horizon, int((latency + 3 * s.latency_jitter) / s.dt) + 4)

    def marked(rng, shape):
        return np.full(shape, PAST_MARK)

    run = simulate(s, limit=10.0, past=marked, max_seam_jump=FUTURE_MAX)
    assert run.accepted  # chunks with future actions were executed...
    assert np.max(np.abs(run.q)) <= FUTURE_MAX + OVERSHOOT_TOL  # ...their past ones never


@SETTINGS
@given(s=streams())
def test_reference_is_continuous_at_seams(s):
    """Limits high: the command is the stitched reference, whose q and v match at seams."""
    run = simulate(s, limit=100.0, vmax=1e3, amax=1e6, record_reference=True,
                   max_seam_jump=10.0)
    for (_, before, after, just_after, old_after) in run.seams:
        assert after is not None and just_after is not None
        assert np.all(np.abs(after[0] - before[0]) <= SEAM_TOL)
        assert np.all(np.abs(after[1] - before[1]) <= SEAM_TOL * (1 + np.abs(before[1])))
        # Just after the seam the velocity continues from its value at the seam, or (a seam
        # on a knot of a linear old reference, which crossfade / ensemble blend from) follows
        # the old reference's own step there: the seam itself adds no step.
        step = REF_ACC_BOUND * SEAM_SIDE
        from_seam = np.abs(just_after[1] - before[1]) <= step
        from_old = (np.abs(just_after[1] - old_after[1]) <= step if old_after is not None
                    else np.zeros_like(from_seam))
        assert np.all(from_seam | (from_old & (s.interpolation == "linear")))
    for q, ref in zip(run.q, run.ref):  # the limiter passed the reference through untouched
        if ref is not None:
            np.testing.assert_allclose(q, ref[0], rtol=0, atol=1e-9)
