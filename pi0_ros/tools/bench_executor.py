"""Jitter benchmark of pi0_executor_node's control loop (the real one, in rclpy, publishing).

``pi0-ros-bench --executor --rate 500 --duration 30 --json OUT.json``. A load thread runs torch
matmuls in a loop to keep a core busy the way inference does; torch releases the GIL inside its
ops, so the load competes for CPU and, between ops, for the GIL, like a policy worker thread.
The main thread feeds the executor a fresh chunk every ``CHUNK_PERIOD`` s (what the ActionChunk
callback does), so every tick samples, stitches, limits and publishes.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np

MATMUL_SIZE = 512  # square fp32 matmul per load iteration
JOINTS = 7
CHUNK_PERIOD = 0.2  # s between chunks (a 5 Hz policy)
HORIZON, CHUNK_DT = 50, 0.02  # actions per chunk, s between them
LATENCY = 0.05  # s: each chunk answers an observation this old


def _chunk(t0: float) -> np.ndarray:
    """(HORIZON, JOINTS) slow sines, continuous across chunks (a plausible arm motion)."""
    t = t0 + CHUNK_DT * np.arange(HORIZON)[:, None]
    return 0.3 * np.sin(0.8 * t + np.arange(JOINTS)[None, :])


def _load(stop: threading.Event) -> None:
    import torch

    torch.set_num_threads(1)
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    while not stop.is_set():
        a = torch.tanh(a @ a)


def run(rate: float, duration: float, load: bool = True) -> dict:
    import rclpy
    from rclpy.parameter import Parameter

    from pi0_ros.control import chunk_from_arrays
    from pi0_ros.ros.executor_node import ExecutorNode, SUCCESS

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    stop = threading.Event()
    loader = threading.Thread(target=_load, args=(stop,), daemon=True)
    node = ExecutorNode(context=ctx, parameter_overrides=[
        Parameter("joint_names", value=[f"j{i}" for i in range(JOINTS)]),
        Parameter("control_rate", value=float(rate))])
    try:
        if node.trigger_configure() != SUCCESS:
            raise RuntimeError("configure failed")
        if load:
            import torch  # noqa: F401  (imported here: an import holds the GIL for ~0.2 s)

            loader.start()
            time.sleep(0.5)  # load running before the loop starts
        node.trigger_activate()
        core = node.executor_core  # made by activate, which waits for a joint state
        core.set_state(_chunk(time.monotonic())[0], time.monotonic())
        names = tuple(f"j{i}" for i in range(JOINTS))
        end = time.monotonic() + duration
        while (now := time.monotonic()) < end:
            t0 = now - LATENCY
            core.submit(chunk_from_arrays(t0, CHUNK_DT, names, _chunk(t0)), now)
            time.sleep(min(CHUNK_PERIOD, max(end - time.monotonic(), 0.0)))
        node.stop_control_thread()
        errs = np.asarray(node.period_errors) * 1e3
        result = {"rate": rate, "duration": duration, "ticks": node.ticks,
                  "missed_ticks": node.missed_ticks,
                  "period_error_p50_ms": float(np.percentile(errs, 50)),
                  "period_error_p99_ms": float(np.percentile(errs, 99)),
                  "period_error_max_ms": float(errs.max()),
                  "commands": node.ticks_published, "seams": core.stats["seams"],
                  "loop": "dedicated thread, absolute deadlines, sleep + spin-wait tail",
                  "load": (f"1 thread of torch {MATMUL_SIZE}x{MATMUL_SIZE} fp32 matmul+tanh "
                           "(torch releases the GIL in ops)") if load else "none"}
    finally:
        stop.set()
        node.stop_control_thread()
        if loader.is_alive():
            loader.join()
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pi0-ros-bench --executor", description=__doc__)
    parser.add_argument("--executor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=500.0, help="Hz")
    parser.add_argument("--duration", type=float, default=30.0, help="s")
    parser.add_argument("--no-load", action="store_true", help="no torch load thread")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    result = run(args.rate, args.duration, load=not args.no_load)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
