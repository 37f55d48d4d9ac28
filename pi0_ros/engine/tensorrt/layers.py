"""Layer precisions: which layers a weakly typed FP16 / BF16 build must keep in float32
(``fp32_island``, applied by ``runtime.pin_fp32_islands``), and which precision each layer of a
built engine actually runs in (``summarize_layers`` over TensorRT's engine inspector JSON), so
that FP8 / FP16 silently falling back to FP32 is reported (TensorRT issue #4590 on Thor).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping

# Layers kept in float32 in weakly typed reduced-precision builds: every RMSNorm / LayerNorm
# (statistics and scaling), every attention core (logits, softmax), the additive masks (-2.4e38
# is -inf in fp16: a fully masked row becomes NaN), the RoPE tables (angles of positions ~1000
# have a resolution of 0.5 rad in fp16), the final norms. TensorRT names a parsed layer after
# its ONNX node (``/lm.0/input_layernorm/ReduceMean``, ``/expert.2/attention_core/Softmax``),
# sometimes with a suffix; the export wrappers give these scopes their names.
FP32_ISLAND_SCOPES = ("input_layernorm", "post_attention_layernorm", "layer_norm",
                      "post_layernorm", "attention_core", "attention_mask", "rope_tables",
                      "/self_attn/MatMul", "/self_attn/Softmax", "/self_attn/Mul")
# The stacks' final norms: ``/norm/...``, ``/final_norm/...`` or ``/norm_1/...`` (the exporter
# de-duplicates scope names).
_FINAL_NORM = re.compile(r"(^|/)(final_)?norm(_\d+)?/")


def fp32_island(layer_name: str) -> bool:
    """True for a layer a weakly typed FP16 / BF16 build must keep in float32."""
    return (any(scope in layer_name for scope in FP32_ISLAND_SCOPES)
            or _FINAL_NORM.search(layer_name) is not None)


# -- inspector report (pure) ---------------------------------------------------------------------
# Inspector "Format/Datatype" strings vary by version ("Row major linear FP16 format",
# "Half", "Float", "BFloat16", "N/A due to dynamic shapes"...): matched case-insensitively, in
# this order (bfloat16 / float16 before float).
_DTYPE_WORDS = (("fp8", "fp8"), ("float8", "fp8"), ("e4m3", "fp8"), ("bf16", "bf16"),
                ("bfloat16", "bf16"), ("fp16", "fp16"), ("float16", "fp16"), ("half", "fp16"),
                ("fp32", "fp32"), ("float", "fp32"), ("int8", "int8"), ("int32", "int32"),
                ("int64", "int64"), ("bool", "bool"))


def _dtype_of(format_string: str) -> str:
    text = format_string.lower()
    for word, dtype in _DTYPE_WORDS:
        if word in text:
            return dtype
    return "unknown"


@dataclass(frozen=True)
class LayerReport:
    """Built-engine layer precisions (output dtype of each layer, from the inspector)."""

    counts: Mapping[str, int]  # dtype -> number of layers
    matmul_counts: Mapping[str, int]  # same, for GEMM / convolution layers only
    fallback: bool  # requested reduced precision but no GEMM runs in it
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "matmul_counts": dict(self.matmul_counts),
                "fallback": self.fallback, "message": self.message}


_GEMM_TYPES = ("MatrixMultiply", "Convolution", "Gemm", "Myelin", "CaskGemm", "CaskConvolution")


def summarize_layers(info: Mapping[str, Any] | str | None, requested: str) -> LayerReport:
    """Count layer output dtypes in the engine inspector's JSON (``ProfilingVerbosity.DETAILED``
    builds: ``{"Layers": [{"Name", "LayerType", "Outputs": [{"Format/Datatype": ...}]}]}``;
    ``kLAYER_NAMES_ONLY`` builds give plain names and no dtypes). ``fallback`` is True when a
    reduced precision was requested and no GEMM-like layer produces it (TensorRT #4590)."""
    if info is None:
        return LayerReport({}, {}, False, "no inspector information")
    if isinstance(info, str):
        info = json.loads(info)
    counts: dict[str, int] = {}
    gemm: dict[str, int] = {}
    touched: set[str] = set()  # every dtype a layer reads or writes (an FP8 GEMM reads FP8)
    for layer in info.get("Layers", []):
        if not isinstance(layer, Mapping):
            continue
        outs = layer.get("Outputs") or []
        dtype = _dtype_of(str(outs[0].get("Format/Datatype", ""))) if outs else "unknown"
        counts[dtype] = counts.get(dtype, 0) + 1
        touched.update(_dtype_of(str(t.get("Format/Datatype", "")))
                       for t in list(outs) + list(layer.get("Inputs") or []))
        kind = str(layer.get("LayerType", "")) + " " + str(layer.get("TacticName", ""))
        if any(t in kind for t in _GEMM_TYPES):
            gemm[dtype] = gemm.get(dtype, 0) + 1
    want = {"fp32": None, "bf16": "bf16", "fp16": "fp16", "fp8": "fp8"}[requested]
    if set(counts) <= {"unknown"}:
        return LayerReport(counts, gemm, False, "inspector gave no per-layer dtypes (needs a "
                           "ProfilingVerbosity.DETAILED build and, with dynamic shapes, an "
                           "execution context with input shapes set)")
    if want == "fp8":  # FP8 GEMMs usually output bf16 / fp16: look at what layers read too
        fallback = want not in touched
    else:
        fallback = want is not None and (gemm or counts).get(want, 0) == 0
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    msg = f"layer output dtypes: {summary}"
    if fallback:
        msg += (f"; requested {requested} but no {'layer' if want == 'fp8' else 'GEMM'} runs in "
                f"{want}: the build fell back (TensorRT #4590 on Thor?)")
    return LayerReport(counts, gemm, fallback, msg)
