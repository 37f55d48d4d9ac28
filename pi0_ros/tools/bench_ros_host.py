"""Host cost of one ROS observation: message conversion + Policy.preprocess, on one core.

What the policy node does per synchronized set before the model runs: ``sensor_msgs/Image`` x N
and a ``JointState`` -> numpy (``pi0_ros.ros.conversions``), then ``Policy.preprocess`` (resize
with pad to the model resolution, uint8 -> [-1, 1] float32, state normalization, pi0.5 prompt
tokenization) -> model host tensors. The model itself is not loaded: ``Policy`` is built on the
full-size pi0.5 configuration (3 cameras, 224 px) through its ``_load_model`` seam, so only the
host path is timed.

    python -m pi0_ros.tools.bench_ros_host                # 3 x 640x480 rgb8, 200 iterations
    python -m pi0_ros.tools.bench_ros_host --encoding bgr8 --json out.json --budget-ms 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import numpy as np

FIXTURES = Path(__file__).resolve().parents[2] / "test" / "fixtures" / "openpi_preprocess"
PROMPT = "pick up the red block and put it in the bowl"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cameras", type=int, default=3, choices=(1, 2, 3))
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--encoding", default="rgb8")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--cpu", type=int, default=0, help="core to pin to (-1: no pinning)")
    p.add_argument(
        "--assets",
        type=Path,
        default=FIXTURES,
        help="folder with tokenizer.model and norm_stats.json (default: the test fixtures)",
    )
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--budget-ms", type=float, help="exit 1 if the total p50 exceeds this")
    return p.parse_args(argv)


def _pin(cpu: int) -> None:
    if cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    import torch

    torch.set_num_threads(1)


def _policy(assets: Path, workdir: Path, cameras: int):
    """A Policy on the full-size pi0.5 configuration whose model is never loaded."""
    from pi0_ros import policy as policy_mod
    from pi0_ros.model.config import Pi0Config

    ckpt = workdir / "ckpt"
    (ckpt / "assets" / "bench").mkdir(parents=True)
    shutil.copy(assets / "tokenizer.model", ckpt)
    shutil.copy(assets / "norm_stats.json", ckpt / "assets" / "bench")
    config = Pi0Config(pi05=True)  # 3 cameras, 224 px, max_token_len 200

    def no_model(*_args, **_kwargs):
        return None, config

    slots = config.cameras[:cameras]
    with mock.patch.object(policy_mod, "_load_model", no_model):
        return policy_mod.Policy(ckpt, cameras={s: s for s in slots}, input_keys="slots"), slots


def _messages(args: argparse.Namespace, state_dim: int):
    from pi0_ros.ros import conversions as conv

    rng = np.random.default_rng(0)
    images = [
        conv.rgb_to_image(
            rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8),
            args.encoding,
            stamp_ns=1,
        )
        for _ in range(args.cameras)
    ]
    names = [f"joint{i}" for i in range(state_dim)]
    # A new state every frame (as on a moving robot): the pi0.5 prompt is re-tokenized each time.
    states = rng.uniform(-1.0, 1.0, (64, state_dim + 1))
    joints = [
        conv.vector_to_joint_state(["extra"] + names[::-1], state, stamp_ns=1) for state in states
    ]
    return images, joints, names


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))


def _timed(fn, n: int, warmup: int) -> tuple[list[float], object]:
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def _summary(times: list[float]) -> dict[str, float]:
    return {
        "p50": _pct(times, 50),
        "p90": _pct(times, 90),
        "max": _pct(times, 100),
        "mean": statistics.fmean(times) * 1e3,
    }


def run(args: argparse.Namespace) -> dict:
    """Times the node's two host steps (and the unprepared path for comparison)."""
    from pi0_ros.processing import PreparedImage
    from pi0_ros.ros import conversions as conv

    _pin(args.cpu)
    n, warm = args.iterations, args.warmup
    with tempfile.TemporaryDirectory() as tmp:
        policy, slots = _policy(args.assets, Path(tmp), args.cameras)
        size = policy.settings.image_size
        images, joints, names = _messages(args, policy.settings.state_dim or 8)

        # 1. per camera message, in its subscription callback: convert + prepare for the model
        def arrival():
            return PreparedImage.from_uint8(conv.image_to_rgb(images[0]), size)

        arrival_t, _ = _timed(arrival, n, warm)
        prepared = {slot: arrival() for slot in slots}

        # 2. per synchronized set: JointState + the prepared frames -> model tensors
        frame = itertools.count()

        def on_set():
            obs = dict(prepared)
            obs["state"] = conv.joint_state_to_vector(joints[next(frame) % len(joints)], names)
            obs["prompt"] = PROMPT
            return policy.preprocess(obs)

        set_t, tensors = _timed(on_set, n, warm)

        # 3. the same without preparing on arrival: everything when the set completes
        def unprepared():
            obs = {slot: conv.image_to_rgb(msg) for slot, msg in zip(slots, images)}
            obs["state"] = conv.joint_state_to_vector(joints[next(frame) % len(joints)], names)
            obs["prompt"] = PROMPT
            return policy.preprocess(obs)

        unprepared_t, _ = _timed(unprepared, n, warm)
    total = [args.cameras * a + s for a, s in zip(arrival_t, set_t)]
    return {
        "what": f"{args.cameras} x {args.width}x{args.height} {args.encoding} + JointState "
        f"-> model tensors ({size} px, pi0.5 prompt with state)",
        "iterations": n,
        "arrival_per_camera_ms": _summary(arrival_t),
        "set_ms": _summary(set_t),
        "total_cpu_ms": _summary(total),
        "unprepared_ms": _summary(unprepared_t),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "machine": {
            "cpu": _cpu_name(),
            "pinned_core": args.cpu,
            "cores": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0],
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pillow": _pillow_version(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _pillow_version() -> str:
    import PIL

    return PIL.__version__


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    result = run(args)
    print(result["what"])
    rows = (
        ("arrival_per_camera_ms", "per camera message (callback): convert + prepare"),
        ("set_ms", "per set (sync callback -> worker): state + assemble + tokenize"),
        ("total_cpu_ms", f"total CPU per set ({args.cameras} arrivals + set)"),
        ("unprepared_ms", "for comparison: all of it when the set completes"),
    )
    for key, label in rows:
        r = result[key]
        print(f"  {label:66s} p50 {r['p50']:7.3f} ms  p90 {r['p90']:7.3f} ms")
    print(f"  tensors {result['tensors']}")
    m = result["machine"]
    print(
        f"  {m['cpu']}, core {m['pinned_core']}, load {m['load_avg_1min']:.2f}, {result['date']}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    total = result["total_cpu_ms"]["p50"]
    if args.budget_ms is not None and total > args.budget_ms:
        print(f"FAIL: total p50 {total:.3f} ms > budget {args.budget_ms} ms", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
