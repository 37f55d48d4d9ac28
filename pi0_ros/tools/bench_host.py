"""Host camera path benchmark: N cameras + state + prompt -> model tensors, on one core.

What the policy node runs on the host per observation, pipelined as the node runs it: each camera
is decoded (JPEG input) and prepared for the model (``PreparedImage.from_uint8``: resize with pad,
uint8 -> [-1, 1] float32) when it arrives; when the set is complete, the state is normalized, the
pi0.5 prompt with the discretized state is tokenized (a new state every frame, so the token cache
misses) and the prepared frames are assembled (``Preprocessor`` + ``torch.from_numpy``, i.e.
``Policy.preprocess``).  Every resize method (``processing.RESIZE_METHODS``) and input kind runs
in the same process, interleaved frame by frame, so they see the same machine state; the ratio
Pillow / fast of the pipelined total is reported per input.

Timed parts (ms, p50 / p95 / p99), each on two clocks: ``wall`` (``perf_counter``: the latency,
including any time the core spent on other processes) and ``cpu`` (``thread_time``: the CPU this
thread used, which is the whole cost with one torch thread; on a shared, loaded machine it is the
figure that does not depend on the neighbours):

* ``per_camera``:  one arrival: [JPEG decode] + ``PreparedImage.from_uint8``
* ``per_set``:     state + prompt + assembly of the prepared frames -> torch tensors
* ``pipelined``:   all arrivals of a set + ``per_set``: the host CPU per observation (budget:
  p50 <= 3 ms, p99 <= 5 ms for 3 x 640x480 on one core)
* ``all_at_once``: [decode] + ``Preprocessor`` on the raw frames when the set completes (the
  same work without preparing on arrival)

    taskset -c 0 python -m pi0_ros.tools.bench_host                 # 3 x 640x480, raw + jpeg
    python -m pi0_ros.tools.bench_host --inputs raw --resize fast --json out.json
    pi0-ros-bench --preprocess ...                                  # same, via the dispatcher

The process pins itself to one CPU (the lowest it may use; ``--no-pin`` to keep its affinity) and
torch to one thread (``--torch-threads``), restoring both afterwards.  JPEG input (quality
``--jpeg-quality``) is decoded by the node's own ``pi0_ros.ros.conversions.compressed_to_rgb``
(OpenCV), so it needs the ROS message packages; raw input is the uint8 array an ``rgb8`` message
converts to (a view of the message data).
"""

from __future__ import annotations

import argparse
import array
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from ..processing import (
    MODEL_SLOTS,
    RESIZE_METHODS,
    CameraMapping,
    Normalizer,
    PreparedImage,
    Preprocessor,
    PromptTokenizer,
    set_torch_threads,
)
from ..stats import percentiles

logger = logging.getLogger(__name__)

_REPO_FIXTURE = Path(__file__).resolve().parents[2] / "test" / "fixtures" / "openpi_preprocess"
DEFAULT_PROMPT = "pick up the red block and put it in the bowl"
INPUTS = ("raw", "jpeg")
PARTS = ("per_camera", "per_set", "pipelined", "all_at_once")
CLOCKS = ("wall", "cpu")
DISTINCT_FRAMES = 8  # image sets cycled through (distinct pixels, distinct jpeg payloads)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pi0-ros-bench --preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", type=Path, default=_REPO_FIXTURE / "tokenizer.model",
                   help="SentencePiece tokenizer.model (default: the 512-piece test fixture)")
    p.add_argument("--norm-stats", type=Path, default=_REPO_FIXTURE / "norm_stats.json",
                   help="openpi norm_stats.json (default: the test fixture, state dim 8)")
    p.add_argument("--cameras", type=int, default=3, help="number of cameras (<= 3)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--image-size", type=int, default=224, help="model resolution S")
    p.add_argument("--max-token-len", type=int, default=200)
    p.add_argument("--inputs", nargs="+", choices=INPUTS, default=list(INPUTS),
                   help="camera input kinds: raw rgb8 arrays and/or JPEG CompressedImage")
    p.add_argument("--resize", nargs="+", choices=RESIZE_METHODS, default=list(RESIZE_METHODS),
                   help="resize methods to compare (interleaved in one run)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--no-state-prompt", action="store_true",
                   help="pi0 / pi0.5-nostate prompt format (tokenized once, then cached)")
    p.add_argument("--static-state", action="store_true",
                   help="same state every frame (token cache hits) instead of a new one")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--image-threads", type=int, default=1,
                   help="thread pool resizing the cameras in all_at_once (1 = inline)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads during the measurement (default 1)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the process to one CPU")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--seed", type=int, default=0)
    return p


def _camera_images(args, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """DISTINCT_FRAMES sets of camera frames: smooth scenes with texture and sensor noise, so
    that JPEG sizes and decode times are those of camera pictures, not of white noise."""
    h, w = args.height, args.width
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    sets = []
    for k in range(DISTINCT_FRAMES):
        frames = []
        for c in range(args.cameras):
            phase = 0.7 * k + 1.3 * c
            base = np.stack([
                120 + 80 * np.sin(x / (23 + 5 * c) + phase) * np.cos(y / 31),
                110 + 70 * np.cos((x + y) / 41 - phase),
                100 + 60 * np.sin(y / 17 + 0.5 * phase),
            ], axis=-1)
            base += rng.normal(0.0, 6.0, base.shape).astype(np.float32)
            frames.append(np.clip(base, 0, 255).astype(np.uint8))
        sets.append(frames)
    return sets


def _jpeg_messages(sets: list[list[np.ndarray]], quality: int) -> list[list]:
    import cv2
    from sensor_msgs.msg import CompressedImage

    out = []
    for frames in sets:
        msgs = []
        for rgb in frames:
            ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]),
                                   [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise SystemExit("OpenCV could not encode the benchmark frames as JPEG")
            msg = CompressedImage(format="jpeg")
            msg.data = array.array("B", buf.tobytes())
            msgs.append(msg)
        out.append(msgs)
    return out


def run(args: argparse.Namespace) -> dict:
    """Pins to one CPU and ``--torch-threads`` torch threads, restoring both afterwards."""
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    previous_threads = set_torch_threads(args.torch_threads)
    try:
        if not args.no_pin and affinity:
            os.sched_setaffinity(0, {min(affinity)})
        return _measure(args)
    finally:
        set_torch_threads(previous_threads)
        if affinity:
            os.sched_setaffinity(0, affinity)


def _measure(args: argparse.Namespace) -> dict:
    import torch

    if not 1 <= args.cameras <= len(MODEL_SLOTS):
        raise SystemExit(f"--cameras must be 1..{len(MODEL_SLOTS)}, got {args.cameras}")
    for path in (args.tokenizer, args.norm_stats):
        if not path.is_file():
            raise SystemExit(f"not found: {path} (pass --tokenizer / --norm-stats)")

    normalizer = Normalizer.from_json(args.norm_stats, use_quantiles=True)
    dim = normalizer.dim("state")
    keys = [f"cam{i}" for i in range(args.cameras)]
    cameras = CameraMapping(slots=MODEL_SLOTS, sources=dict(zip(keys, MODEL_SLOTS)))
    size = args.image_size
    methods = list(dict.fromkeys(args.resize))
    inputs = list(dict.fromkeys(args.inputs))

    def preprocessor(method: str, image_threads: int = 1) -> Preprocessor:
        # Its own tokenizer each, so that every configuration misses the token cache alike.
        tokenizer = PromptTokenizer(args.tokenizer, args.max_token_len,
                                    discrete_state=not args.no_state_prompt)
        return Preprocessor(
            normalizer=normalizer, tokenizer=tokenizer, cameras=cameras, image_size=size,
            model_action_dim=32, state_dim=dim, state_key="state", prompt_key="prompt",
            image_threads=image_threads, resize=method)

    pre = {method: preprocessor(method) for method in methods}
    pre_all = {method: preprocessor(method, args.image_threads) for method in methods}

    rng = np.random.default_rng(args.seed)
    raw_sets = _camera_images(args, rng)
    decode = None
    sources: dict[str, list[list]] = {"raw": raw_sets}
    if "jpeg" in inputs:
        from ..ros.conversions import compressed_to_rgb

        decode = compressed_to_rgb
        sources["jpeg"] = _jpeg_messages(raw_sets, args.jpeg_quality)
    n = args.iters + args.warmup
    states = rng.uniform(-1.0, 1.0, (n, dim)).astype(np.float32)
    if args.static_state:
        states[:] = states[0]

    def to_rgb(kind: str, item):
        return decode(item) if kind == "jpeg" else item

    def now() -> np.ndarray:
        return np.array((time.perf_counter(), time.thread_time()))  # (wall, cpu) seconds

    # samples[(kind, method)][part]: (wall, cpu) durations
    samples = {(kind, m): {part: [] for part in PARTS} for kind in inputs for m in methods}
    for i in range(n):
        # Interleaved: every configuration runs on the same frame, one after the other.
        for kind in inputs:
            items = sources[kind][i % DISTINCT_FRAMES]
            for method in methods:
                s = samples[(kind, method)]
                obs = {"state": states[i], "prompt": args.prompt}
                t_start = now()
                for key, item in zip(keys, items):
                    t0 = now()
                    obs[key] = PreparedImage.from_uint8(to_rgb(kind, item), size, key,
                                                        resize=method)
                    if i >= args.warmup:
                        s["per_camera"].append(now() - t0)
                t0 = now()
                out = {k: torch.from_numpy(v) for k, v in pre[method](obs).items()}
                t1 = now()
                raw_obs = {"state": states[i], "prompt": args.prompt}
                raw_obs.update((key, to_rgb(kind, item)) for key, item in zip(keys, items))
                out = {k: torch.from_numpy(v) for k, v in pre_all[method](raw_obs).items()}
                t2 = now()
                if i >= args.warmup:
                    s["per_set"].append(t1 - t0)
                    s["pipelined"].append(t1 - t_start)
                    s["all_at_once"].append(t2 - t1)
                del out
    for p in (*pre.values(), *pre_all.values()):
        p.close()

    results = {
        f"{kind}/{m}": {clock: {part: percentiles([d[c] for d in v], scale=1e3)
                                for part, v in s.items()}
                        for c, clock in enumerate(CLOCKS)}
        for (kind, m), s in samples.items()
    }
    ratios = {}
    if "pillow" in methods and "fast" in methods:
        for kind in inputs:
            slow, fast = results[f"{kind}/pillow"], results[f"{kind}/fast"]
            ratios[kind] = {f"{part}_{clock}": slow[clock][part]["p50"] / fast[clock][part]["p50"]
                            for clock in CLOCKS for part in ("per_camera", "pipelined")}
    return {
        "results": results,
        "ratio_pillow_over_fast_p50": ratios,
        "config": {
            "cameras": args.cameras, "input": f"{args.height}x{args.width}",
            "image_size": size, "state_dim": dim, "inputs": inputs, "resize": methods,
            "jpeg_quality": args.jpeg_quality,
            "prompt": "text only" if args.no_state_prompt else "pi0.5 with discretized state",
            "state": "static" if args.static_state else "new every frame",
            "tokenizer": str(args.tokenizer),
            "tokenizer_pieces": pre[methods[0]].tokenizer.vocab_size,
            "iters": args.iters, "warmup": args.warmup, "image_threads": args.image_threads,
            "torch_threads": torch.get_num_threads(),
            "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "machine": cpu_name(), "cpu_capability": _cpu_capability(torch),
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "pillow": _version("PIL"), "opencv": _version("cv2"),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
    }


def cpu_name() -> str:
    """The CPU model name (/proc/cpuinfo), for benchmark records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_capability(torch) -> str | None:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    cfg = result["config"]
    print(f"host camera path: {cfg['cameras']} x {cfg['input']} -> {cfg['image_size']}, "
          f"state {cfg['state_dim']}, {cfg['prompt']} ({cfg['state']}), tokenizer "
          f"{cfg['tokenizer_pieces']} pieces; cpus {cfg['cpus']}, torch threads "
          f"{cfg['torch_threads']}; {cfg['machine']} ({cfg['cpu_capability']}), load "
          f"{cfg['load_avg_1min']:.2f}, {cfg['date']}")
    head = "".join(f"{c + ' ' + q:>11}" for c in CLOCKS for q in ("p50", "p99"))
    print(f"{'input/resize':<14}{'part':<13}{head}   (ms)")
    for name, clocks in result["results"].items():
        for part in PARTS:
            row = "".join(f"{clocks[c][part][q]:>11.3f}" for c in CLOCKS for q in ("p50", "p99"))
            print(f"{name:<14}{part:<13}{row}")
    for kind, ratio in result["ratio_pillow_over_fast_p50"].items():
        print(f"{kind}: pillow / fast p50, pipelined: {ratio['pipelined_wall']:.2f}x wall, "
              f"{ratio['pipelined_cpu']:.2f}x cpu; per camera: {ratio['per_camera_wall']:.2f}x "
              f"wall, {ratio['per_camera_cpu']:.2f}x cpu")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
