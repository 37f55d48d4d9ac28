"""ONNX export of the stages (the input of every engine build), their eager references, and
reading an exported graph's I/O back.

``export_stage`` traces one stage's wrapper (``modules.py``) at an example batch of 2 with the
batch axis dynamic and writes ``<out>/<stage_id>/model.onnx`` (large weights in external data
files next to it). ``eager_stage`` / ``example_feeds`` give what the model's own in-place stage
functions produce: the tracing inputs and the reference every check compares against.

The exporter is the TorchScript one (``torch.onnx.export(..., dynamo=False)``): it works offline
with torch alone; the dynamo exporter needs ``onnxscript``.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Mapping, Sequence

import torch

from ...model import Pi0Model
from ..base import ModelInputs, dummy_inputs
from .modules import stage_module
from .stages import DEFAULT_OPSET, batch_axis, stage_id, stage_io, stage_shapes, step_conditioning

log = logging.getLogger(__name__)

EXPORT_BATCH = 2  # example batch for tracing (not 1: a traced 1 is easily baked as a constant)


# -- eager references of each stage ---------------------------------------------------------------
@torch.no_grad()
def eager_stage(model: Pi0Model, stage: str, feeds: Mapping[str, torch.Tensor],
                num_steps: int = 10, step: int = 0) -> dict[str, torch.Tensor]:
    """What the model's own (in-place, buffer-based) stage functions produce for ``feeds``;
    names as in ``stage_io``. ``denoise_step`` evaluates ``step`` of a ``num_steps`` schedule."""
    if stage == "vision":
        return {"image_tokens": model.embed_images(feeds["images"])}
    if stage == "prefix":
        tokens = feeds["tokens"]
        cache = model.new_cache(tokens.shape[0], feeds["image_masks"].shape[1], tokens.shape[1])
        model.fill_prefix(cache, feeds["image_tokens"], feeds["image_masks"], tokens,
                          feeds["token_mask"])
        return cache_outputs(cache)
    cache = cache_from_outputs(model, feeds)
    conds = model.time_conditioning(num_steps)
    if stage == "denoise":
        return {"actions": model.denoise(cache, feeds["state"], feeds["noise"], conds)}
    if stage == "denoise_step":
        return {"velocity": model.denoise_step(cache, feeds["state"], feeds["x_t"], conds, step)}
    raise ValueError(f"unknown stage {stage!r}")


def cache_outputs(cache) -> dict[str, torch.Tensor]:
    """A filled ``PrefixCache`` as the prefix stage's outputs."""
    p = cache.prefix_len
    return {"prefix_k": cache.k[:, :, :, :p].contiguous(),
            "prefix_v": cache.v[:, :, :, :p].contiguous(),
            "suffix_mask": cache.suffix_mask.clone(), "suffix_cos": cache.suffix_cos.clone(),
            "suffix_sin": cache.suffix_sin.clone()}


def cache_from_outputs(model: Pi0Model, feeds: Mapping[str, torch.Tensor]):
    """The prefix stage's outputs as a ``PrefixCache`` the eager ``denoise`` can read."""
    k = feeds["prefix_k"]  # (depth, B, Nkv, P, Dh)
    cfg = model.config
    b, p = k.shape[1], k.shape[3]
    cache = model.new_cache(b, cfg.num_cameras, p - cfg.num_cameras * cfg.vision.tokens_per_image)
    cache.k[:, :, :, :p] = k
    cache.v[:, :, :, :p] = feeds["prefix_v"]
    cache.suffix_mask.copy_(feeds["suffix_mask"])
    cache.suffix_cos.copy_(feeds["suffix_cos"])
    cache.suffix_sin.copy_(feeds["suffix_sin"])
    return cache


@torch.no_grad()
def example_feeds(model: Pi0Model, stage: str, inputs: ModelInputs,
                  num_steps: int = 10) -> dict[str, torch.Tensor]:
    """Realistic inputs of ``stage`` for a request: upstream stages run eagerly."""
    feeds: dict[str, torch.Tensor] = {"images": inputs.images.float()}
    if stage == "vision":
        return feeds
    feeds = {"image_tokens": model.embed_images(inputs.images.float()),
             "image_masks": inputs.image_masks.bool(), "tokens": inputs.tokens.long(),
             "token_mask": inputs.token_mask.bool()}
    if stage == "prefix":
        return feeds
    feeds = dict(eager_stage(model, "prefix", feeds))
    feeds["state"] = inputs.state.float()
    if stage == "denoise":
        feeds["noise"] = inputs.noise.float()
        return feeds
    if stage == "denoise_step":
        conds = model.time_conditioning(num_steps)
        feeds["x_t"] = inputs.noise.float()
        feeds["modulation" if model.config.pi05 else "time_emb"] = step_conditioning(
            model, conds, 0)
        return feeds
    raise ValueError(f"unknown stage {stage!r}")


# -- export ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageExport:
    """One exported stage: where it is and the configuration its static shapes come from."""

    stage: str
    path: Path
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    num_cameras: int
    prompt_len: int  # 0 for vision
    num_steps: int  # 0 unless stage == "denoise"
    dtype: str  # the model's activation dtype at export ("float32" / "bfloat16")
    opset: int
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return stage_id(self.stage, self.num_cameras, self.prompt_len, self.num_steps)


@torch.no_grad()
def export_stage(model: Pi0Model, stage: str, out_dir: str | Path, *,
                 num_cameras: int | None = None, prompt_len: int | None = None,
                 num_steps: int = 10, opset: int = DEFAULT_OPSET,
                 batch: int = EXPORT_BATCH) -> StageExport:
    """Export one stage to ``out_dir/<stage_id>/model.onnx`` (large weights go to external data
    files in that folder; TensorRT's parser and onnxruntime read them from there).

    The batch axis is dynamic; everything else is fixed by (cameras, prompt length, steps)."""
    if opset < 17:
        raise ValueError(f"opset {opset} < 17 (LayerNormalization needs 17)")
    cfg = model.config
    n = num_cameras or cfg.num_cameras
    L = prompt_len or cfg.max_token_len
    steps = num_steps if stage == "denoise" else 0
    inputs_io, outputs_io = stage_io(stage, cfg.pi05)
    model = model.eval()
    if n != cfg.num_cameras:
        raise ValueError(f"the model is configured for {cfg.num_cameras} cameras, asked to export "
                         f"{n}; build it with cameras=... for that camera set")
    request = dummy_inputs(cfg, batch, n, L, prompt_len=L, seed=0)
    feeds = example_feeds(model, stage, request, num_steps)
    args = tuple(feeds[name] for name in inputs_io)
    module = stage_module(model, stage, num_steps).eval()
    dynamic_axes = {name: {batch_axis(name): "batch"} for name in inputs_io + outputs_io
                    if batch_axis(name) is not None}
    folder = Path(out_dir) / stage_id(stage, n, L if stage != "vision" else 0, steps)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # Tracer warnings about Python ints (shapes fixed by the config) and the legacy exporter.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                          input_names=list(inputs_io), output_names=list(outputs_io),
                          dynamic_axes=dynamic_axes, do_constant_folding=True)
    seconds = time.perf_counter() - t0
    _set_io_shapes(path, stage_shapes(cfg, stage, L, n))
    log.info("exported %s in %.1f s -> %s", stage, seconds, path)
    return StageExport(stage, path, inputs_io, outputs_io, n, 0 if stage == "vision" else L,
                       steps, str(model.dtype).removeprefix("torch."), opset, seconds)


def _set_io_shapes(path: Path, shapes: Mapping[str, tuple[int | str, ...]]) -> None:
    """Write the known static output shapes into the graph (the tracer leaves generated symbolic
    names such as ``Reshapeimage_tokens_dim_1``); skipped when the onnx package is missing."""
    try:
        import onnx
    except ImportError:
        return
    proto = onnx.load(str(path), load_external_data=False)
    for value in list(proto.graph.input) + list(proto.graph.output):
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(shapes[value.name]):
            raise RuntimeError(f"exported {value.name} has rank {len(dims)}, expected "
                               f"{shapes[value.name]}")
        for dim, size in zip(dims, shapes[value.name]):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
    onnx.save(proto, str(path))


def export_all(model: Pi0Model, out_dir: str | Path, *, prompt_buckets: Sequence[int],
               num_steps: int = 10, opset: int = DEFAULT_OPSET, step_stage: bool = False,
               progress=None) -> list[StageExport]:
    """vision once; prefix and denoise (and optionally denoise_step) per prompt bucket."""
    jobs = [("vision", 0)]
    for L in prompt_buckets:
        jobs += [("prefix", L), ("denoise", L)] + ([("denoise_step", L)] if step_stage else [])
    done = []
    for i, (stage, L) in enumerate(jobs):
        if progress:
            progress(f"[{i + 1}/{len(jobs)}] exporting {stage}" + (f" (L={L})" if L else ""))
        done.append(export_stage(model, stage, out_dir, prompt_len=L or None,
                                 num_steps=num_steps, opset=opset))
        if progress:
            progress(f"    {done[-1].path} ({file_size(done[-1].path) / 2**20:.1f} MiB, "
                     f"{done[-1].seconds:.1f} s)")
    return done


def file_size(onnx_path: str | Path) -> int:
    """Bytes of an exported stage: the .onnx file plus its external data files."""
    return sum(f.stat().st_size for f in Path(onnx_path).parent.iterdir() if f.is_file())


# -- inspection (needs the onnx package) ----------------------------------------------------------
@dataclass(frozen=True)
class TensorDesc:
    name: str
    dtype: str  # onnx element type name: FLOAT, BFLOAT16, INT64, BOOL...
    shape: tuple[int | str, ...]  # ints, or the symbolic name of a dynamic axis


def onnx_io(path_or_model: Any) -> tuple[dict[str, TensorDesc], dict[str, TensorDesc]]:
    """(inputs, outputs) of an ONNX graph: dtype names and shapes with symbolic axes."""
    import onnx

    proto = path_or_model
    if not isinstance(proto, onnx.ModelProto):
        proto = onnx.load(str(path_or_model), load_external_data=False)

    def desc(value) -> TensorDesc:
        t = value.type.tensor_type
        dims = tuple(d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim)
        return TensorDesc(value.name, onnx.TensorProto.DataType.Name(t.elem_type), dims)

    initializers = {i.name for i in proto.graph.initializer}
    inputs = {v.name: desc(v) for v in proto.graph.input if v.name not in initializers}
    outputs = {v.name: desc(v) for v in proto.graph.output}
    return inputs, outputs
