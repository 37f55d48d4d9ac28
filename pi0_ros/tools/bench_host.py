"""Host preprocessing benchmark: raw cameras + state + prompt -> model tensors, on one core.

Measures ``Preprocessor`` (what ``Policy.preprocess`` runs) on N cameras of H x W uint8 RGB, a
state vector and a pi0.5 prompt with the discretized state (re-tokenized every frame: the state
changes each frame so the token cache misses), plus the torch conversion.  Reports p50 / p95 /
p99 milliseconds of the whole step (``total``), of its parts (``cameras``: resize + convert of all
cameras; ``normalize+tokenize``), and ``prepared_cameras``: the whole step when every camera was
already prepared on arrival (``PreparedImage``), i.e. what stays on the critical path then.

    python -m pi0_ros.tools.bench_host                       # fixture tokenizer + norm stats
    python -m pi0_ros.tools.bench_host --tokenizer /path/to/paligemma_tokenizer.model
    pi0-ros-bench --preprocess ...                           # same options through the dispatcher

By default the process is pinned to one CPU and torch / the image pool use one thread.
"""

from __future__ import annotations

import argparse
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
    CameraMapping,
    Normalizer,
    PreparedImage,
    Preprocessor,
    PromptTokenizer,
    prepare_image,
)

logger = logging.getLogger(__name__)

_REPO_FIXTURE = Path(__file__).resolve().parents[2] / "test" / "fixtures" / "openpi_preprocess"
DEFAULT_PROMPT = "pick up the red block and put it in the bowl"


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
    p.add_argument("--no-state-prompt", action="store_true",
                   help="pi0 / pi0.5-nostate prompt format (tokenized once, then cached)")
    p.add_argument("--static-state", action="store_true",
                   help="same state every frame (token cache hits) instead of a new one")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--image-threads", type=int, default=1,
                   help="thread pool for the camera resizes (1 = inline)")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin the process to one CPU")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--seed", type=int, default=0)
    return p


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean())}


def _frames(args, dim: int, rng: np.random.Generator) -> list[dict]:
    """A pool of observations (16 distinct image sets; a fresh state per frame)."""
    keys = [f"cam{i}" for i in range(args.cameras)]
    image_sets = [
        {k: rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8) for k in keys}
        for _ in range(16)
    ]
    n = args.iters + args.warmup
    states = rng.uniform(-1.0, 1.0, (n, dim)).astype(np.float32)
    if args.static_state:
        states[:] = states[0]
    return [{**image_sets[i % 16], "state": states[i], "prompt": args.prompt} for i in range(n)]


def run(args: argparse.Namespace) -> dict:
    """Pins to one CPU and one torch thread for the measurement, restoring both afterwards."""
    import torch

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads = torch.get_num_threads()
    try:
        if not args.no_pin and affinity:
            os.sched_setaffinity(0, {min(affinity)})
        torch.set_num_threads(1)
        return _measure(args, torch)
    finally:
        torch.set_num_threads(threads)
        if affinity:
            os.sched_setaffinity(0, affinity)


def _measure(args: argparse.Namespace, torch) -> dict:
    if not 1 <= args.cameras <= len(MODEL_SLOTS):
        raise SystemExit(f"--cameras must be 1..{len(MODEL_SLOTS)}, got {args.cameras}")
    for path in (args.tokenizer, args.norm_stats):
        if not path.is_file():
            raise SystemExit(f"not found: {path} (pass --tokenizer / --norm-stats)")

    normalizer = Normalizer.from_json(args.norm_stats, use_quantiles=True)
    dim = normalizer.dim("state")
    tokenizer = PromptTokenizer(args.tokenizer, args.max_token_len,
                                discrete_state=not args.no_state_prompt)
    cameras = CameraMapping(slots=MODEL_SLOTS,
                            sources={f"cam{i}": MODEL_SLOTS[i] for i in range(args.cameras)})
    pre = Preprocessor(normalizer=normalizer, tokenizer=tokenizer, cameras=cameras,
                       image_size=args.image_size, model_action_dim=32, state_dim=dim,
                       state_key="state", prompt_key="prompt", image_threads=args.image_threads)
    frames = _frames(args, dim, np.random.default_rng(args.seed))

    # Parts are timed on the same frames with a second tokenizer, so that its cache sees the
    # same sequence of texts (same hits / misses) as the one inside the preprocessor.
    tokenizer_parts = PromptTokenizer(args.tokenizer, args.max_token_len,
                                      discrete_state=tokenizer.discrete_state)
    total, images, text, critical = [], [], [], []
    cam_keys = list(cameras.sources)
    for i, obs in enumerate(frames):
        t0 = time.perf_counter()
        out = {k: torch.from_numpy(v) for k, v in pre(obs).items()}  # Policy.preprocess
        t1 = time.perf_counter()
        cameras.assemble(obs, args.image_size, executor=pre._pool)
        t2 = time.perf_counter()
        state = normalizer.normalize(obs["state"], "state")
        tokenizer_parts.encode(obs["prompt"], state if tokenizer.discrete_state else None)
        t3 = time.perf_counter()
        # Cameras prepared as they arrive (untimed here, off the critical path): what is left.
        prepared = {**obs, **{k: PreparedImage(prepare_image(obs[k], args.image_size))
                              for k in cam_keys}}
        t4 = time.perf_counter()
        out = {k: torch.from_numpy(v) for k, v in pre(prepared).items()}
        t5 = time.perf_counter()
        if i >= args.warmup:
            total.append(t1 - t0)
            images.append(t2 - t1)
            text.append(t3 - t2)
            critical.append(t5 - t4)
        del out
    pre.close()
    return {
        "total": _percentiles(total),
        "cameras": _percentiles(images),
        "normalize+tokenize": _percentiles(text),
        "prepared_cameras": _percentiles(critical),
        "config": {
            "cameras": args.cameras, "input": f"{args.height}x{args.width}",
            "image_size": args.image_size, "state_dim": dim,
            "prompt": "text only" if args.no_state_prompt else "pi0.5 with discretized state",
            "state": "static" if args.static_state else "new every frame",
            "tokenizer": str(args.tokenizer), "tokenizer_pieces": tokenizer.vocab_size,
            "iters": args.iters, "warmup": args.warmup, "image_threads": args.image_threads,
            "torch_threads": torch.get_num_threads(),
            "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    cfg = result["config"]
    print(f"host preprocessing: {cfg['cameras']} x {cfg['input']} -> {cfg['image_size']}, "
          f"state {cfg['state_dim']}, {cfg['prompt']} ({cfg['state']}), "
          f"tokenizer {cfg['tokenizer_pieces']} pieces; cpus {cfg['cpus']}, "
          f"torch threads {cfg['torch_threads']}, image threads {cfg['image_threads']}")
    print(f"{'part':<22}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
    for part in ("total", "cameras", "normalize+tokenize", "prepared_cameras"):
        r = result[part]
        print(f"{part:<22}{r['p50']:>9.3f}{r['p95']:>9.3f}{r['p99']:>9.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
