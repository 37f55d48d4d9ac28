"""pi0-ros-demo: the whole pipeline on a tiny random-weight model, offline, in about a minute.

    pi0-ros-demo [--out out/demo] [--duration 10] [--seed 0]
    python3 -m pi0_ros.tools.bootstrap demo          # README command 1 (runs this)

1. makes (once; kept for later runs) a tiny random-weight pi0.5 checkpoint, a synthetic bag of a
   7-joint arm + gripper with two moving-pattern cameras and the parameter file
   (``pi0_ros.tools.make_demo``);
2. replays the bag through the policy node's synchronizer, conversions and policy and through the
   executor, on bag time (``pi0_ros.tools.replay``), printing progress;
3. prints where the output bag, the report and the per-joint plots are.

The weights are random: the actions are noise around the middle of the joint ranges, not a task.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from pi0_ros.stats import percentiles
from pi0_ros.tools import make_demo, replay
from pi0_ros.tools.replay_report import (
    RANDOM_WEIGHTS,
    executor_summary,
    quiet_repeated_rejections,
)

DEFAULT_OUT = Path("out") / "demo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pi0-ros-demo",
        description="Make a tiny random-weight pi0.5 checkpoint and a synthetic bag (once), then "
        "replay the bag through the policy and the executor with report and plots.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="working directory (default %(default)s)")
    parser.add_argument("--duration", type=float, default=make_demo.DemoSpec.duration,
                        help="synthetic bag length in seconds (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="weight and noise seed (default 0)")
    parser.add_argument("--storage", choices=("sqlite3", "mcap"), default="sqlite3",
                        help="bag storage (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="regenerate checkpoint and bag")
    parser.add_argument("--no-plots", action="store_true", help="skip the plots")
    parser.add_argument("--verbose", action="store_true", help="log the libraries' INFO lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    quiet_repeated_rejections()  # one line per executor rejection reason; counted at the end
    t0 = time.perf_counter()
    try:
        spec = make_demo.DemoSpec(seed=args.seed, duration=args.duration)
        print(f"[1/2] demo material in {args.out} (checkpoint, bag, parameters)", flush=True)
        paths = make_demo.make_demo(args.out, spec, storage=args.storage, force=args.force)
        print(f"      checkpoint {paths['checkpoint']}\n      bag        {paths['bag']} "
              f"({spec.duration:g} s, 2 cameras @ {spec.camera_rate:g} Hz, joint states @ "
              f"{spec.joint_rate:g} Hz)", flush=True)
        print("[2/2] replaying through synchronizer -> policy -> executor (bag time)", flush=True)
        out = replay.run_offline(
            paths["bag"], paths["params"], args.out / "replay", seed=args.seed,
            plots=not args.no_plots, progress=replay._progress_printer(spec.duration),
            units=make_demo.JOINT_UNITS,
        )
    except (replay.ReplayError, ValueError, OSError) as exc:
        print(f"pi0-ros-demo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    res = out.result
    lat = percentiles(res.latencies, scale=1e3)
    bag_s = (res.end_ns - res.start_ns) / replay.NS_PER_S
    print(f"done in {time.perf_counter() - t0:.1f} s: {len(res.chunks)} chunks over {bag_s:.1f} s"
          f" of bag ({len(res.chunks) / max(bag_s, 1e-9):.1f} Hz), inference latency p50 "
          f"{lat.get('p50', 0):.1f} ms / p99 {lat.get('p99', 0):.1f} ms, "
          f"{len(res.commands)} executor commands")
    summary = executor_summary(res, spec.action_dt)
    if summary:
        print(summary)
    print(f"note:       {RANDOM_WEIGHTS}")
    print(f"output bag: {out.bag}")
    print(f"report:     {out.report}")
    if out.plots:
        print(f"plots:      {out.plots[0].parent}/ ({len(out.plots)} PNG, one per joint)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
