"""pi0-ros-bench: latency of the GPU engine per stage, against the roofline floor.

    pi0-ros-bench --geometry pi05 --device cuda --backend cuda_graph --dtype bfloat16 \\
        --cameras 2 --steps 10 --batch 1,2,4,8 --iters 200 --json out/pi05_graph_bf16.json
    pi0-ros-bench --geometry tiny --device cpu --iters 5 --warmup 1 --json /tmp/tiny.json  # CI

Random weights at full pi0 / pi0.5 geometry (built on the meta device, materialized on the GPU
in the target precision) or ``--checkpoint DIR``. Per batch size: p50 / p95 / p99 / max of
vision, prefix, denoise and total (CUDA events on CUDA, perf_counter on CPU), GPU memory, and
the ratio of the measured p50 to the roofline floor of that configuration (``engine.roofline``,
declared datasheet peaks for known GPUs, else measured; ``--peak-tflops`` / ``--peak-gbps``
override). Full geometry on CPU is refused (14 GB of float32 weights, minutes per inference).

Other benchmarks share the entry point (imported only when asked for; the flag is removed from
the argument list before it is handed on):
``--executor`` -> ``pi0_ros.tools.bench_executor``, ``--preprocess`` -> ``bench_host``,
``--ros-host`` -> ``bench_ros_host``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pi0_ros.stats import percentiles
from pi0_ros.tools.checkpoint_args import (add_checkpoint_options, load_for_cli,
                                           preset_or_geometry_file, resolve_geometry)

log = logging.getLogger(__name__)

DISPATCH = (("--executor", "bench_executor"), ("--preprocess", "bench_host"),
            ("--ros-host", "bench_ros_host"))
GEOMETRIES = ("tiny", "tiny-pi0", "pi0", "pi05")
REPORTED = ("upload", "vision", "prefix", "denoise", "download", "total")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for flag, module in DISPATCH:
        if flag in argv:
            argv.remove(flag)
            return importlib.import_module(f"pi0_ros.tools.{module}").main(argv)
    return engine_main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pi0-ros-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", type=preset_or_geometry_file(GEOMETRIES), default=None,
                   metavar="{" + ",".join(GEOMETRIES) + "} | FILE.json",
                   help="random weights: tiny (default; pi0.5 test geometry), tiny-pi0, pi0, "
                        "pi05; with --checkpoint: a geometry override FILE.json")
    p.add_argument("--checkpoint", type=Path, help="openpi / LeRobot checkpoint directory")
    add_checkpoint_options(p, geometry=False)  # --embedding, shared with infer / export
    p.add_argument("--backend", choices=("eager", "cuda_graph"), default="eager")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "fp8"), default="float32")
    p.add_argument("--fp8-act", choices=("per_token", "per_tensor", "static"),
                   default="per_token",
                   help="FP8 activation scales (static: per-tensor, calibrated on 2 dummy "
                        "requests before quantization)")
    p.add_argument("--fp8-emulate", action="store_true",
                   help="FP8 quantize-dequantize reference instead of _scaled_mm (forced on "
                        "devices without FP8 GEMMs)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every stage before capture (cuda_graph backend)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode with --compile (default: \"default\"; "
                        "\"max-autotune-no-cudagraphs\" adds minutes of GEMM autotuning)")
    p.add_argument("--cameras", type=int, default=None,
                   help="cameras (default: 2 for tiny / pi05, 3 for pi0)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", default="1", help="batch size or comma list for a sweep")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="valid prompt tokens; the run uses the smallest bucket >= it "
                        "(default: the model's max_token_len)")
    p.add_argument("--buckets", default=None,
                   help="prompt buckets, e.g. 48,112,200 (default: 48/112/200 cut to the model)")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="declared matmul peak (TFLOP/s) for the roofline")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="declared DRAM bandwidth (GB/s) for the roofline")
    p.add_argument("--measure-peak", action="store_true",
                   help="measure the device peaks instead of the datasheet table")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--kernels-only", action="store_true",
                   help="count the kernels per stage of the format on the meta device (full "
                        "geometry anywhere, no weights, no timing) and exit")
    p.add_argument("--attention", choices=("eager", "sdpa"), default="eager",
                   help="attention kernel (model.gemma.set_attention)")
    return p


# -- model construction ---------------------------------------------------------------------------
def _config(args):
    from pi0_ros.model import Pi0Config, tiny_config

    if args.geometry in ("tiny", "tiny-pi0"):
        return tiny_config(pi05=args.geometry == "tiny", num_cameras=args.cameras or 2)
    cameras = args.cameras or (3 if args.geometry == "pi0" else 2)
    cfg = Pi0Config.preset(args.geometry)
    return cfg.replace(cameras=cfg.cameras[:cameras] if cameras <= len(cfg.cameras)
                       else tuple(f"camera_{i}" for i in range(cameras)))


@torch.no_grad()
def random_model(cfg, device: torch.device, dtype: str, seed: int = 0):
    """Random weights at ``cfg`` geometry, materialized on ``device`` directly in ``dtype``
    precision (no float32 copy of a full-size model is ever made)."""
    from pi0_ros.model import Pi0Model

    with torch.device("meta"):
        model = Pi0Model(cfg)
    model.set_precision(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim >= 2:
            fan_in = param[0].numel() if "embed" not in name else param.shape[1]
            param.normal_(0.0, fan_in**-0.5, generator=gen)
        elif "norm" in name and leaf == "weight" and ("vision." in name or "layer_norm" in name):
            param.fill_(1.0)  # LayerNorm scale (Gemma RMSNorm weights are offsets from 1: 0)
        else:
            param.zero_()
    return model.eval().requires_grad_(False)


def build_model(args, device: torch.device):
    """The model in the format of ``--dtype`` (``registry.prepare_model``: FP8 linears for fp8,
    calibrated first for ``--fp8-act static``)."""
    from pi0_ros.engine.registry import model_dtype, prepare_model

    base_dtype = model_dtype(args.dtype)
    if args.checkpoint is not None:
        model, cfg = load_for_cli("pi0-ros-bench", args, device=device, dtype=base_dtype)
        if args.cameras:
            cfg = cfg.replace(cameras=tuple(f"camera_{i}" for i in range(args.cameras)))
    else:
        cfg = _config(args)
        if device.type == "cpu" and args.geometry in ("pi0", "pi05"):
            raise SystemExit(
                f"pi0-ros-bench: full {args.geometry} geometry on CPU is refused (about 14 GB "
                "of float32 weights and minutes per inference); use --geometry tiny on CPU "
                "(CI) or --device cuda")
        model = random_model(cfg, device, base_dtype, args.seed)
    fp8: dict[str, Any] = {}
    if args.dtype == "fp8":
        fp8 = {"act_scale": args.fp8_act, "emulate": True if args.fp8_emulate else None}
        if args.fp8_act == "static":
            from pi0_ros.engine.base import dummy_inputs
            from pi0_ros.engine.fp8 import calibrate_input_amax

            model.set_precision(base_dtype)
            n = args.cameras or cfg.num_cameras
            calib = [dummy_inputs(cfg, 1, n, cfg.max_token_len // (i + 1), seed=90 + i)
                     for i in range(2)]
            fp8["input_amax"] = calibrate_input_amax(model, calib, args.steps)
    prepare_model(model, args.dtype, **fp8)
    return model, cfg


def make_backend(args, model, device: torch.device):
    """The backend through the one registry (``engine.registry.build_backend``)."""
    from pi0_ros.engine.registry import EngineOptions, build_backend

    return build_backend(model, EngineOptions(
        backend=args.backend, precision=args.dtype, device=str(device), compile=args.compile,
        compile_mode=args.compile_mode))


def meta_kernel_counts(args, cfg) -> dict[str, int]:
    """Non-view aten ops per stage of the model in ``args``' format, on the meta device (the
    native FP8 path; static scales with placeholder amax): full geometry on any machine. On
    meta / CPU ``sdpa`` counts its math decomposition; on CUDA it is one fused op."""
    from pi0_ros.engine.base import EngineSpec, StaticBackend
    from pi0_ros.engine.fp8 import linear_names
    from pi0_ros.engine.registry import model_dtype, prepare_model
    from pi0_ros.model import Pi0Model
    from pi0_ros.model.gemma import set_attention

    with torch.device("meta"):
        model = Pi0Model(cfg)
    model.set_precision(model_dtype(args.dtype))
    set_attention(model, args.attention)
    fp8: dict[str, Any] = {}
    if args.dtype == "fp8":
        fp8 = {"act_scale": args.fp8_act, "emulate": bool(args.fp8_emulate)}
        if args.fp8_act == "static":
            fp8["input_amax"] = {n: torch.ones(()) for n in linear_names(model, ("lm", "expert"))}
    prepare_model(model, args.dtype, **fp8)

    class _Meta(StaticBackend):  # the real stage functions over meta static buffers
        def _run_stage(self, *key):
            self._stage_fn(*key)()

    backend = _Meta(model)
    bucket = args.prompt_len or cfg.max_token_len
    batch = int(str(args.batch).split(",")[0])
    # prepare() without its generator / warm-up (meta tensors have no values).
    spec = EngineSpec(num_cameras=args.cameras or cfg.num_cameras, num_steps=args.steps,
                      max_batch=batch, prompt_buckets=(bucket,)).resolve(cfg.max_token_len)
    with torch.no_grad():
        backend.spec, backend.conds = spec, model.time_conditioning(spec.num_steps)
        backend._slots = [backend._alloc_slot(spec)]
        return stage_kernel_counts(backend, bucket=bucket, batch=batch)


def stage_kernel_counts(backend, *, bucket: int, batch: int) -> dict[str, int]:
    """Non-view aten ops per stage of a prepared backend's model *in its format* (fp8: the
    quantization ops included), from one eager pass of slot 0 under the host-sync check: the
    kernels one graph replay launches without ``torch.compile`` fusion."""
    from pi0_ros.engine.base import STAGES
    from pi0_ros.engine.cuda_standin import no_host_sync

    if backend._cuda:
        backend._rt.synchronize(backend.device)
    counts = {}
    for stage in STAGES:
        key = (stage, 0, 0 if stage == "vision" else bucket, batch)
        with no_host_sync(f"stage {key}") as check:
            backend._stage_fn(*key)()
        counts[stage] = check.ops
    if backend._cuda:
        backend._rt.synchronize(backend.device)
    return counts


# -- measurement ----------------------------------------------------------------------------------
def _memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    gb = 1024.0**3
    return {"allocated_gb": torch.cuda.memory_allocated(device) / gb,
            "peak_allocated_gb": torch.cuda.max_memory_allocated(device) / gb,
            "reserved_gb": torch.cuda.memory_reserved(device) / gb}


def run_batch(args, backend, cfg, device, batch: int, prompt_len: int, buckets, peak) -> dict:
    from pi0_ros.engine.base import EngineSpec, dummy_inputs
    from pi0_ros.engine.roofline import ratio_to_floor, roofline

    spec = EngineSpec(num_cameras=args.cameras_n, num_steps=args.steps, max_batch=batch,
                      prompt_buckets=buckets, seed=args.seed)
    t0 = time.perf_counter()
    backend.prepare(spec)
    prepare_s = time.perf_counter() - t0
    inputs = dummy_inputs(cfg, batch, args.cameras_n, prompt_len, seed=args.seed,
                          with_noise=False)
    for _ in range(args.warmup):
        backend.infer(inputs)
    samples: dict[str, list[float]] = {k: [] for k in REPORTED}
    result = None
    for _ in range(args.iters):
        result = backend.infer(inputs)
        for k in REPORTED:
            samples[k].append(result.timing.get(k, 0.0))
    stages = {k: percentiles(v, suffix="_ms") for k, v in samples.items()}
    floors = roofline(cfg, peak, batch=batch, num_cameras=args.cameras_n,
                      prompt_len=result.bucket, num_steps=args.steps,
                      precision=args.dtype)
    p50 = {k: stages[k]["p50_ms"] for k in ("vision", "prefix", "denoise", "total")}
    memory = _memory(device)  # before the kernel count's eager pass allocates intermediates
    run = {"batch": batch, "bucket": result.bucket, "prompt_len": prompt_len,
           "prepare_s": prepare_s, "stages": stages,
           "kernels": stage_kernel_counts(backend, bucket=result.bucket, batch=result.batch),
           "memory": memory,
           "roofline": floors, "ratio_to_floor": ratio_to_floor(p50, floors),
           "finite": bool(torch.isfinite(result.actions).all())}
    backend.release()
    if device.type == "cuda":  # each batch size's peak is its own (weights included)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return run


def engine_main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    resolve_geometry(parser, args, default="tiny")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("pi0-ros-bench: --device cuda but CUDA is not available")
    if args.backend == "cuda_graph" and device.type != "cuda":
        raise SystemExit("pi0-ros-bench: --backend cuda_graph needs --device cuda")
    batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    if not batches or min(batches) <= 0:
        raise SystemExit(f"pi0-ros-bench: bad --batch {args.batch!r}")
    torch.manual_seed(args.seed)
    if args.kernels_only:
        cfg = _config(args) if args.checkpoint is None else None
        if cfg is None:
            raise SystemExit("pi0-ros-bench: --kernels-only takes --geometry, not --checkpoint")
        counts = meta_kernel_counts(args, cfg)
        print(f"{args.geometry} {args.dtype}"
              f"{' ' + args.fp8_act if args.dtype == 'fp8' else ''} attention "
              f"{args.attention}: kernels per inference (non-view aten ops, meta device): "
              f"vision {counts['vision']}, prefix {counts['prefix']}, "
              f"denoise {counts['denoise']}")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"kernels": counts, "dtype": args.dtype,
                                             "attention": args.attention}, indent=1))
        return 0
    model, cfg = build_model(args, device)
    if args.attention != "eager":
        from pi0_ros.model.gemma import set_attention

        set_attention(model, args.attention)
    if device.type == "cuda":
        # After quantization: an fp8 run's peak is the fp8 model's, not the bf16 one it came from.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    args.cameras_n = args.cameras or cfg.num_cameras
    weights_gb = _memory(device).get("allocated_gb")

    from pi0_ros.engine.base import default_buckets
    from pi0_ros.engine.roofline import device_peak

    buckets = (tuple(int(b) for b in args.buckets.split(",")) if args.buckets
               else default_buckets(cfg.max_token_len))
    prompt_len = args.prompt_len or cfg.max_token_len
    bucket = next((b for b in sorted(buckets) if b >= prompt_len), None)
    if bucket is None:
        raise SystemExit(f"pi0-ros-bench: --prompt-len {prompt_len} exceeds the buckets "
                         f"{buckets}")
    peak = device_peak(device, tflops=args.peak_tflops, gbps=args.peak_gbps,
                       measure=args.measure_peak)
    backend = make_backend(args, model, device)
    runs = [run_batch(args, backend, cfg, device, b, prompt_len, (bucket,), peak)
            for b in batches]
    out = {
        "tool": "pi0-ros-bench",
        "config": {"geometry": "checkpoint" if args.checkpoint else args.geometry,
                   "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                   "pi05": cfg.pi05, "backend": args.backend, "device": args.device,
                   "dtype": args.dtype, "fp8_act": args.fp8_act if args.dtype == "fp8" else None,
                   "compile": args.compile and args.compile_mode, "cameras": args.cameras_n,
                   "steps": args.steps,
                   "batches": batches, "prompt_len": prompt_len, "bucket": bucket,
                   "iters": args.iters, "warmup": args.warmup, "seed": args.seed},
        "device": _device_info(device),
        "peak": runs[0]["roofline"]["peak"],
        "weights_gb": weights_gb,
        # Kernels per stage of the model in its format (fp8 quantization ops included), first
        # batch size: non-view aten ops of one eager pass (stage_kernel_counts).
        "kernels": runs[0]["kernels"],
        "stages": runs[0]["stages"],  # the first (or only) batch size
        "runs": runs,
    }
    _print(out)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "type": device.type}
    if device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(device),
                    capability=list(torch.cuda.get_device_capability(device)),
                    cuda=torch.version.cuda)
    else:
        info.update(name=platform.processor() or platform.machine(),
                    threads=torch.get_num_threads())
    return info


def _print(out: dict) -> None:
    c = out["config"]
    print(f"pi0-ros-bench: {c['geometry']} ({'pi0.5' if c['pi05'] else 'pi0'}) "
          f"{c['backend']} {c['dtype']} on {out['device']['name']}; {c['cameras']} cameras, "
          f"{c['steps']} steps, prompt {c['prompt_len']} -> bucket {c['bucket']}")
    peak = out["peak"]
    k = out["kernels"]
    print(f"{c['dtype']} kernels per inference: vision {k['vision']}, prefix {k['prefix']}, "
          f"denoise {k['denoise']} (unfused; --compile fuses them)")
    fp8 = f", {peak['tflops_fp8']:.1f} fp8" if peak["tflops_fp8"] else ""
    print(f"roofline peak ({peak['source']}): {peak['tflops_float32']:.2f} TFLOP/s float32, "
          f"{peak['tflops_bfloat16']:.2f} bf16{fp8}; {peak['gbps']:.0f} GB/s")
    for run in out["runs"]:
        mem = run["memory"]
        mem_s = (f", GPU memory {mem['peak_allocated_gb']:.2f} GB peak / "
                 f"{mem['reserved_gb']:.2f} GB reserved" if mem else "")
        print(f"\nbatch {run['batch']} (prepare {run['prepare_s']:.1f} s{mem_s})")
        print(f"{'stage':<10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}"
              f"{'floor ms':>10}{'x floor':>9}")
        for stage in REPORTED:
            s = run["stages"][stage]
            floor = run["roofline"].get(stage, {}).get("floor_ms")
            ratio = run["ratio_to_floor"].get(stage)
            print(f"{stage:<10}{s['p50_ms']:>9.3f}{s['p95_ms']:>9.3f}{s['p99_ms']:>9.3f}"
                  f"{s['max_ms']:>9.3f}" + (f"{floor:>10.3f}{ratio:>9.2f}" if floor else ""))


if __name__ == "__main__":
    sys.exit(main())
