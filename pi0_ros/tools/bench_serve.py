"""pi0-ros-serve load benchmark: N clients x M requests over loopback, round-trip percentiles.

    python -m pi0_ros.tools.bench_serve --checkpoint DIR [--tokenizer T] [--norm-stats S]
        [--clients 4] [--requests 20] [--max-batch 4] [--device auto] [--json OUT.json]
    python -m pi0_ros.tools.bench_serve --uri ws://127.0.0.1:8000 [--api-key K] ...

Without ``--uri`` it starts ``pi0-ros-serve``'s server in this process on a free 127.0.0.1 port.
Each client (a thread with its own ``RemotePolicy`` connection) sends M requests one after the
other (a random image pair and state per client, the same every run); the report gives the
round trip (send -> answer) p50 / p90 / p99 / max, requests per second, how the server batched
them, and ``lost`` (requests without an answer: any is an error, exit status 1).  Loopback
only; the run is bounded by ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def client_observation(meta: dict[str, Any], client: int) -> dict[str, Any]:
    """A request in the server's own input keys (from its metadata), fixed per client."""
    rng = np.random.default_rng(client)
    keys = meta.get("input_keys") or {}
    size = int(meta.get("image_size") or 224)
    obs: dict[str, Any] = {
        key: rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        for key in (keys.get("cameras") or {})
    }
    obs[keys.get("state", "observation/state")] = rng.uniform(
        -1, 1, int(meta.get("state_dim") or 8)).astype(np.float32)
    obs[keys.get("prompt", "prompt")] = f"pick up object {client}"
    return obs


def run_load(uri: str, clients: int, requests: int, *, api_key: str | None = None,
             timeout_s: float = 600.0) -> dict[str, Any]:
    """N threads x M sequential requests; -> round trips (ms), answers, errors, wall time."""
    from pi0_ros.serve import RemotePolicy

    rtts: list[list[float]] = [[] for _ in range(clients)]
    results: list[list[np.ndarray]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        try:
            with RemotePolicy(uri, api_key=api_key, timeout_s=timeout_s, rename={}) as remote:
                obs = client_observation(remote.metadata, i)
                start.wait(timeout_s)
                for _ in range(requests):
                    t0 = time.perf_counter()
                    out = remote.infer(obs)
                    rtts[i].append((time.perf_counter() - t0) * 1e3)
                    results[i].append(out["actions"])
        except Exception as exc:  # reported, counted as lost
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")
            start.abort()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        start.wait(timeout_s)
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0.0))
    wall = time.perf_counter() - t0
    if any(t.is_alive() for t in threads):
        errors.append(f"not finished within {timeout_s} s")
    return {"rtts": rtts, "results": results, "errors": errors, "wall_s": wall}


def summarize(load: dict[str, Any], clients: int, requests: int,
              server_stats: dict[str, Any] | None) -> dict[str, Any]:
    flat = np.array([x for per in load["rtts"] for x in per], dtype=np.float64)
    answered = int(flat.size)
    pct = (lambda q: float(np.percentile(flat, q))) if answered else (lambda q: float("nan"))
    report = {
        "clients": clients, "requests_per_client": requests, "sent": clients * requests,
        "answered": answered, "lost": clients * requests - answered,
        "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
        "max_ms": float(flat.max()) if answered else float("nan"),
        "mean_ms": float(flat.mean()) if answered else float("nan"),
        "throughput_rps": answered / load["wall_s"] if load["wall_s"] > 0 else float("nan"),
        "wall_s": load["wall_s"], "errors": load["errors"],
    }
    if server_stats is not None:
        report["server"] = server_stats
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_serve", description=__doc__.split("\n")[0])
    p.add_argument("--uri", default=None, help="a running server (default: start one here)")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--norm-stats", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--backend", default="auto")
    p.add_argument("--num-steps", type=int, default=10)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="bound on the whole run (s)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        p.error("--clients and --requests must be >= 1")
    if args.uri is None and args.checkpoint is None:
        p.error("give --checkpoint (start a server here) or --uri (use a running one)")

    server = None
    uri = args.uri
    if uri is None:
        from pi0_ros.policy import Policy
        from pi0_ros.serve import PolicyServer, ServeConfig

        def build():
            return Policy.from_checkpoint(
                args.checkpoint, device=args.device, dtype=args.dtype, backend=args.backend,
                num_steps=args.num_steps, tokenizer=args.tokenizer, norm_stats=args.norm_stats,
                max_batch=args.max_batch)

        server = PolicyServer(build, ServeConfig(port=0, max_batch=args.max_batch,
                                                 api_key=args.api_key)).start()
        uri = server.url
    try:
        load = run_load(uri, args.clients, args.requests, api_key=args.api_key,
                        timeout_s=args.timeout)
        report = summarize(load, args.clients, args.requests,
                           server.stats if server is not None else None)
    finally:
        if server is not None:
            server.stop()
    print(f"bench_serve {uri}: {report['clients']} clients x {report['requests_per_client']} "
          f"requests: answered {report['answered']}/{report['sent']}, lost {report['lost']}")
    print(f"  round trip ms: p50 {report['p50_ms']:.1f}  p90 {report['p90_ms']:.1f}  "
          f"p99 {report['p99_ms']:.1f}  max {report['max_ms']:.1f}  "
          f"({report['throughput_rps']:.2f} req/s over {report['wall_s']:.1f} s)")
    if "server" in report:
        print(f"  server batches (rows: count): {report['server']['batch_sizes']}")
    for err in report["errors"]:
        print(f"  error: {err}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["lost"] or report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
