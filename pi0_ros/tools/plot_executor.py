"""pi0-ros-plot-executor: each stitching strategy through a stream of overlapping, late chunks.

``pi0-ros-plot-executor --output docs/executor_strategies.png`` draws, per strategy (columns),
position, velocity, acceleration and jerk (rows) of one joint: the jerk-limited (ruckig)
command (blue), the exact velocity / acceleration limiter's command (the fallback, grey), the
stitched reference before the limiter (dashed), the future actions of every accepted chunk
(dots) and the seams (dotted). The chunks are offset (``OFFSET``), slightly noisy
(``NOISE``) views of a sine, stamped ``--latency`` s before they arrive. ``--tick-cost`` prints
instead the mean cost of ``StreamingExecutor.tick`` for 7 joints (timeit) per strategy, with
the exact limiter and with ruckig.
"""

from __future__ import annotations

import argparse
import timeit

import numpy as np

from pi0_ros.control import STRATEGIES, ActionChunk, ExecutorConfig, StreamingExecutor

VMAX, AMAX = 1.5, 15.0  # rad/s, rad/s^2 of the plotted joint
JMAX = 300.0  # rad/s^3: the jerk-limited (ruckig) command; the exact limiter's is drawn too
OFFSET = 0.04  # rad, std of a chunk's offset from the others (inference-to-inference change)
NOISE = 0.002  # rad, std of per-action noise inside a chunk
TICK_COST_JOINTS = 7


def target(t):
    return 0.6 * np.sin(2 * t)


def stream(rng, t, latency, horizon=16, dt=0.05):
    """One chunk arriving at ``t``: a noisy, offset view of sin(2 t) from t0 = t - latency."""
    t0 = t - latency
    times = t0 + dt * np.arange(horizon)
    acts = target(times) + rng.normal(0, OFFSET) + rng.normal(0, NOISE, horizon)
    return ActionChunk(t0, dt, ("j",), acts[:, None]), times, acts


def simulate(strategy, rate=500.0, latency=0.08, chunk_period=0.25, duration=2.2,
             interpolation="cubic", jerk_max=None):
    """Dict of arrays: t, q, v, a (finite differences of the command), ref (N, 3) or NaN,
    seams (arrival times), dots (times, values of the future actions), holding."""
    cfg = ExecutorConfig(("j",), (-2.0,), (2.0,), (VMAX,), (AMAX,), strategy=strategy,
                         interpolation=interpolation, crossfade_window=0.1,
                         chunk_timeout=0.35, jerk_max=(jerk_max,) if jerk_max else ())
    ex = StreamingExecutor(cfg, 1.0 / rate)
    ex.set_state([target(chunk_period - latency)], 0.0)  # where the first chunk starts
    rng = np.random.default_rng(0)
    ts, qs, refs, holds, seams, dots = [], [], [], [], [], ([], [])
    n_period = int(round(chunk_period * rate))
    for k in range(1, int(duration * rate)):
        t = k / rate
        if k % n_period == 0 and t < duration - 0.6:
            chunk, times, acts = stream(rng, t, latency)
            if ex.submit(chunk, t)[0]:
                seams.append(t)
                dots[0].extend(times[times >= t]), dots[1].extend(acts[times >= t])
        cmd = ex.tick(t)
        ref = ex.reference(t)
        ts.append(t), qs.append(cmd.position[0]), holds.append(cmd.holding)
        refs.append(ref[:, 0] if ref is not None else np.full(3, np.nan))
    t, q = np.array(ts), np.array(qs)
    v = np.gradient(q, t)
    a = np.diff(np.diff(q, prepend=q[0]), prepend=0.0) * rate * rate
    return {"t": t, "q": q, "v": np.diff(q, prepend=q[0]) * rate, "a": a,
            "j": np.diff(a, prepend=0.0) * rate,
            "ref": np.array(refs), "seams": np.array(seams), "dots": np.array(dots),
            "holding": np.array(holds), "v_smooth": v}


def tick_cost(strategy, rate=1000.0, joints=TICK_COST_JOINTS, horizon=50, dt=0.02,
              chunk_period=0.1, ticks=5000, jerk_max=None) -> float:
    """Mean seconds per ``StreamingExecutor.tick`` (timeit) over ``ticks`` ticks of a steady
    stream: chunks of ``horizon`` x ``dt`` every ``chunk_period`` s, 50 ms old on arrival, so
    ``horizon * dt / chunk_period`` of them overlap. Submits run between the timed stretches."""
    names = tuple(f"j{i}" for i in range(joints))
    cfg = ExecutorConfig(names, (-3.0,) * joints, (3.0,) * joints, (2.0,) * joints,
                         (20.0,) * joints, strategy=strategy,
                         jerk_max=(jerk_max,) * joints if jerk_max else ())
    ex = StreamingExecutor(cfg, 1.0 / rate)
    ex.set_state(np.zeros(joints), 0.0)
    n_period, clock = int(round(chunk_period * rate)), [0]

    def tick():
        clock[0] += 1
        ex.tick(clock[0] / rate)

    def submit():
        t = clock[0] / rate
        acts = 0.3 * np.sin(t - 0.05 + dt * np.arange(horizon))
        ex.submit(ActionChunk(t - 0.05, dt, names, np.outer(acts, np.ones(joints))), t)

    for _ in range(int(1.5 * horizon * dt / chunk_period)):  # steady state: all overlaps live
        submit()
        for _ in range(n_period):
            tick()
    total, timed = 0.0, 0
    while timed < ticks:
        submit()
        total += timeit.timeit(tick, number=n_period)
        timed += n_period
    return total / timed


def plot(path, rate, latency):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, len(STRATEGIES), sharex=True, sharey="row",
                             figsize=(15, 10.5), squeeze=False)
    rows = (("q", "position [rad]"), ("v", "velocity [rad/s]"),
            ("a", "acceleration [rad/s$^2$]"), ("j", "jerk [rad/s$^3$]"))
    for col, strategy in enumerate(STRATEGIES):
        exact = simulate(strategy, rate=rate, latency=latency)
        r = simulate(strategy, rate=rate, latency=latency, jerk_max=JMAX)
        axes[0, col].plot(r["dots"][0], r["dots"][1], ".", color="0.6", markersize=3,
                          label="future actions")
        for row, (key, _) in enumerate(rows):
            ax = axes[row, col]
            if row < 3:
                ax.plot(r["t"], r["ref"][:, row], "--", color="tab:orange", linewidth=1.2,
                        label="reference (stitched, before limits)")
            ax.plot(exact["t"], exact[key], color="0.55", linewidth=0.8,
                    label="exact v/a limiter (fallback)")
            ax.plot(r["t"], r[key], color="tab:blue", linewidth=1.0,
                    label="command: ruckig, jerk-limited (finite differences)")
            for t_s in r["seams"]:
                ax.axvline(t_s, color="0.75", linestyle=":", linewidth=1)
            hold = r["holding"]
            if hold.any():
                ax.fill_between(r["t"], 0, 1, where=hold, color="0.93",
                                transform=ax.get_xaxis_transform(), label="hold")
        for row, lim in ((1, VMAX), (2, AMAX), (3, JMAX)):
            axes[row, col].axhline(lim, color="tab:red", linewidth=0.8)
            axes[row, col].axhline(-lim, color="tab:red", linewidth=0.8)
        axes[0, col].set_title(strategy)
        axes[3, col].set_xlabel("time [s]")
    for row, (_, label) in enumerate(rows):
        axes[row, 0].set_ylabel(label)
    axes[2, 0].set_ylim(-1.3 * AMAX, 1.3 * AMAX)
    axes[3, 0].set_ylim(-2.5 * JMAX, 2.5 * JMAX)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, frameon=False)
    fig.suptitle(f"one joint at {rate:g} Hz: chunks of 16 x 50 ms every 250 ms, {latency * 1e3:g} "
                 f"ms latency (dotted: seams); limits (red) |v| <= {VMAX:g} rad/s, "
                 f"|a| <= {AMAX:g} rad/s^2, |j| <= {JMAX:g} rad/s^3; watchdog hold shaded",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    fig.savefig(path, dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="executor_strategies.png")
    ap.add_argument("--rate", type=float, default=500.0, help="control rate, Hz")
    ap.add_argument("--latency", type=float, default=0.08, help="chunk age at arrival, s")
    ap.add_argument("--tick-cost", action="store_true",
                    help=f"print the mean tick cost ({TICK_COST_JOINTS} joints) instead")
    args = ap.parse_args(argv)
    if args.tick_cost:
        print(f"mean StreamingExecutor.tick, {TICK_COST_JOINTS} joints, 1 kHz, chunks of "
              "50 x 20 ms every 100 ms (10 overlapping), median of 3 runs of 5000 ticks:")
        for strategy in STRATEGIES:
            for jerk, label in ((None, "exact"), (JMAX * 10, "ruckig")):
                cost = np.median([tick_cost(strategy, jerk_max=jerk) for _ in range(3)])
                print(f"  {strategy:18s} {label:7s} {cost * 1e6:6.1f} us")
        return 0
    plot(args.output, args.rate, args.latency)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
