"""pi0-ros-serve: serve a checkpoint to openpi clients (openpi-client's WebsocketClientPolicy,
ActionChunkBroker) and to the policy node's remote mode, over openpi's websocket protocol.

    pi0-ros-serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--device auto]
        [--dtype auto] [--backend auto] [--num-steps 10] [--max-batch 4] [--seed N]
        [--api-key KEY | env PI0_ROS_API_KEY] [--input-keys libero|slots] [--norm-stats S]
        [--tokenizer T] [--default-prompt P] [--max-message-mb 64] [--warmup 1]

Binds 127.0.0.1 unless --host says otherwise; GET /healthz answers 200 once serving.  SIGINT /
SIGTERM shut down cleanly (exit 0).  See docs/SERVE.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

API_KEY_ENV = "PI0_ROS_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    from pi0_ros.engine.registry import AUTO, BACKENDS, PRECISIONS
    from pi0_ros.policy import INPUT_PRESETS
    from pi0_ros.serve.server import DEFAULT_MAX_MESSAGE, DEFAULT_PORT

    p = argparse.ArgumentParser(prog="pi0-ros-serve", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0: any free port")
    p.add_argument("--device", default=AUTO, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=AUTO, choices=(AUTO, *PRECISIONS),
                   help="numeric format (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--backend", default=AUTO, choices=(AUTO, *BACKENDS))
    p.add_argument("--num-steps", type=int, default=10)
    p.add_argument("--max-batch", type=int, default=4,
                   help="requests of concurrent clients run together, up to this many rows")
    p.add_argument("--seed", type=int, default=None,
                   help="reproducible noise: request n of a connection uses request_noise(seed, "
                        "n) unless it brings a 'noise' field")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Api-Key KEY' (default: ${API_KEY_ENV})")
    p.add_argument("--input-keys", default="libero", choices=sorted(INPUT_PRESETS),
                   help="observation keys (libero: openpi's LIBERO client; slots: the node's)")
    p.add_argument("--norm-stats", default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--default-prompt", default=None)
    p.add_argument("--max-message-mb", type=float, default=DEFAULT_MAX_MESSAGE / 2**20,
                   help="larger request frames close their connection (1009)")
    p.add_argument("--decode-threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1,
                   help="inferences at max batch, then batch 1, before the port opens (>= 1)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op CPU threads of the inference thread (0: torch's "
                        "default; the node's model.torch_threads)")
    p.add_argument("--log-level", default="INFO")
    return p


def policy_factory(args: argparse.Namespace):
    """The Policy the node would build for the same options (built on the inference thread,
    engine prepared there for --max-batch rows)."""
    from pi0_ros.policy import Policy
    from pi0_ros.processing import set_torch_threads

    def build():
        if args.torch_threads > 0:
            set_torch_threads(args.torch_threads)
        return Policy.from_checkpoint(
            args.checkpoint, device=args.device, dtype=args.dtype, backend=args.backend,
            num_steps=args.num_steps, norm_stats=args.norm_stats, tokenizer=args.tokenizer,
            input_keys=args.input_keys, default_prompt=args.default_prompt,
            max_batch=args.max_batch)

    return build


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pi0_ros.serve.server import PolicyServer, ServeConfig

    try:
        config = ServeConfig(
            host=args.host, port=args.port, max_batch=args.max_batch, seed=args.seed,
            api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
            max_message_bytes=int(args.max_message_mb * 2**20),
            decode_threads=args.decode_threads, warmup=args.warmup)
        server = PolicyServer(policy_factory(args), config)
    except ValueError as exc:
        print(f"pi0-ros-serve: error: {exc}", file=sys.stderr)
        return 2
    if config.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        logging.warning("serving on %s without an API key: anyone who can reach the port can "
                        "use the policy (set --api-key or $%s)", config.host, API_KEY_ENV)
    try:
        server.serve_forever(on_ready=lambda s: print(f"pi0-ros-serve: serving {s.url}",
                                                      flush=True))
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"pi0-ros-serve: error: {exc}", file=sys.stderr)
        return 1
    print("pi0-ros-serve: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
