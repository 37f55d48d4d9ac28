"""Jitter benchmark of pi0_executor_node's control loop (the real one, in rclpy, publishing),
side by side with a bare loop of the same rate on the same machine in the same run.

``pi0-ros-bench --executor --rate 500 --duration 30 --json OUT.json``: first a bare
:class:`~pi0_ros.control.loop.DeadlineLoop` ticking nothing for ``--duration`` s, then the
executor node's loop (the same class, doing the executor's work) for as long, both under the
same load; the report gives both and their difference, so a figure says how much is the machine
and how much is the executor. ``--priority`` / ``--cpu`` request SCHED_FIFO / affinity for both
(a refusal is reported in ``realtime``). A load thread runs torch
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


def _bare_loop(rate: float, duration: float, priority: int, cpus) -> dict:
    """The same DeadlineLoop as the node's, ticking nothing: what this machine gives any
    Python loop at ``rate`` right now."""
    from pi0_ros.control.loop import DeadlineLoop, request_realtime

    loop = DeadlineLoop(1.0 / rate, lambda now: None)
    stop = threading.Event()
    info = {}

    def body():
        info["granted"], info["refused"] = request_realtime(priority, cpus)
        loop.run(stop)

    thread = threading.Thread(target=body, name="bare_loop", daemon=True)
    thread.start()
    time.sleep(duration)
    stop.set()
    thread.join()
    return {**loop.stats(), "realtime": "; ".join(info["granted"] + info["refused"]) or "none"}


def run(rate: float, duration: float, load: bool = True, priority: int = 0, cpus=(),
        gc_freeze: bool = True, bare: bool = True) -> dict:
    """Executor node's control loop for ``duration`` s, preceded (``bare``) by a bare loop of
    the same rate for as long, under the same load, in the same process."""
    import rclpy
    from rclpy.parameter import Parameter

    from pi0_ros.ros.executor_node import SUCCESS, ExecutorNode

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    stop = threading.Event()
    loader = threading.Thread(target=_load, args=(stop,), daemon=True)
    node = ExecutorNode(context=ctx, parameter_overrides=[
        Parameter("joint_names", value=[f"j{i}" for i in range(JOINTS)]),
        Parameter("control_rate", value=float(rate)),
        Parameter("realtime_priority", value=int(priority)),
        Parameter("cpu_affinity", value=[int(c) for c in cpus] or [-1]),
        Parameter("gc_freeze", value=bool(gc_freeze))])
    try:
        if node.trigger_configure() != SUCCESS:
            raise RuntimeError("configure failed")
        if load:
            import torch  # noqa: F401  (imported here: an import holds the GIL for ~0.2 s)

            loader.start()
            time.sleep(0.5)  # load running before the loop starts
        bare_result = _bare_loop(rate, duration, priority, cpus) if bare else None
        node.trigger_activate()
        drv = node.driver  # made by activate, which waits for a joint state
        names = tuple(f"j{i}" for i in range(JOINTS))
        drv.measure(names, _chunk(time.monotonic())[0], time.monotonic())
        end = time.monotonic() + duration
        while (now := time.monotonic()) < end:
            t0 = now - LATENCY
            drv.measure(names, drv.position, now)  # an arm that follows: closed loop fed
            drv.submit(t0, CHUNK_DT, names, _chunk(t0), now)
            time.sleep(min(CHUNK_PERIOD, max(end - time.monotonic(), 0.0)))
        node.stop_control_thread()
        stats = node.loop.stats()
        result = {"rate": rate, "duration": duration, **stats,
                  "commands": node.ticks_published, "seams": drv.counters()["seams"],
                  "tracker": drv.core.tracker, "realtime": node.realtime,
                  "gc_freeze": gc_freeze,
                  "loop": "dedicated thread, steady-clock absolute deadlines, sleep + spin tail",
                  "load": (f"1 thread of torch {MATMUL_SIZE}x{MATMUL_SIZE} fp32 matmul+tanh "
                           "(torch releases the GIL in ops)") if load else "none"}
        if bare_result is not None:
            result["bare"] = bare_result
            result["executor_minus_bare"] = {
                "period_error_p99_ms": stats["period_error_p99_ms"]
                - bare_result["period_error_p99_ms"],
                "missed_ticks": stats["missed_ticks"] - bare_result["missed_ticks"]}
    finally:
        stop.set()
        node.stop_control_thread()
        if loader.is_alive():
            loader.join()
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)
    return result


def _table(r: dict) -> str:
    rows = [("", "executor", "bare loop")]
    b = r.get("bare", {})
    for key in ("ticks", "missed_ticks", "period_error_p50_ms", "period_error_p99_ms",
                "period_error_max_ms"):
        fmt = (lambda x: f"{x:.3f}") if key.endswith("_ms") else str
        rows.append((key, fmt(r[key]), fmt(b[key]) if key in b else "-"))
    return "\n".join(f"{a:22s} {e:>10s} {c:>10s}" for a, e, c in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pi0-ros-bench --executor", description=__doc__)
    parser.add_argument("--executor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=500.0, help="Hz")
    parser.add_argument("--duration", type=float, default=30.0,
                        help="s, of each phase (bare loop, then executor)")
    parser.add_argument("--no-load", action="store_true", help="no torch load thread")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare-loop phase")
    parser.add_argument("--priority", type=int, default=0,
                        help="SCHED_FIFO priority of both loops (0: don't ask)")
    parser.add_argument("--cpu", type=int, action="append", default=[],
                        help="pin both loops to this CPU (repeatable)")
    parser.add_argument("--no-gc-freeze", action="store_true", help="no gc.freeze()")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    result = run(args.rate, args.duration, load=not args.no_load, priority=args.priority,
                 cpus=args.cpu, gc_freeze=not args.no_gc_freeze, bare=not args.no_bare)
    text = json.dumps(result, indent=2)
    print(text)
    print(_table(result))
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
