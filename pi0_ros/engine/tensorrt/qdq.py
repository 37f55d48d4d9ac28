"""FP8 for TensorRT: calibrated Q/DQ (QuantizeLinear / DequantizeLinear) around every Gemma
linear of an exported stage, and the torch emulation of that graph.

TensorRT builds FP8 only from explicitly quantized graphs. ``calibrate_fp8`` measures static
activation ranges on requests, ``insert_fp8_qdq`` rewrites an exported stage with the Q/DQ pairs,
``fp8_emulation`` makes the torch model compute what the rewritten graph computes (the reference
it is checked against), and ``fp8_qdq_nodes`` finds the quantizers in a graph.

The quantization is ``engine/fp8.py``'s: its e4m3 format and range, its minimum scale, its
per-output-channel weight scales (``quantize_weight``), its Gemma linears and its calibration
(``calibrate_input_amax``); activations use the static per-tensor scale (``act_scale="static"``
there), here a graph constant. Scales are rounded to the graph's dtype (ONNX stores a Q/DQ scale
in its input's dtype) and the emulation uses the rounded values. SigLIP and the top-level
projections stay in the graph's dtype, as ``fp8.quantize_fp8`` does by default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from pathlib import Path
from collections.abc import Mapping, Sequence

import torch

from ...model import Pi0Model
from ..base import ModelInputs
from ..fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE, calibrate_input_amax, quantize_weight

FP8_OPSET = 19  # QuantizeLinear / DequantizeLinear with float8 types
QDQ_TARGETS = ("lm", "expert")  # the Gemma stacks (fp8.quantize_fp8's default targets)


@torch.no_grad()
def calibrate_fp8(model: Pi0Model, requests: Sequence[ModelInputs], num_steps: int = 10,
                  seed: int = 0) -> dict[str, float]:
    """Static activation ranges for the Q/DQ graph: ``fp8.calibrate_input_amax`` over the Gemma
    linears (max |input| over full ``sample_actions`` runs, every denoising step included), as
    Python floats. A request without noise gets the noise ``sample_actions`` would draw from a
    generator seeded ``seed + i``. Linears that never run (the last LM layer's q / o / MLP) are
    left out. Use real observations: ranges from random inputs are a placeholder."""
    cfg, dev = model.config, model.device
    filled = []
    for i, r in enumerate(requests):
        if r.noise is None:
            gen = torch.Generator(device=dev).manual_seed(seed + i)
            r = dataclasses.replace(r, noise=torch.randn(
                (r.batch_size, cfg.action_horizon, cfg.action_dim), generator=gen, device=dev,
                dtype=torch.float32))
        filled.append(r)
    amax = calibrate_input_amax(model, filled, num_steps, targets=QDQ_TARGETS)
    return {name: float(value) for name, value in amax.items()}


def weight_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scale (out,) of ``fp8.quantize_weight``, rounded to the weight's dtype
    (a Q/DQ scale is stored in the graph's dtype; the emulation uses the same rounded value)."""
    return quantize_weight(weight.detach())[1].to(weight.dtype)


def activation_scale(amax: float, dtype: torch.dtype) -> torch.Tensor:
    """Static per-tensor activation scale ``amax / 448`` in ``dtype`` (0-d)."""
    return torch.tensor(max(amax / FP8_MAX, MIN_SCALE), dtype=dtype)


def insert_fp8_qdq(src: str | Path, dst: str | Path, model: torch.nn.Module,
                   act_amax: Mapping[str, float]) -> int:
    """Rewrite an exported stage with FP8 (e4m3) Q/DQ around every calibrated linear's MatMul:
    weights per output channel (``weight_scale``, axis 1 of the [in, out] initializer),
    activations per tensor with the static calibrated scale (``activation_scale``). Scales are
    in the graph's dtype (float32 or bfloat16). The graph must be exported at opset >= 19.
    Weights are matched to modules by content, so node naming does not matter. Returns the
    number of quantized MatMuls."""
    import onnx

    proto = onnx.load(str(src))
    opset = {o.domain: o.version for o in proto.opset_import}.get("", 0)
    if opset < FP8_OPSET:
        raise ValueError(f"{src} has opset {opset}; FP8 Q/DQ needs >= {FP8_OPSET}")
    modules = dict(model.named_modules())
    weight_module = _weights_by_content(proto, modules, act_amax)
    # The exporter feeds a weight shared by several calls (the unrolled steps) through Identity.
    alias = {}
    for node in proto.graph.node:
        if node.op_type == "Identity":
            src_name = alias.get(node.input[0], node.input[0])
            if src_name in weight_module:
                alias[node.output[0]] = src_name
    new_inits, nodes, dq_weight, count = [], [], {}, 0
    for node in proto.graph.node:
        w_name = alias.get(node.input[1], node.input[1]) if node.op_type == "MatMul" else None
        if w_name in weight_module:
            module = modules[weight_module[w_name]]
            if w_name not in dq_weight:
                inits, qdq = _qdq(w_name, f"{w_name}_fp8", f"{w_name}_fp8",
                                  weight_scale(module.weight), axis=1)
                new_inits += inits
                nodes += qdq
                dq_weight[w_name] = f"{w_name}_fp8_dq"
            a = node.name or f"matmul{count}"
            scale = activation_scale(act_amax[weight_module[w_name]], module.weight.dtype)
            inits, qdq = _qdq(node.input[0], f"{a}_act", f"{a}_act_fp8", scale)
            new_inits += inits
            nodes += qdq
            node.input[0], node.input[1] = f"{a}_act_dq", dq_weight[w_name]
            count += 1
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(new_inits)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    big = proto.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit
    onnx.save(proto, str(dst), save_as_external_data=big, all_tensors_to_one_file=True,
              location=dst.name + ".data")
    return count


def _weights_by_content(proto, modules: Mapping[str, torch.nn.Module],
                        act_amax: Mapping[str, float]) -> dict[str, str]:
    """Initializer name -> module name, for the calibrated linears' [in, out] weights."""
    by_content = {}
    for name, amax in act_amax.items():
        if amax > 0:
            w = modules[name].weight.detach().t().contiguous()  # the exported [in, out] layout
            by_content[(tuple(w.shape), hashlib.sha1(_raw(w)).hexdigest())] = name
    found = {}
    for init in proto.graph.initializer:
        if init.raw_data and len(init.dims) == 2:
            key = (tuple(init.dims), hashlib.sha1(init.raw_data).hexdigest())
            if key in by_content:
                found[init.name] = by_content[key]
    return found


def _qdq(x: str, prefix: str, q: str, scale: torch.Tensor, axis: int | None = None):
    """Initializers and nodes of ``x`` -> QuantizeLinear -> ``q`` (e4m3, zero point 0) ->
    DequantizeLinear -> ``<prefix>_dq``; ``axis``: the per-channel axis of ``scale``."""
    from onnx import helper

    kw = {} if axis is None else {"axis": axis}
    s, z = f"{prefix}_scale", f"{prefix}_zero"
    inits = [_proto(s, scale), _proto(z, torch.zeros(scale.shape, dtype=FP8_DTYPE))]
    nodes = [helper.make_node("QuantizeLinear", [x, s, z], [q], name=f"{prefix}_q", **kw),
             helper.make_node("DequantizeLinear", [q, s, z], [f"{prefix}_dq"],
                              name=f"{prefix}_dq", **kw)]
    return inits, nodes


@contextlib.contextmanager
def fp8_emulation(model: torch.nn.Module, act_amax: Mapping[str, float]):
    """Within the block, the calibrated linears of ``model`` compute what the Q/DQ graph of
    ``insert_fp8_qdq`` computes (weights per output channel, activations with the static scale,
    e4m3 round-to-nearest with saturation, float32 math): the reference the quantized ONNX is
    checked against, and a way to see FP8's accuracy cost on CPU before building anything."""
    modules = dict(model.named_modules())
    patched = []
    for name, amax in act_amax.items():
        if amax <= 0:
            continue
        module = modules[name]
        w_scale = weight_scale(module.weight).float()[:, None]
        wq = _fake_fp8(module.weight.detach().float(), w_scale).to(module.weight.dtype)
        a_scale = float(activation_scale(amax, module.weight.dtype).float())

        def forward(x, wq=wq, a_scale=a_scale):
            return torch.nn.functional.linear(_fake_fp8(x.float(), a_scale).to(x.dtype), wq)

        patched.append(module)
        module.forward = forward
    try:
        yield model
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


def fp8_qdq_nodes(proto) -> list[str]:
    """Names of QuantizeLinear nodes producing float8 (zero point or output_dtype FP8)."""
    import onnx

    fp8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2}
    inits = {t.name: t.data_type for t in proto.graph.initializer}
    found = []
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        zp = node.input[2] if len(node.input) > 2 else ""
        if attrs.get("output_dtype") in fp8 or inits.get(zp) in fp8:
            found.append(node.name)
    return found


def _fake_fp8(x: torch.Tensor, scale) -> torch.Tensor:
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * scale


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _proto(name: str, t: torch.Tensor):
    from onnx import TensorProto, helper

    kind = {torch.float32: TensorProto.FLOAT, torch.bfloat16: TensorProto.BFLOAT16,
            FP8_DTYPE: TensorProto.FLOAT8E4M3FN}[t.dtype]
    return helper.make_tensor(name, kind, list(t.shape), _raw(t), raw=True)
