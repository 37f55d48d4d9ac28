"""RTC on the replay: seam jumps with ``replace`` vs ``rtc`` at a latency, through the real
pipeline, ActionChunk and executor (``pi0-ros-replay --latency X``'s ``run_offline``).

    python -m pi0_ros.tools.rtc_replay [--out DIR] [--latency 0.1 0.2] [--duration 10]
                                       [--plot docs/rtc_replay.png] [--json out.json]

Two bags and policies (``make_demo`` parameters: cameras + Panda joint states, dt = 50 ms, 5 Hz):

* ``demo``: the demo bag and checkpoint (tiny pi0.5) loaded by the node's factory with the
  parameters' ``rtc.*`` (RTC on: the engine's guided sampler);
* ``bimodal``: a generated bag in which panda_joint1 sweeps at 0.5 rad/s, the other joints
  held (the demo's camera renderings of that motion), and a policy whose chunks disagree:
  ``rtc_eval.BimodalPolicy`` (exact flow velocity for two paths, y = +/-0.3 sin^2(pi x), round
  a row of obstacles) on panda_joint1 (x, from the bag's state) and panda_joint2 (y about its
  demo centre), the other joints held; sampled by ``RTCDenoiser`` (off: an empty prefix,
  bit-identical to plain Euler). Consecutive chunks agree on x and pick a side (y) at random.

Per configuration: ``replace`` = RTC off + executor strategy ``replace`` (today); ``rtc`` = RTC on
+ strategy ``rtc``. Per seam (consecutive chunks P, N; robot units, max over joints): the switch
time is N's arrival (``replace``) or ``t0 + d dt`` (``rtc``); position jump ``|N(t) - P(t)|`` and
velocity jump ``|N'(t) - P'(t)|`` of the chunks' linear interpolations at the switch, and the
frozen-prefix error ``max_{i<d} |N[i] - P(t0 + i dt)|`` with d = ceil(latency / dt) (the actions
executed from P while N was computed). Cost: median wall time of ``policy.infer`` in the run.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import yaml

from pi0_ros.model import time_grid
from pi0_ros.model.rtc import RTCConfig, RTCDenoiser, RTCPrefix
from pi0_ros.tools import make_demo, replay
from pi0_ros.tools.rtc_eval import STEPS, BimodalPolicy

NS = 1_000_000_000


class BimodalReplayPolicy:
    """A ``pipeline.PolicyLike`` (with the RTC extras of ``pi0_ros.policy.Policy``) around the
    bimodal toy: normalized actions (H, 2) = (x, y); robot joint 1 = x, joint 2 = centre + y."""

    model_name = "bimodal"

    def __init__(self, slots, horizon: int, n_joints: int, rtc: RTCConfig | None):
        self.camera_slots = tuple(slots)
        self.toy = BimodalPolicy(horizon=horizon)
        self.noise_shape = (horizon, 2)
        self.n_joints = n_joints
        self.rtc = rtc if rtc is not None and rtc.enabled else None
        self.den = RTCDenoiser(self.toy, RTCConfig(enabled=True, max_guidance_weight=(
            rtc.max_guidance_weight if rtc is not None else 5.0)))
        dt, times = time_grid(STEPS)
        self.conds = SimpleNamespace(times=times, dt=dt, num_steps=STEPS)
        self.centre = float(make_demo._CENTER[1])

    def prepare_image(self, rgb, name="image"):
        return rgb

    def infer(self, obs, noise=None, prefix=None):
        h, a = self.noise_shape
        state = np.asarray(obs["state"], np.float64)
        x = torch.tensor([[state[0], 0.0]], dtype=torch.float32)
        eps = torch.zeros(1, h, a) if noise is None else torch.as_tensor(noise).reshape(1, h, a)
        buf = RTCPrefix.empty(1, h, a).load_([prefix])
        with torch.no_grad():
            out = self.den.integrate(SimpleNamespace(k=[], v=[]), x, eps.float(), self.conds,
                                     buf)[0].numpy()
        actions = np.tile(state.astype(np.float32), (h, 1))
        actions[:, 0] = out[:, 0]
        actions[:, 1] = self.centre + out[:, 1]
        res = {"actions": actions, "policy_timing": {}}
        if self.rtc is not None:
            res["actions_normalized"] = out.astype(np.float32)
        return res

    def status(self):
        return {"state": "ready", "connected": True}

    def close(self):
        pass


SWEEP_START, SWEEP_SPEED = -2.5, 0.5  # rad, rad/s of panda_joint1 in the bimodal bag


def bimodal_bag(out: Path, spec: make_demo.DemoSpec) -> Path:
    """The demo bag with panda_joint1 = SWEEP_START + SWEEP_SPEED t (the toy's own speed)."""
    if (out / "metadata.yaml").is_file():
        return out
    positions, velocities = make_demo.joint_positions, make_demo.joint_velocities

    def sweep_q(t):
        q = np.tile(positions(np.zeros(1)), (len(np.atleast_1d(t)), 1))  # the rest held
        q[:, 0] = SWEEP_START + SWEEP_SPEED * np.asarray(t, np.float64)
        return q

    def sweep_v(t):
        v = np.zeros((len(np.atleast_1d(t)), 8))
        v[:, 0] = SWEEP_SPEED
        return v

    make_demo.joint_positions, make_demo.joint_velocities = sweep_q, sweep_v
    try:
        return make_demo.make_bag(out, spec)
    finally:
        make_demo.joint_positions, make_demo.joint_velocities = positions, velocities


def _params(demo: dict, out: Path, rtc: bool, strategy: str) -> Path:
    doc = yaml.safe_load(Path(demo["params"]).read_text())
    doc[make_demo.POLICY_NODE]["ros__parameters"]["rtc"] = {"enabled": rtc}
    doc[make_demo.EXECUTOR_NODE]["ros__parameters"]["strategy"] = strategy
    path = out / f"params_{strategy}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _at(chunk, t: float, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """(position, velocity) of a chunk's linear interpolation at t (s after its stamp)."""
    acts = chunk.actions.astype(np.float64)
    k = min(max(t / dt, 0.0), acts.shape[0] - 1 - 1e-9)
    i = int(math.floor(k))
    j = min(i + 1, acts.shape[0] - 1)
    v = (acts[j] - acts[i]) / dt
    return acts[i] + (k - i) * (acts[j] - acts[i]), v


def seam_metrics(result: Any, dt: float, strategy: str, latency: float) -> list[dict]:
    out = []
    for prev, new in zip(result.chunks, result.chunks[1:]):
        t0 = new.stamp_ns / NS
        lat = (new.arrival_ns - new.stamp_ns) / NS
        d = new.rtc_delay if strategy == "rtc" else math.ceil(lat / dt - 1e-9)
        t_sw = t0 + d * dt if strategy == "rtc" else new.arrival_ns / NS
        shift = (new.stamp_ns - prev.stamp_ns) / NS
        p_pos, p_vel = _at(prev, t_sw - prev.stamp_ns / NS, dt)
        n_pos, n_vel = _at(new, t_sw - t0, dt)
        frozen = max((np.abs(new.actions[i] - _at(prev, shift + i * dt, dt)[0]).max()
                      for i in range(d)), default=0.0)
        out.append({"pos": float(np.abs(n_pos - p_pos).max()),
                    "vel": float(np.abs(n_vel - p_vel).max()), "frozen": float(frozen),
                    "d": int(d), "t": t_sw})
    return out


def run(demo: dict, out: Path, policy: str, latency: float, strategy: str) -> dict:
    rtc = strategy == "rtc"
    tag = out / f"{policy}_{strategy}_{int(round(latency * 1e3))}ms"
    tag.mkdir(parents=True, exist_ok=True)
    params = _params(demo, tag, rtc, strategy)
    factory = None
    if policy == "bimodal":
        def factory(config, slots):
            return BimodalReplayPolicy(slots, make_demo.DemoSpec().action_horizon,
                                       len(config.action_joint_names), config.rtc)
    bag = demo["bimodal_bag"] if policy == "bimodal" else demo["bag"]
    res = replay.run_offline(bag, params, tag, seed=1, latency=latency, plots=False,
                             policy_factory=factory).result
    dt = make_demo.DemoSpec().action_dt
    seams = seam_metrics(res, dt, strategy, latency)
    summary = {k: float(np.mean([s[k] for s in seams])) for k in ("pos", "vel", "frozen")}
    summary.update({f"{k}_max": float(np.max([s[k] for s in seams])) for k in ("pos", "vel")})
    summary.update(policy=policy, latency=latency, strategy=strategy, seams=len(seams),
                   d=sorted({s["d"] for s in seams}),
                   infer_ms=float(np.median(res.latencies) * 1e3),
                   mismatch=int(res.executor_events.get("rtc_delay_mismatch", 0)),
                   accepted=int(res.executor_events.get("chunks_accepted", 0)),
                   chunks=len(res.chunks))
    summary["trace"] = {"t": [(t - res.start_ns) / NS for t in res.command_times],
                        "q": np.asarray(res.commands)[:, :2].tolist(),
                        "seams": [(s["t"] * NS - res.start_ns) / NS for s in seams]}
    return summary


def cost(demo: dict, repeats: int = 20, warmup: int = 5) -> dict[bool, float]:
    """Median ms of ``Policy.infer`` (demo checkpoint, node factory) with RTC off / on (a
    prefix with d = 3)."""
    import time

    from pi0_ros.model.rtc import align_prefix
    from pi0_ros.pipeline import config_from_values, load_policy

    params = replay.node_parameters(demo["params"], make_demo.POLICY_NODE)
    out = {}
    for on in (False, True):
        cfg = config_from_values({**params, "rtc.enabled": on})
        pol = load_policy(cfg, tuple(c.slot for c in cfg.cameras))
        h, a = pol.noise_shape
        obs = {s: pol.prepare_image(np.zeros((224, 224, 3), np.uint8), s)
               for s in pol.camera_slots}
        obs.update(state=np.zeros(len(cfg.state_joint_names), np.float32), prompt=cfg.prompt)
        noise = np.random.default_rng(0).standard_normal((h, a), dtype=np.float32)
        prev = np.random.default_rng(1).standard_normal((h, a)).astype(np.float32)
        kw = {"prefix": align_prefix(prev, 0.0, cfg.action_dt, cfg.action_dt, 3, h, a)} \
            if on else {}
        times = []
        for _ in range(warmup + repeats):
            t0 = time.perf_counter()
            pol.infer(obs, noise=noise, **kw)
            times.append(time.perf_counter() - t0)
        out[on] = float(np.median(times[warmup:]) * 1e3)
        pol.close()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/pi0_ros_rtc_replay")
    p.add_argument("--latency", type=float, nargs="+", default=[0.1, 0.2])
    p.add_argument("--duration", type=float, default=10.0, help="demo bag length, s")
    p.add_argument("--policies", nargs="*", default=["demo", "bimodal"])
    p.add_argument("--plot", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cost", type=int, default=0,
                   help="also time Policy.infer with RTC off / on, this many repeats")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    spec = make_demo.DemoSpec(duration=args.duration)
    demo = make_demo.make_demo(out / "demo", spec)
    if "bimodal" in args.policies:
        demo["bimodal_bag"] = bimodal_bag(out / "bimodal_bag", spec)
    rows = []
    print("| policy | latency | strategy | d | pos jump (rad) | vel jump (rad/s) | "
          "frozen-prefix err (rad) | infer (ms) | mismatches |")
    print("|---|---|---|---|---|---|---|---|---|")
    for policy in args.policies:
        for latency in args.latency:
            for strategy in ("replace", "rtc"):
                s = run(demo, out, policy, latency, strategy)
                rows.append(s)
                print(f"| {policy} | {latency * 1e3:.0f} ms | {strategy} | "
                      f"{','.join(map(str, s['d']))} | {s['pos']:.4f} ({s['pos_max']:.3f}) | "
                      f"{s['vel']:.3f} ({s['vel_max']:.3f}) | {s['frozen']:.4f} | "
                      f"{s['infer_ms']:.1f} | {s['mismatch']} |", flush=True)
    if args.cost:
        c = cost(demo, args.cost)
        print(f"cost: Policy.infer, demo checkpoint, median of {args.cost}: RTC off "
              f"{c[False]:.1f} ms, on {c[True]:.1f} ms ({c[True] / c[False]:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{k: v for k, v in r.items() if k != "trace"} for r in rows], indent=1))
    if args.plot:
        _plot(rows, args.plot)


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = sorted({r["policy"] for r in rows})
    lat = max(r["latency"] for r in rows)
    fig, axes = plt.subplots(len(policies), 1, figsize=(10, 3.2 * len(policies)), squeeze=False)
    for ax, policy in zip(axes[:, 0], policies):
        joint = 1 if policy == "bimodal" else 0
        for r in rows:
            if r["policy"] != policy or r["latency"] != lat:
                continue
            tr = r["trace"]
            q = np.asarray(tr["q"])[:, joint]
            ax.plot(tr["t"], q, lw=1.0, label=f"{r['strategy']} (seam pos jump mean "
                                               f"{r['pos']:.3f} rad)")
        ax.set_title(f"{policy}: executed command, panda_joint{joint + 1}, latency "
                     f"{lat * 1e3:.0f} ms (pi0-ros-replay, bag time)")
        ax.set_xlabel("bag time (s)")
        ax.set_ylabel("rad")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
