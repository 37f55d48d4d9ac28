"""FP8 (e4m3) linear layers for the Gemma stacks, applied as a module swap on a loaded model.

``quantize_fp8(model)`` replaces the ``nn.Linear`` layers of the LM and the action expert (q, k,
v, o, gate, up, down; no biases) with ``Fp8Linear``: weights stored as float8_e4m3fn with one
float32 scale per output channel (``scale = amax(|W[row]|) / 448``), activations quantized
dynamically per token (one scale per row of the flattened input) or per tensor, and the product
taken by ``torch._scaled_mm`` with row-wise scales (Hopper / Blackwell / Thor; the float32
accumulation is cuBLAS' / CUTLASS'). The model code is unaware: it calls ``self.q_proj(h)`` as
before. SigLIP stays BF16 by default (``targets=("vision", ...)`` opts it in).

On a device without FP8 tensor cores (and on CPU) ``emulate=True`` runs the same quantization as
a quantize-dequantize reference in float32 (``torch.float8_e4m3fn`` casts work on CPU), so the
accuracy math is testable anywhere; the native path is checked against it on GPU.

``compare_precisions`` measures the cost: actions of float32 / bf16 / fp8 copies of the same
weights on the same inputs and noise, max / mean |diff| against float32.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Pi0Model

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_MIN_SCALE = 1e-12  # an all-zero row / token gets this scale instead of 0 (no 0/0)
ACT_SCALES = ("per_token", "per_tensor")
TARGETS = ("lm", "expert", "vision")
_GEMMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_SIGLIP_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                   "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def fp8_supported(device: torch.device | str | None = None) -> bool:
    """Native row-wise scaled FP8 GEMMs: CUDA compute capability >= 9.0 (Hopper, Blackwell,
    Thor). Ada (8.9) has FP8 tensor cores but torch only offers tensor-wise scaling there."""
    if not torch.cuda.is_available():
        return False
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) -> e4m3 weight (out, in) and float32 per-output-channel scale (out,)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(_MIN_SCALE)
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_activation(x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> e4m3 (M, K) and float32 scales (M, 1): per token (row) or one for the tensor
    (broadcast to (M, 1) so one row-wise GEMM serves both). No host sync."""
    xf = x.float()
    if mode == "per_token":
        amax = xf.abs().amax(dim=1, keepdim=True)
    else:
        amax = xf.abs().amax().reshape(1, 1).expand(xf.shape[0], 1)
    scale = (amax / FP8_MAX).clamp_min(_MIN_SCALE)
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.contiguous()


class Fp8Linear(nn.Module):
    """y = x W^T (+ b) with W in e4m3 + per-channel scales and x quantized on the fly."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 act_dtype: torch.dtype, act_scale: str = "per_token", emulate: bool = False,
                 fast_accum: bool = False):
        super().__init__()
        if act_scale not in ACT_SCALES:
            raise ValueError(f"act_scale must be one of {ACT_SCALES}, got {act_scale!r}")
        out_features, in_features = weight.shape
        if not emulate and (in_features % 16 or out_features % 16):
            raise ValueError(f"FP8 GEMMs need in/out features divisible by 16, got "
                             f"{in_features}x{out_features}; use emulate=True")
        self.in_features, self.out_features = in_features, out_features
        self.act_scale, self.emulate, self.fast_accum = act_scale, emulate, fast_accum
        self.register_buffer("qweight", weight)  # (out, in) e4m3, row-major: .t() is col-major
        self.register_buffer("scale", scale.reshape(1, out_features).float().contiguous())
        self.register_buffer("bias", bias)
        # The model reads its activation dtype from `q_proj.weight.dtype`; keep that answer.
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=act_dtype,
                                                         device=weight.device))

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor of the activation dtype (the FP8 weight is ``qweight``)."""
        return self._dtype_probe

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, act_scale: str = "per_token",
                    emulate: bool = False, fast_accum: bool = False) -> Fp8Linear:
        q, scale = quantize_weight(linear.weight.data)
        bias = None if linear.bias is None else linear.bias.data
        return cls(q, scale, bias, linear.weight.dtype, act_scale, emulate, fast_accum)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.reshape(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, xs = quantize_activation(x.reshape(-1, self.in_features), self.act_scale)
        if self.emulate:
            y = F.linear(xq.float() * xs, self.dequantized_weight())
            if self.bias is not None:
                y = y + self.bias.float()
            y = y.to(x.dtype)
        else:
            y = torch._scaled_mm(xq, self.qweight.t(), scale_a=xs, scale_b=self.scale,
                                 bias=None, out_dtype=x.dtype, use_fast_accum=self.fast_accum)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"act_scale={self.act_scale}, emulate={self.emulate}")


def _linear_names(model: Pi0Model, targets: Iterable[str]) -> list[str]:
    names = []
    for target in targets:
        if target not in TARGETS:
            raise ValueError(f"unknown FP8 target {target!r}; expected some of {TARGETS}")
        stack = getattr(model, target)
        leaves = _SIGLIP_LINEARS if target == "vision" else _GEMMA_LINEARS
        names += [f"{target}.layers.{i}.{leaf}" for i in range(len(stack.layers))
                  for leaf in leaves]
    return names


def quantize_fp8(model: Pi0Model, *, targets: Iterable[str] = ("lm", "expert"),
                 act_scale: str = "per_token", emulate: bool | None = None,
                 fast_accum: bool = False) -> Pi0Model:
    """Swap the linear layers of ``targets`` for ``Fp8Linear`` in place; returns ``model``.

    ``emulate=None`` picks the native path where ``fp8_supported`` and the reference emulation
    elsewhere. Apply to a model already in its inference precision (bf16) on its device: the
    original weights are dropped, so LM + expert weight memory halves."""
    if emulate is None:
        emulate = not fp8_supported(model.device)
    elif not emulate and not fp8_supported(model.device):
        raise RuntimeError(f"native FP8 GEMMs need a CUDA device with compute capability >= 9.0 "
                           f"(model is on {model.device}); pass emulate=True for the reference")
    if not emulate and model.dtype != torch.bfloat16:
        raise ValueError(f"native FP8 layers produce bf16 (row-wise _scaled_mm); call "
                         f"set_precision('bfloat16') first (model is {model.dtype})")
    count = 0
    for name in _linear_names(model, tuple(targets)):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, leaf)
        if isinstance(linear, Fp8Linear):
            continue
        setattr(parent, leaf, Fp8Linear.from_linear(linear, act_scale=act_scale,
                                                    emulate=emulate, fast_accum=fast_accum))
        count += 1
    log.info("FP8: %d linear layers quantized (%s, activations %s, %s)", count,
             "+".join(targets), act_scale, "emulated" if emulate else "native _scaled_mm")
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Fp8Linear) for m in model.modules())


# -- accuracy -------------------------------------------------------------------------------------
def abs_diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    d = (a.float() - b.float()).abs()
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "ref_rms": float(b.float().square().mean().sqrt())}


@torch.no_grad()
def compare_precisions(model: Pi0Model, inputs, num_steps: int = 10, *,
                       variants: Iterable[str] = ("bfloat16", "fp8"),
                       act_scale: str = "per_token", emulate: bool | None = None,
                       targets: Iterable[str] = ("lm", "expert")) -> dict[str, Mapping]:
    """Accuracy of bf16 / fp8 against float32 on the same weights, inputs and noise.

    ``model``: a float32 model (kept untouched; each variant is a deep copy); ``inputs``: a
    ``ModelInputs`` with noise. Returns {variant: {max_abs, mean_abs, ref_rms}} for the actions
    against float32, plus ``"fp8_vs_bfloat16"`` when both are measured.
    """
    if model.dtype != torch.float32 or is_quantized(model):
        raise ValueError("compare_precisions needs the float32 model as the reference")
    if inputs.noise is None:
        raise ValueError("compare_precisions needs inputs with explicit noise")
    dev = model.device

    def run(m: Pi0Model) -> torch.Tensor:
        return m.sample_actions(inputs.images.to(dev), inputs.image_masks.to(dev),
                                inputs.tokens.to(dev), inputs.token_mask.to(dev),
                                inputs.state.to(dev), inputs.noise.to(dev),
                                num_steps=num_steps).float().cpu()

    ref = run(model)
    out: dict[str, Mapping] = {}
    actions: dict[str, torch.Tensor] = {}
    for variant in variants:
        m = copy.deepcopy(model)
        if variant == "float32":
            pass
        elif variant == "bfloat16":
            m.set_precision("bfloat16")
        elif variant == "fp8":
            quantize_fp8(m.set_precision("bfloat16"), targets=targets, act_scale=act_scale,
                         emulate=emulate)
        else:
            raise ValueError(f"unknown precision variant {variant!r}")
        actions[variant] = run(m)
        out[variant] = abs_diff(actions[variant], ref)
        del m
    if "fp8" in actions and "bfloat16" in actions:
        out["fp8_vs_bfloat16"] = abs_diff(actions["fp8"], actions["bfloat16"])
    return out
