"""Host cost of one ROS observation: message conversion + preprocessing, on one core.

What the policy node does per synchronized set before the model runs: ``sensor_msgs/Image`` (or
``CompressedImage`` jpeg / png) x N and a ``JointState`` -> numpy (``pi0_ros.ros.conversions``),
then ``Policy.preprocess``'s work (``processing.Preprocessor``: resize with pad to the model
resolution, uint8 -> [-1, 1] float32, state normalization, pi0.5 prompt tokenization, then
``torch.from_numpy``) -> model host tensors, on the full-size pi0.5 configuration (3 cameras,
224 px, 200 tokens). No model is built: only the host path is timed.

    python -m pi0_ros.tools.bench_ros_host                # 3 x 640x480 rgb8, fast resize
    python -m pi0_ros.tools.bench_ros_host --encoding jpeg --resize pillow --json out.json
    python -m pi0_ros.tools.bench_ros_host --encoding bgr8 --budget-ms 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pi0_ros.tools.bench_host import cpu_name

import numpy as np

from ..processing import DEFAULT_RESIZE, RESIZE_METHODS
from ..stats import percentiles

FIXTURES = Path(__file__).resolve().parents[2] / "test" / "fixtures" / "openpi_preprocess"
PROMPT = "pick up the red block and put it in the bowl"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cameras", type=int, default=3, choices=(1, 2, 3))
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--encoding", default="rgb8",
                   help="Image encoding (rgb8, bgr8, ...) or 'jpeg' / 'png' (CompressedImage)")
    p.add_argument("--resize", choices=RESIZE_METHODS, default=DEFAULT_RESIZE)
    p.add_argument("--jpeg-quality", type=int, default=90)
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




def _preprocessor(assets: Path, cameras: int, resize: str):
    """``Policy.preprocess``'s Preprocessor on the full-size pi0.5 configuration (no model)."""
    from pi0_ros.model.config import Pi0Config
    from pi0_ros.processing import CameraMapping, Normalizer, Preprocessor, PromptTokenizer

    config = Pi0Config(pi05=True)  # 3 cameras, 224 px, max_token_len 200
    slots = config.cameras[:cameras]
    normalizer = Normalizer.from_json(assets / "norm_stats.json", use_quantiles=True)
    tokenizer = PromptTokenizer(assets / "tokenizer.model", config.max_token_len,
                                discrete_state=True)
    pre = Preprocessor(
        normalizer=normalizer, tokenizer=tokenizer,
        cameras=CameraMapping(slots=config.cameras, sources={s: s for s in slots}),
        image_size=config.vision.image_size, model_action_dim=config.action_dim,
        state_dim=normalizer.dim("state"), state_key="state", prompt_key="prompt",
        resize=resize)
    return pre, slots


def _camera_frame(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth scene with sensor noise (jpeg sizes of a camera picture, not of white noise)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([120 + 80 * np.sin(x / 23) * np.cos(y / 31), 110 + 70 * np.cos((x + y) / 41),
                     100 + 60 * np.sin(y / 17)], axis=-1)
    base += rng.normal(0.0, 6.0, base.shape).astype(np.float32)
    return np.clip(base, 0, 255).astype(np.uint8)


def _messages(args: argparse.Namespace, state_dim: int):
    from pi0_ros.ros import conversions as conv

    rng = np.random.default_rng(0)
    frames = [_camera_frame(rng, args.height, args.width) for _ in range(args.cameras)]
    if args.encoding in ("jpeg", "png"):
        images = [conv.rgb_to_compressed(f, args.encoding, stamp_ns=1, quality=args.jpeg_quality)
                  for f in frames]
    else:
        images = [conv.rgb_to_image(f, args.encoding, stamp_ns=1) for f in frames]
    names = [f"joint{i}" for i in range(state_dim)]
    # A new state every frame (as on a moving robot): the pi0.5 prompt is re-tokenized each time.
    states = rng.uniform(-1.0, 1.0, (64, state_dim + 1))
    joints = [
        conv.vector_to_joint_state(["extra"] + names[::-1], state, stamp_ns=1) for state in states
    ]
    return images, joints, names


def _timed(fn, n: int, warmup: int) -> tuple[list[float], object]:
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def run(args: argparse.Namespace) -> dict:
    """Times the node's two host steps (and the unprepared path for comparison), pinned to
    ``args.cpu`` with one torch thread; both are restored afterwards."""
    from pi0_ros.processing import set_torch_threads

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads = set_torch_threads(1)
    try:
        if args.cpu >= 0 and affinity is not None:
            os.sched_setaffinity(0, {args.cpu})
        return _measure(args)
    finally:
        set_torch_threads(threads)
        if affinity is not None:
            os.sched_setaffinity(0, affinity)


def _measure(args: argparse.Namespace) -> dict:
    import torch

    from pi0_ros.processing import PreparedImage
    from pi0_ros.ros import conversions as conv

    n, warm = args.iterations, args.warmup
    pre, slots = _preprocessor(args.assets, args.cameras, args.resize)
    size = pre.image_size

    def preprocess(obs):  # = Policy.preprocess
        return {k: torch.from_numpy(v) for k, v in pre(obs).items()}

    images, joints, names = _messages(args, pre.state_dim or 8)

    # 1. per camera message, in its subscription callback: convert + prepare for the model
    def arrival():
        return PreparedImage.from_uint8(conv.to_rgb(images[0]), size, resize=args.resize)

    arrival_t, _ = _timed(arrival, n, warm)
    prepared = {slot: arrival() for slot in slots}

    # 2. per synchronized set: JointState + the prepared frames -> model tensors
    frame = itertools.count()

    def on_set():
        obs = dict(prepared)
        obs["state"] = conv.joint_state_to_vector(joints[next(frame) % len(joints)], names)
        obs["prompt"] = PROMPT
        return preprocess(obs)

    set_t, tensors = _timed(on_set, n, warm)

    # 3. the same without preparing on arrival: everything when the set completes
    def unprepared():
        obs = {slot: conv.to_rgb(msg) for slot, msg in zip(slots, images)}
        obs["state"] = conv.joint_state_to_vector(joints[next(frame) % len(joints)], names)
        obs["prompt"] = PROMPT
        return preprocess(obs)

    unprepared_t, _ = _timed(unprepared, n, warm)
    pre.close()
    total = [args.cameras * a + s for a, s in zip(arrival_t, set_t)]
    return {
        "what": f"{args.cameras} x {args.width}x{args.height} {args.encoding} + JointState "
        f"-> model tensors ({size} px, pi0.5 prompt with state, resize={args.resize})",
        "resize": args.resize,
        "iterations": n,
        "arrival_per_camera_ms": percentiles(arrival_t, scale=1e3),
        "set_ms": percentiles(set_t, scale=1e3),
        "total_cpu_ms": percentiles(total, scale=1e3),
        "unprepared_ms": percentiles(unprepared_t, scale=1e3),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "machine": {
            "cpu": cpu_name(),
            "pinned_core": args.cpu,
            "cores": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0],
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pillow": _pillow_version(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


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
