"""Offline RTC measurement: seam jumps with replace vs RTC at a latency, and RTC's cost.

    python -m pi0_ros.tools.rtc_eval [--latency-steps 2 4 6] [--period 8] [--seams 40]
                                     [--threads 1] [--plot docs/rtc_seams.png]

Two policies, both sampled by the project's sampler (``RTCDenoiser``; RTC off is exactly
``Pi0Model.denoise``), with the project's host helpers (``delay_from_latency``,
``align_prefix``):

* ``bimodal``: a flow-matching policy whose data distribution is two narrow paths around a row
  of obstacles, y = +/- A sin^2(pi x / L) along x (2 action dims = planar position). Its
  velocity field is the exact conditional expectation for that Gaussian mixture (closed form,
  differentiable), so consecutive chunks pick a side at random: the "disagreeing" case.
* ``tiny``: the random-weight tiny pi0.5 (``tiny_config``) at a fixed observation; with other
  noise every chunk differs (normalized units).

Execution model (discrete, one action per control step, the "replace" strategy): a chunk is
observed at step n, arrives ``--latency-steps`` = d steps later, and the executor switches to
its action d; before that it runs the previous chunk. Figures per seam: position jump
|new[d] - prev[d]| (prev aligned to the new observation), velocity jump
|(new[d+1] - new[d]) - (prev[d] - prev[d-1])| / dt, and the frozen-prefix error
max |new[:d] - prev[:d]|. Cost: wall time of one ``denoise`` (10 steps) with RTC off and on,
tiny geometry, this machine's CPU (median of ``--repeats``).
"""

from __future__ import annotations

import argparse
import math
import time
from types import SimpleNamespace

import numpy as np
import torch

from pi0_ros.model import Pi0Model, random_init_, time_grid, tiny_config
from pi0_ros.model.rtc import (RTCConfig, RTCDenoiser, RTCPrefix, align_prefix,
                               delay_from_latency)

DT = 0.05  # s per action
STEPS = 10


class BimodalPolicy:
    """Duck-types the two things RTCDenoiser reads of a Pi0Model: ``config.action_horizon`` and
    ``denoise_step(cache, state, x_t, conds, step)``. ``state`` (B, 2) = current (x, y).

    Data: x0 = m_k + e, k in {upper, lower} with probability 1/2 each, e ~ N(0, S): per-action
    jitter ``sigma`` plus smooth chunk-level variation (offset, slope, bend of y, ``spread``
    each), a stand-in for a learned policy's within-mode spread in normalized units."""

    def __init__(self, horizon=20, speed=0.5, amplitude=0.3, period=1.0, sigma=0.005,
                 spread=0.1):
        self.config = SimpleNamespace(action_horizon=horizon, action_dim=2)
        self.speed, self.amp, self.period = speed, amplitude, period
        k = torch.linspace(0.0, 1.0, horizon)
        basis = torch.zeros(3, horizon, 2)
        basis[:, :, 1] = torch.stack([torch.ones(horizon), k, 4 * k * (1 - k)])
        basis = spread * basis.reshape(3, -1)
        self.cov = sigma**2 * torch.eye(2 * horizon) + basis.T @ basis  # (H*A, H*A)

    def modes(self, state: torch.Tensor) -> torch.Tensor:
        """(B, 2) -> (B, 2 modes, H, 2): the upper and lower path ahead of the current x."""
        k = torch.arange(1, self.config.action_horizon + 1, dtype=state.dtype)
        x = state[:, :1] + self.speed * DT * k  # (B, H)
        y = self.amp * torch.sin(math.pi * x / self.period) ** 2
        return torch.stack([torch.stack([x, y], -1), torch.stack([x, -y], -1)], 1)

    def denoise_step(self, cache, state, x_t, conds, step):
        """Exact v = E[eps - x0 | x_t] for x_t = t eps + (1-t) x0 (per mode: Gaussian
        conditioning, S_t = (1-t)^2 S + t^2 I; modes weighted by their posterior)."""
        t = conds.times[step]
        b, h, a = x_t.shape
        m = self.modes(state).reshape(b, 2, h * a)
        s_t = (1 - t) ** 2 * self.cov + t**2 * torch.eye(h * a)
        resid = x_t.reshape(b, 1, h * a) - (1 - t) * m  # (B, K, HA)
        sol = torch.linalg.solve(s_t, resid.reshape(-1, h * a).T).T.reshape(b, 2, h * a)
        post = torch.softmax(-0.5 * (resid * sol).sum(-1), dim=1)[:, :, None]
        e_eps = t * sol
        e_x0 = m + (1 - t) * sol @ self.cov
        return (post * (e_eps - e_x0)).sum(1).reshape(b, h, a)


def seam_metrics(prev_al: np.ndarray, new: np.ndarray, d: int) -> dict[str, float]:
    """prev_al, new (H, A): the previous chunk aligned to the new one's time base."""
    pos = np.abs(new[d] - prev_al[d]).max()
    v_before = (prev_al[d] - prev_al[d - 1]) / DT if d > 0 else np.zeros(new.shape[1])
    vel = np.abs((new[d + 1] - new[d]) / DT - v_before).max()
    frozen = np.abs(new[:d] - prev_al[:d]).max() if d > 0 else 0.0
    return {"pos": float(pos), "vel": float(vel), "frozen": float(frozen)}


def run_stream(model, sample, state_of, d: int, period: int, seams: int, rtc: bool, seed=0):
    """Execute chunks every ``period`` steps with latency d; returns (executed (N, A), seams)."""
    h, a = model.config.action_horizon, model.config.action_dim
    if period + d + 1 >= h:
        raise ValueError(f"period + latency: expected < horizon - 1 = {h - 1}, "
                         f"found {period + d + 1}")
    gen = torch.Generator().manual_seed(seed)
    state = state_of(None)
    noise = torch.randn(1, h, a, generator=gen)
    chunk = sample(state, noise, None)[0]  # first chunk: nothing to continue
    chunk_start, executed, stats = 0, [], []
    latencies = list(np.random.default_rng(seed).uniform(0.6, 1.0, 50) * d * DT)
    for n in range(1, seams + 1):
        obs_step = n * period
        while len(executed) < obs_step:  # run the current chunk up to the observation
            executed.append(chunk[len(executed) - chunk_start])
        state = state_of(executed[-1])
        delay = delay_from_latency(latencies, DT, 95.0, max_delay=h // 2)
        aligned = align_prefix(chunk, chunk_start * DT, obs_step * DT, DT, delay, h, a)
        prefix = RTCPrefix.empty(1, h, a).load_([aligned]) if rtc else None
        noise = torch.randn(1, h, a, generator=gen)
        new = sample(state, noise, prefix)[0]
        while len(executed) < obs_step + delay:  # the old chunk runs during inference
            executed.append(chunk[len(executed) - chunk_start])
        stats.append(seam_metrics(aligned.actions, new, delay))
        chunk, chunk_start = new, obs_step
    return np.array(executed), stats


def bimodal(d: int, period: int, seams: int, rtc: bool, beta: float):
    """RTC off = the same loop with an empty prefix (bit-identical to plain Euler, test_rtc)."""
    policy = BimodalPolicy()
    h, a = policy.config.action_horizon, policy.config.action_dim
    den = RTCDenoiser(policy, RTCConfig(enabled=True, max_guidance_weight=beta))
    dt, times = time_grid(STEPS)
    conds = SimpleNamespace(times=times, dt=dt, num_steps=STEPS)
    scratch = SimpleNamespace(k=[], v=[])  # the toy has no K/V cache

    def sample(state, noise, prefix):
        prefix = RTCPrefix.empty(1, h, a) if prefix is None else prefix
        return den.integrate(scratch, state, noise, conds, prefix).numpy()

    def state_of(last):
        return torch.tensor(np.zeros(2) if last is None else last, dtype=torch.float32)[None]

    return run_stream(policy, sample, state_of, d, period, seams, rtc)


def tiny_setup(seed=0):
    cfg = tiny_config(pi05=True, num_cameras=2)
    model = random_init_(Pi0Model(cfg), seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    s, length = cfg.vision.image_size, cfg.max_token_len
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[:, :12] = True
    tokens = torch.where(mask, torch.randint(3, cfg.lm.vocab_size, (1, length), generator=g), 0)
    with torch.no_grad():
        cache = model.new_cache(1, 2, length)
        images = torch.rand(1, 2, 3, s, s, generator=g) * 2 - 1
        model.fill_prefix(cache, model.embed_images(images), torch.ones(1, 2, dtype=torch.bool),
                          tokens, mask)
    return model, cache, torch.randn(1, cfg.action_dim, generator=g), model.time_conditioning(
        STEPS)


def tiny(d: int, period: int, seams: int, rtc: bool, beta: float):
    model, cache, state, conds = tiny_setup()
    den = RTCDenoiser(model, RTCConfig(enabled=rtc, max_guidance_weight=beta))

    def sample(_state, noise, prefix):
        with torch.no_grad():
            return den.denoise(cache, state, noise, conds, prefix).numpy()

    return run_stream(model, sample, lambda last: state, d, period, seams, rtc)


def cost(repeats: int) -> dict[str, float]:
    model, cache, state, conds = tiny_setup()
    h, a = model.config.action_horizon, model.config.action_dim
    prev = np.random.default_rng(0).standard_normal((h, a)).astype(np.float32)
    prefix = RTCPrefix.empty(1, h, a).load_([align_prefix(prev, 0.0, 0.0, DT, 4, h)])
    noise = torch.randn(1, h, a)
    out = {}
    for name, enabled in (("off", False), ("on", True)):
        den = RTCDenoiser(model, RTCConfig(enabled=enabled))
        times = []
        for _ in range(repeats + 2):
            t0 = time.perf_counter()
            with torch.no_grad():
                den.denoise(cache, state, noise, conds, prefix)
            times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times[2:]) * 1e3)
    return out


def summarize(stats) -> dict[str, float]:
    out = {k: float(np.mean([s[k] for s in stats])) for k in ("pos", "vel", "frozen")}
    return out | {f"{k}_max": float(np.max([s[k] for s in stats])) for k in ("pos", "vel")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency-steps", type=int, nargs="+", default=[2, 4, 6],
                   help="d: latency in actions (one run per value)")
    p.add_argument("--period", type=int, default=8, help="actions executed per inference")
    p.add_argument("--seams", type=int, default=40)
    p.add_argument("--beta", type=float, default=5.0, help="max guidance weight")
    p.add_argument("--repeats", type=int, default=20, help="timing repeats (cost)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--plot", default=None, help="write the bimodal trajectories here (png)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    period = args.period
    print(f"dt {DT * 1e3:.0f} ms, {period} actions per inference, beta {args.beta}; "
          f"seam jumps: mean (max) over the seams")
    print("| policy | latency | strategy | pos jump | vel jump (1/s) | frozen-prefix err |")
    print("|---|---|---|---|---|---|")
    runs = {}
    for d in args.latency_steps:
        for name, fn, seams in (("bimodal", bimodal, args.seams),
                                ("tiny pi0.5", tiny, min(args.seams, 12))):
            for rtc in (False, True):
                executed, stats = fn(d, period, seams, rtc, args.beta)
                runs[name, d, rtc] = executed
                s = summarize(stats)
                print(f"| {name} | {d} ({d * DT * 1e3:.0f} ms) | {'RTC' if rtc else 'replace'} "
                      f"| {s['pos']:.4f} ({s['pos_max']:.3f}) | {s['vel']:.3f} "
                      f"({s['vel_max']:.3f}) | {s['frozen']:.4f} |")
    c = cost(args.repeats)
    print(f"cost (tiny pi0.5, {STEPS} steps, CPU, {args.threads} thread(s), median of "
          f"{args.repeats}): RTC off {c['off']:.1f} ms, on {c['on']:.1f} ms "
          f"({c['on'] / c['off']:.2f}x)")
    if args.plot:
        d = args.latency_steps[len(args.latency_steps) // 2]
        _plot({rtc: runs["bimodal", d, rtc] for rtc in (False, True)}, args.plot, d, period)


def _plot(runs, path, d, period):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    for ax, rtc in zip(axes, (False, True)):
        ex = runs[rtc]
        ax.plot(ex[:, 0], ex[:, 1], lw=1.2)
        seams = [n * period + d for n in range(1, len(ex) // period) if n * period + d < len(ex)]
        ax.plot(ex[seams, 0], ex[seams, 1], "r|", ms=10, label="seam (switch to new chunk)")
        ax.set_ylabel("y")
        ax.set_title(f"bimodal toy, latency {d} actions: {'RTC' if rtc else 'replace'}")
    axes[0].legend(loc="upper right")
    axes[1].set_xlabel("x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
