"""pi0-ros-export: export the inference stages to ONNX, check them against eager with
onnxruntime, and build TensorRT engines.

    pi0-ros-export --checkpoint DIR --out OUT [--buckets 48,112,200] [--steps 10]
        [--max-batch 1] [--precision bf16|fp16|fp32|fp8] [--build] [--engine-dir DIR]
    pi0-ros-export --tiny pi05 --cameras 2 --out OUT      # random tiny model (smoke test)

Writes OUT/onnx/float32/<stage>/model.onnx (vision; prefix and denoise per prompt bucket),
checks every stage and the full sampled actions against the eager float32 model (max |diff| <=
--atol, default 1e-4), and with --build builds engines into --engine-dir (default OUT/engines,
the cache the tensorrt backend reads), printing build time, engine size and the layer
precisions TensorRT chose. OUT/report.json holds all of it. Exit status: 0 ok, 1 check failed,
2 usage error / TensorRT missing / build failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pi0_ros.engine.registry import PRECISIONS, TRT_PRECISION
from pi0_ros.engine.tensorrt.settings import PRECISIONS as TRT_PRECISIONS
from pi0_ros.tools.checkpoint_args import add_checkpoint_options, checkpoint_kwargs


def _progress(msg: str) -> None:
    print(msg, flush=True)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pi0-ros-export", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="openpi / LeRobot checkpoint directory")
    src.add_argument("--tiny", choices=("pi0", "pi05"),
                     help="random-weight tiny model instead of a checkpoint")
    add_checkpoint_options(p)  # --geometry FILE.json, --embedding (shared by every CLI)
    p.add_argument("--cameras", type=int, default=None,
                   help="number of cameras (--tiny only; a checkpoint fixes its own)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--buckets", type=_ints, default=None,
                   help="prompt-length buckets (default: 48,112,200 cut to max_token_len)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps (unrolled)")
    p.add_argument("--step-stage", action="store_true",
                   help="also export the one-step denoise stage (run-time loop)")
    p.add_argument("--max-batch", type=int, default=1)
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="tiny weights / check inputs seed")
    chk = p.add_argument_group("onnxruntime check")
    chk.add_argument("--no-check", action="store_true")
    chk.add_argument("--atol", type=float, default=1e-4)
    chk.add_argument("--check-batch", type=int, default=2)
    trt = p.add_argument_group("TensorRT")
    trt.add_argument("--build", action="store_true", help="build engines (needs tensorrt)")
    trt.add_argument("--engine-dir", type=Path, default=None)
    trt.add_argument("--precision", default="bf16",
                     choices=(*PRECISIONS, *(p for p in TRT_PRECISIONS if p not in PRECISIONS)),
                     help="a numeric format of the engine registry (float32, bfloat16, fp8) "
                          "or TensorRT's own name (fp32, bf16, fp16, fp8)")
    trt.add_argument("--runtime", choices=("tensorrt", "onnxruntime"), default="tensorrt",
                     help="build with TensorRT (default), or store the ONNX stages as "
                          "'engines' the onnxruntime runtime serves (float32, CPU: the "
                          "node's tensorrt.runtime onnxruntime)")
    typing = trt.add_mutually_exclusive_group()
    typing.add_argument("--strongly-typed", dest="strongly_typed", action="store_true",
                        default=None)
    typing.add_argument("--weakly-typed", dest="strongly_typed", action="store_false")
    trt.add_argument("--opt-level", type=int, default=None,
                     help="builder optimization level 0..5 (default 3; 2 on Thor)")
    trt.add_argument("--no-fp32-islands", action="store_true",
                     help="weakly typed fp16/bf16: do not pin norms / attention to float32")
    trt.add_argument("--no-tf32", action="store_true")
    trt.add_argument("--workspace-gib", type=float, default=None)
    trt.add_argument("--calib", type=Path, action="append", default=None,
                     help="fp8: calibration requests, safetensors with model-level tensors "
                          "images (B,N,3,S,S) in [-1,1], image_masks, tokens, token_mask, state "
                          "[, noise]; repeatable (default: random inputs, with a warning)")
    return p


def _load_calibration(paths, model_inputs_cls) -> list:
    from safetensors.torch import load_file

    requests = []
    for path in paths:
        raw = load_file(str(path))
        missing = {"images", "image_masks", "tokens", "token_mask", "state"} - set(raw)
        if missing:
            raise SystemExit(f"error: {path} lacks {sorted(missing)}")
        requests.append(model_inputs_cls(
            images=raw["images"].float(), image_masks=raw["image_masks"].bool(),
            tokens=raw["tokens"].long(), token_mask=raw["token_mask"].bool(),
            state=raw["state"].float(), noise=raw.get("noise")))
    return requests


def _load_model(args):
    from pi0_ros.model import Pi0Model, load_checkpoint, random_init_, tiny_config

    if args.tiny:
        cfg = tiny_config(pi05=args.tiny == "pi05", num_cameras=args.cameras or 2)
        return random_init_(Pi0Model(cfg), args.seed).eval(), None
    if args.cameras is not None:
        raise SystemExit("error: --cameras applies to --tiny only; a checkpoint's camera slots "
                         "come from its config (missing cameras are masked at run time)")
    model, _ = load_checkpoint(args.checkpoint, device="cpu", dtype="float32",
                               **checkpoint_kwargs(args))
    return model.eval(), args.checkpoint


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def main(argv: list[str] | None = None, *, runtime=None) -> int:
    """Console entry point. ``runtime``: a ``TrtRuntime`` to build with instead of TensorRT
    (tests pass ``OnnxRuntimeRuntime``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.max_batch <= 0 or not 0 < args.min_batch <= args.max_batch:
        parser.error("--steps, --max-batch must be positive and 1 <= --min-batch <= --max-batch")

    from pi0_ros.engine.base import default_buckets, dummy_inputs
    from pi0_ros.engine import tensorrt as tb
    from pi0_ros.model import CheckpointError

    torch.set_grad_enabled(False)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"argv": list(argv) if argv is not None else sys.argv[1:]}
    try:
        options = tb.BuildOptions(
            precision=TRT_PRECISION.get(args.precision, args.precision),
            strongly_typed=args.strongly_typed,
            opt_level=args.opt_level, fp32_islands=not args.no_fp32_islands,
            tf32=not args.no_tf32, workspace_gib=args.workspace_gib,
            opset=args.opset or tb.DEFAULT_OPSET)
    except ValueError as e:
        parser.error(str(e))

    if args.build and runtime is None and args.runtime == "onnxruntime":
        runtime = tb.OnnxRuntimeRuntime()
    if args.build and runtime is None:  # fail before the long export, not after it
        try:
            tb.require_tensorrt()
        except tb.TensorRTUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    _progress("loading model ...")
    try:
        model, ckpt = _load_model(args)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = model.config
    buckets = args.buckets or default_buckets(cfg.max_token_len)
    if max(buckets) > cfg.max_token_len:
        parser.error(f"bucket {max(buckets)} exceeds max_token_len {cfg.max_token_len}")
    _progress(f"{'pi0.5' if cfg.pi05 else 'pi0'}: {cfg.num_cameras} cameras, buckets "
              f"{list(buckets)}, {args.steps} steps, batch {args.min_batch}..{args.max_batch} "
              f"(loaded in {time.perf_counter() - t0:.1f} s)")

    # 1. export (float32: the graphs onnxruntime checks and weakly typed builds parse)
    exports = tb.export_all(model, out / "onnx" / "float32", prompt_buckets=buckets,
                            num_steps=args.steps, opset=options.opset,
                            step_stage=args.step_stage, progress=_progress)
    report["onnx"] = [{"stage": e.name, "path": str(e.path), "bytes": tb.file_size(e.path),
                       "export_s": round(e.seconds, 2)} for e in exports]

    # 2. onnxruntime vs eager
    status = 0
    if not args.no_check:
        status = _check(model, exports, buckets, args, report, tb, dummy_inputs)

    # 3. engines
    if args.build:
        code = _build(model, ckpt, exports, buckets, options, args, report, tb,
                      runtime)
        status = status or code
    (out / "report.json").write_text(json.dumps(report, indent=1))
    _progress(f"report: {out / 'report.json'} (total {time.perf_counter() - t0:.1f} s)")
    return status


def _check(model, exports, buckets, args, report, tb, dummy_inputs) -> int:
    cfg = model.config
    _progress(f"checking the ONNX stages with onnxruntime against eager (atol {args.atol}) ...")
    rows = [["output", "max |onnxruntime - eager|"]]
    worst = 0.0
    diffs: dict[str, float] = {}
    for L in buckets:
        # fewer valid tokens than the bucket: padding paths are exercised too
        request = dummy_inputs(cfg, args.check_batch, cfg.num_cameras, max(1, L - L // 4),
                               prompt_len=L, seed=args.seed)
        stages = [e for e in exports if e.prompt_len in (0, L)]
        t = time.perf_counter()
        diffs.update(tb.check_stages(model, stages, request))
        sessions = {e.stage: tb.ort_session(e.path) for e in stages
                    if e.stage in ("vision", "prefix", "denoise")}
        got = tb.onnx_sample_actions(sessions, request, model, args.steps)
        want = model.sample_actions(request.images, request.image_masks, request.tokens,
                                    request.token_mask, request.state, noise=request.noise,
                                    num_steps=args.steps)
        diffs[f"sample_actions_L{L}"] = tb.max_abs_diff(got, want)
        _progress(f"    bucket {L}: checked in {time.perf_counter() - t:.1f} s")
    for name, d in diffs.items():
        rows.append([name, f"{d:.3e}" + ("" if d <= args.atol else "  FAIL")])
        worst = max(worst, d)
    _progress(_table(rows))
    report["check"] = {"atol": args.atol, "max_abs_diff": diffs, "passed": worst <= args.atol}
    if worst > args.atol:
        print(f"error: onnxruntime differs from eager by {worst:.3e} > {args.atol}",
              file=sys.stderr)
        return 1
    return 0


def _build(model, ckpt, exports, buckets, options, args, report, tb, runtime) -> int:
    try:
        runtime = runtime or tb.TensorRTRuntime()
    except tb.TensorRTUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pi0_ros.engine.base import ModelInputs

    checkpoint = tb.checkpoint_hash(ckpt) if ckpt else tb.model_hash(model)
    calibration = _load_calibration(args.calib, ModelInputs) if args.calib else None
    builder = tb.EngineBuilder(model, runtime, options,
                               cache=tb.EngineCache(args.engine_dir or args.out / "engines"),
                               checkpoint=checkpoint, work_dir=args.out / "onnx",
                               progress=_progress, calibration=calibration)
    builder.add_exports(exports)
    dev = runtime.device_info()
    _progress(f"TensorRT {runtime.version} on {dev.name} (sm {dev.capability[0]}"
              f"{dev.capability[1]}{', Thor' if dev.is_thor else ''})")
    jobs = [("vision", buckets[-1])] + [(s, L) for L in buckets for s in ("prefix", "denoise")]
    if args.step_stage:
        jobs += [("denoise_step", L) for L in buckets]
    records = []
    try:
        for stage, L in jobs:
            _, record = builder.engine(stage, prompt_len=L, num_cameras=model.config.num_cameras,
                                       num_steps=args.steps, min_batch=args.min_batch,
                                       max_batch=args.max_batch)
            records.append(record)
    except (tb.TensorRTError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        report["engines"] = tb.build_report(records)
        return 2
    report["engines"] = tb.build_report(records)
    rows = [["engine", "built", "build s", "MiB", "layer dtypes"]]
    for r in records:
        counts = r.layers.get("counts", {}) if r.layers else {}
        rows.append([r.path.name, "yes" if r.built else "cached", f"{r.build_s:.1f}",
                     f"{r.size / 2**20:.1f}",
                     ", ".join(f"{k}:{v}" for k, v in sorted(counts.items())) or "-"])
    _progress(_table(rows))
    if any(r.layers.get("fallback") for r in records):
        print(f"warning: some engines do not run in {options.precision} (see report.json "
              "layers); TensorRT may have fallen back to float32", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
