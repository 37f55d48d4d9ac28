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

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Pi0Model

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
MIN_SCALE = 1e-12  # an all-zero row / token gets this scale instead of 0 (no 0/0)
# per_token / per_tensor: scales computed from each activation on the fly (dynamic, ~8 extra
# elementwise / reduction kernels per linear); static: one calibrated float32 scale per linear
# (``calibrate_input_amax``), 3 kernels (scale, clamp, cast) and no reduction.
ACT_SCALES = ("per_token", "per_tensor", "static")
TARGETS = ("lm", "expert", "vision")
GEMMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_SIGLIP_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                   "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


_CPU_SCALED_MM: bool | None = None


def cpu_scaled_mm_supported() -> bool:
    """Whether this torch runs row-wise scaled ``torch._scaled_mm`` on CPU (2.13 does): the
    native ``Fp8Linear`` path can then be checked against its emulation without a GPU."""
    global _CPU_SCALED_MM
    if _CPU_SCALED_MM is None:
        try:
            a = torch.ones(16, 16, dtype=FP8_DTYPE)
            torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                             out_dtype=torch.float32)
            _CPU_SCALED_MM = True
        except (RuntimeError, NotImplementedError, TypeError):
            _CPU_SCALED_MM = False
    return _CPU_SCALED_MM


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
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(MIN_SCALE)
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_activation(x: torch.Tensor, mode: str,
                        input_scale: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> e4m3 (M, K) and float32 scales (M, 1): per token (row) or one for the tensor
    (broadcast to (M, 1) so one row-wise GEMM serves both). No host sync.

    ``static``: ``input_scale`` (1,) float32 is the calibrated scale; values past its range
    saturate at +-448 (the scale carries a margin). Three kernels: multiply, clamp, cast."""
    if mode == "static":
        if input_scale is None:
            raise ValueError("static activation quantization needs a calibrated input_scale")
        q = (x / input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return q, input_scale.reshape(1, 1).expand(x.shape[0], 1)
    xf = x.float()
    if mode == "per_token":
        amax = xf.abs().amax(dim=1, keepdim=True)
    else:
        amax = xf.abs().amax().reshape(1, 1).expand(xf.shape[0], 1)
    scale = (amax / FP8_MAX).clamp_min(MIN_SCALE)
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.contiguous()


class Fp8Linear(nn.Module):
    """y = x W^T (+ b) with W in e4m3 + per-channel scales and x quantized on the fly.

    ``_scaled_mm`` takes row-wise scales as scale_a (M, 1) and scale_b (1, N), both contiguous
    float32. With ``act_scale="static"`` the calibrated activation scale is folded into scale_b
    (``static_scale_b`` = input_scale * scale, (1, N)) and scale_a is a cached (M, 1) of ones, so
    the only per-call work besides the GEMM is multiply / clamp / cast of x.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 act_dtype: torch.dtype, act_scale: str = "per_token", emulate: bool = False,
                 fast_accum: bool = False, input_scale: torch.Tensor | None = None):
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
        if act_scale == "static":
            if input_scale is None:
                raise ValueError("Fp8Linear(act_scale='static') needs input_scale (calibrate "
                                 "with calibrate_input_amax)")
            input_scale = input_scale.detach().float().reshape(1).to(weight.device)
            self.register_buffer("input_scale", input_scale)
            self.register_buffer("static_scale_b", (self.scale * input_scale).contiguous())
        else:
            self.input_scale = None
        self._unit: dict[int, torch.Tensor] = {}  # M -> (M, 1) ones (static scale_a)

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor of the activation dtype (the FP8 weight is ``qweight``)."""
        return self._dtype_probe

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, act_scale: str = "per_token",
                    emulate: bool = False, fast_accum: bool = False,
                    input_amax: torch.Tensor | float | None = None,
                    margin: float = 1.0) -> Fp8Linear:
        """``input_amax`` (static only): the calibrated max |x| of this layer's input; the scale
        is ``margin * input_amax / 448``."""
        q, scale = quantize_weight(linear.weight.data)
        bias = None if linear.bias is None else linear.bias.data
        input_scale = None
        if act_scale == "static":
            if input_amax is None:
                raise ValueError("act_scale='static' needs input_amax (calibrate_input_amax)")
            amax = torch.as_tensor(input_amax, dtype=torch.float32).reshape(1)
            input_scale = (amax * margin / FP8_MAX).clamp_min(MIN_SCALE)
        return cls(q, scale, bias, linear.weight.dtype, act_scale, emulate, fast_accum,
                   input_scale)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.reshape(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, xs = quantize_activation(x.reshape(-1, self.in_features), self.act_scale,
                                     self.input_scale)
        if self.emulate:
            y = F.linear(xq.float() * xs, self.dequantized_weight())
            if self.bias is not None:
                y = y + self.bias.float()
            y = y.to(x.dtype)
        else:
            scale_a, scale_b = xs, self.scale
            if self.act_scale == "static":
                scale_a, scale_b = self._unit_scale(xq.shape[0]), self.static_scale_b
            y = torch._scaled_mm(xq, self.qweight.t(), scale_a=scale_a, scale_b=scale_b,
                                 bias=None, out_dtype=x.dtype, use_fast_accum=self.fast_accum)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _unit_scale(self, rows: int) -> torch.Tensor:
        # Cached per row count: allocated by the warm-up, before any graph capture, and then
        # only read (a constant, never a kernel per call).
        ones = self._unit.get(rows)
        if ones is None:
            ones = self._unit[rows] = torch.ones(rows, 1, device=self.qweight.device)
        return ones

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"act_scale={self.act_scale}, emulate={self.emulate}")


def linear_names(model: Pi0Model, targets: Iterable[str]) -> list[str]:
    """Module names of the linears FP8 quantizes in ``targets`` (also the ONNX Q/DQ targets)."""
    names = []
    for target in targets:
        if target not in TARGETS:
            raise ValueError(f"unknown FP8 target {target!r}; expected some of {TARGETS}")
        stack = getattr(model, target)
        leaves = _SIGLIP_LINEARS if target == "vision" else GEMMA_LINEARS
        names += [f"{target}.layers.{i}.{leaf}" for i in range(len(stack.layers))
                  for leaf in leaves]
    return names


def quantize_fp8(model: Pi0Model, *, targets: Iterable[str] = ("lm", "expert"),
                 act_scale: str = "per_token", emulate: bool | None = None,
                 fast_accum: bool = False, input_amax: Mapping[str, torch.Tensor] | None = None,
                 margin: float = 1.0) -> Pi0Model:
    """Swap the linear layers of ``targets`` for ``Fp8Linear`` in place; returns ``model``.

    ``emulate=None`` picks the native path where ``fp8_supported`` and the reference emulation
    elsewhere; ``emulate=False`` on CPU runs the native ``torch._scaled_mm`` where this torch has
    it (``cpu_scaled_mm_supported``; the CPU check of the GPU path). Apply to a model already in
    its inference precision (bf16) on its device: the original weights are dropped, so LM +
    expert weight memory halves. ``act_scale="static"`` needs ``input_amax`` (module name ->
    max |input|, from ``calibrate_input_amax``) and uses ``margin * amax / 448`` per layer."""
    # CPU: torch's own _scaled_mm (the CPU check of the GPU path); meta: nothing runs (counting).
    cpu_native = (model.device.type == "meta"
                  or (model.device.type == "cpu" and cpu_scaled_mm_supported()))
    if emulate is None:
        emulate = not fp8_supported(model.device)
    elif not emulate and not (fp8_supported(model.device) or cpu_native):
        raise RuntimeError(f"native FP8 GEMMs need a CUDA device with compute capability >= 9.0 "
                           f"(model is on {model.device}); pass emulate=True for the reference")
    if act_scale not in ACT_SCALES:
        raise ValueError(f"act_scale must be one of {ACT_SCALES}, got {act_scale!r}")
    names = linear_names(model, tuple(targets))
    if act_scale == "static":
        if not input_amax:
            raise ValueError("act_scale='static' needs input_amax (module name -> max |input|, "
                             "from calibrate_input_amax)")
        # Layers the calibration never ran (the last LM layer's q / o / MLP: only its K/V are
        # read) keep dynamic per-token scales; they do not run at inference either.
        unseen = [n for n in names if n not in input_amax]
        if unseen:
            log.info("FP8 static: %d linear(s) never ran during calibration keep per-token "
                     "scales (e.g. %s)", len(unseen), unseen[0])
    if not emulate and not cpu_native and model.dtype != torch.bfloat16:
        raise ValueError(f"native FP8 layers produce bf16 (row-wise _scaled_mm); call "
                         f"set_precision('bfloat16') first (model is {model.dtype})")
    count = 0
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, leaf)
        if isinstance(linear, Fp8Linear):
            continue
        mode, amax = act_scale, None
        if act_scale == "static":
            amax = input_amax.get(name)
            mode = "static" if amax is not None else "per_token"
        setattr(parent, leaf, Fp8Linear.from_linear(linear, act_scale=mode,
                                                    emulate=emulate, fast_accum=fast_accum,
                                                    input_amax=amax, margin=margin))
        count += 1
    log.info("FP8: %d linear layers quantized (%s, activations %s, %s)", count,
             "+".join(targets), act_scale, "emulated" if emulate else "native _scaled_mm")
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Fp8Linear) for m in model.modules())


@torch.no_grad()
def calibrate_input_amax(model: Pi0Model, requests: Iterable, num_steps: int = 10, *,
                         targets: Iterable[str] = ("lm", "expert")) -> dict[str, torch.Tensor]:
    """Max |input| of every FP8 target linear over ``requests`` (``ModelInputs`` with noise),
    every denoising step included: the per-tensor static activation scales.

    Run on the model in the precision it will serve in (bf16) before ``quantize_fp8``; the
    amax values are float32 tensors on the model's device, read back by nothing (no sync)."""
    names = linear_names(model, tuple(targets))
    amax: dict[str, torch.Tensor] = {}
    hooks = []

    def observer(name: str):
        def hook(module, args):
            value = args[0].detach().abs().amax().float()
            amax[name] = value if name not in amax else torch.maximum(amax[name], value)
        return hook

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(observer(name)))
    dev = model.device
    try:
        count = 0
        for x in requests:
            if x.noise is None:
                raise ValueError("calibrate_input_amax needs requests with explicit noise")
            model.sample_actions(x.images.to(dev), x.image_masks.to(dev), x.tokens.to(dev),
                                 x.token_mask.to(dev), x.state.to(dev), x.noise.to(dev),
                                 num_steps=num_steps)
            count += 1
    finally:
        for h in hooks:
            h.remove()
    if not count:
        raise ValueError("calibrate_input_amax needs at least one request")
    return amax


# -- accuracy -------------------------------------------------------------------------------------
@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Float32 really float32 on CUDA: TF32 off for matmuls *and* cuDNN convolutions (the SigLIP
    patch embedding runs in TF32 by default on Ampere+, ~2.7e-4 on the openpi fixture)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def abs_diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    d = (a.float() - b.float()).abs()
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "ref_rms": float(b.float().square().mean().sqrt())}


@torch.no_grad()
def compare_precisions(model: Pi0Model, inputs, num_steps: int = 10, *,
                       variants: Iterable[str] = ("bfloat16", "fp8"),
                       act_scale: str = "per_token", emulate: bool | None = None,
                       targets: Iterable[str] = ("lm", "expert"),
                       calibration: Iterable | None = None,
                       margin: float = 1.0) -> dict[str, Mapping]:
    """Accuracy of bf16 / fp8 against float32 on the same weights, inputs and noise.

    ``model``: a float32 model (kept untouched; each variant is a deep copy); ``inputs``: a
    ``ModelInputs`` with noise. Variants: ``float32``, ``bfloat16``, ``fp8`` (dynamic
    ``act_scale``), ``fp8_static`` (per-tensor scales calibrated on ``calibration`` requests,
    default: ``inputs`` itself, i.e. the optimistic case). Returns {variant: {max_abs, mean_abs,
    ref_rms}} for the actions against float32, plus ``"<fp8 variant>_vs_bfloat16"``.
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

    with no_tf32():
        ref = run(model)
    out: dict[str, Mapping] = {}
    actions: dict[str, torch.Tensor] = {}
    for variant in variants:
        m = copy.deepcopy(model)
        if variant == "float32":
            pass
        elif variant == "bfloat16":
            m.set_precision("bfloat16")
        elif variant in ("fp8", "fp8_static"):
            m.set_precision("bfloat16")
            amax, mode = None, act_scale
            if variant == "fp8_static":
                mode = "static"
                amax = calibrate_input_amax(m, list(calibration or [inputs]), num_steps,
                                            targets=targets)
            quantize_fp8(m, targets=targets, act_scale=mode, emulate=emulate, input_amax=amax,
                         margin=margin)
        else:
            raise ValueError(f"unknown precision variant {variant!r}")
        actions[variant] = run(m)
        out[variant] = abs_diff(actions[variant], ref)
        del m
    for variant in ("fp8", "fp8_static"):
        if variant in actions and "bfloat16" in actions:
            out[f"{variant}_vs_bfloat16"] = abs_diff(actions[variant], actions["bfloat16"])
    return out
