"""Roofline floor of one inference: FLOPs and bytes per stage, divided by the device's peaks.

For a configuration (geometry, batch B, cameras N, prompt bucket L, steps) each stage costs

* vision: B*N images through SigLIP + projector; weights read once (all images in one pass);
* prefix: B rows of P = N*T + L tokens through the LM (the last layer only projects K/V: its q,
  o and MLP are never computed); LM weights read once, embedding rows gathered, K/V written;
* denoise: per step, B rows of S suffix tokens through the expert, attending P + S keys: expert
  weights and the whole prefix K/V cache read once per step (no reuse across steps: the L2 is far
  smaller than the weights). The pi0.5 adaRMS modulation is precomputed at prepare time, so its
  37 ``dense`` layers are not part of an inference.

``floor_ms = max(flops / peak_flops, bytes / peak_bandwidth)`` per stage, summed over stages
(they are sequential). Bytes count weights, KV cache and stage inputs/outputs once - activation
traffic inside a stage is not counted, so the floor is a lower bound, not a prediction. FLOPs
count 2 per multiply-add; softmax / norms / elementwise are not counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from ..model import Pi0Config

log = logging.getLogger(__name__)

BYTES = {"float32": 4, "bfloat16": 2, "fp8": 1}


@dataclass(frozen=True)
class StageCost:
    flops: float
    bytes: float

    def floor_ms(self, tflops: float, gbps: float) -> float:
        return max(self.flops / (tflops * 1e12), self.bytes / (gbps * 1e9)) * 1e3

    def __add__(self, other: StageCost) -> StageCost:
        return StageCost(self.flops + other.flops, self.bytes + other.bytes)


@dataclass(frozen=True)
class DevicePeak:
    """Dense peaks: matmul TFLOP/s per precision (``None``: no such tensor cores) and DRAM GB/s.
    ``source``: "declared" (datasheet table), "measured" or "user"."""

    name: str
    tflops_float32: float
    tflops_bfloat16: float
    tflops_fp8: float | None
    gbps: float
    source: str = "declared"

    def tflops(self, precision: str) -> float:
        value = {"float32": self.tflops_float32, "bfloat16": self.tflops_bfloat16,
                 "fp8": self.tflops_fp8}[precision]
        if value is None:
            raise ValueError(f"{self.name} has no {precision} tensor cores")
        return value


# Datasheet dense peaks (no sparsity). float32 = TF32 tensor cores (torch "high" precision).
# Matched as substrings of torch.cuda.get_device_name(), in this order.
DECLARED_PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("GH200", 494.7, 989.4, 1978.9, 4000.0),
    DevicePeak("H200", 494.7, 989.4, 1978.9, 4800.0),
    DevicePeak("H100 NVL", 417.5, 835.0, 1670.0, 3900.0),
    DevicePeak("H100 PCIe", 378.0, 756.0, 1513.0, 2000.0),
    DevicePeak("H100", 494.7, 989.4, 1978.9, 3350.0),  # SXM5 ("H100 80GB HBM3")
    DevicePeak("B200", 1100.0, 2250.0, 4500.0, 8000.0),
    DevicePeak("A100-SXM4-80GB", 156.0, 312.0, None, 2039.0),
    DevicePeak("A100 80GB PCIe", 156.0, 312.0, None, 1935.0),
    DevicePeak("A100", 156.0, 312.0, None, 1555.0),
    DevicePeak("L40S", 183.0, 362.0, 733.0, 864.0),
    DevicePeak("L4", 60.0, 121.0, 242.0, 300.0),
)


def declared_peak(device_name: str) -> DevicePeak | None:
    for peak in DECLARED_PEAKS:
        if peak.name in device_name:
            return peak
    return None


def measure_peak(device: torch.device | str, seconds: float = 0.5) -> DevicePeak:
    """Measured matmul throughput (float32, bf16, fp8 where supported) and copy bandwidth.

    Small enough for CI on CPU (1024^2 matmuls, a 64 MB copy); large on CUDA (8192^2, 1 GB)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = 8192 if cuda else 512
    nbytes = (1 << 30) if cuda else (64 << 20)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def rate(fn, work: float) -> float:
        fn()
        sync()
        count, t0 = 0, time.perf_counter()
        while True:
            fn()
            count += 1
            if count >= 3:
                sync()
                if time.perf_counter() - t0 > seconds / 4:
                    break
        sync()
        return work * count / (time.perf_counter() - t0)

    flops = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        flops[name] = rate(lambda a=a, b=b: a @ b, 2.0 * n**3) / 1e12
    fp8 = None
    if cuda and torch.cuda.get_device_capability(device) >= (9, 0):
        a8 = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b8 = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device)
        fp8 = rate(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one,
                                            out_dtype=torch.bfloat16), 2.0 * n**3) / 1e12
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    gbps = rate(lambda: dst.copy_(src), 2.0 * nbytes) / 1e9  # read + write
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return DevicePeak(name, flops["float32"], flops["bfloat16"], fp8, gbps, "measured")


def device_peak(device: torch.device | str, *, tflops: float | None = None,
                gbps: float | None = None, measure: bool = False) -> DevicePeak:
    """Declared peaks for a known GPU, else measured; ``tflops`` / ``gbps`` override (the
    given TFLOP/s is used for every precision)."""
    device = torch.device(device)
    peak = None
    if device.type == "cuda" and not measure:
        peak = declared_peak(torch.cuda.get_device_name(device))
    if peak is None:
        peak = measure_peak(device)
    if tflops is not None or gbps is not None:
        t = tflops
        peak = DevicePeak(peak.name, t or peak.tflops_float32, t or peak.tflops_bfloat16,
                          t or peak.tflops_fp8, gbps or peak.gbps, "user")
    return peak


# -- costs --------------------------------------------------------------------------------------
def _gemma_layer_params(width: int, mlp: int, nh: int, nkv: int, dh: int) -> tuple[int, int]:
    """(attention projection params, MLP params) of one Gemma layer."""
    return width * (nh * dh + 2 * nkv * dh) + nh * dh * width, 3 * width * mlp


def vision_params(cfg: Pi0Config) -> int:
    v = cfg.vision
    patch = v.num_channels * v.patch_size**2 * v.width + v.width
    layer = 4 * (v.width * v.width + v.width) + 2 * v.width * v.mlp_dim + v.mlp_dim + v.width
    layer += 4 * v.width  # two LayerNorms
    return (patch + v.tokens_per_image * v.width + v.depth * layer + 2 * v.width
            + v.width * cfg.lm.width + cfg.lm.width)


def stage_costs(cfg: Pi0Config, *, batch: int, num_cameras: int, prompt_len: int,
                num_steps: int, precision: str = "bfloat16") -> dict[str, StageCost]:
    """FLOPs and minimum bytes of vision / prefix / denoise (all steps) for one inference.

    ``precision``: "float32", "bfloat16" or "fp8" (fp8: LM and expert linear weights 1 byte,
    activations / KV / vision bf16)."""
    wb = BYTES[precision]  # LM / expert linear weights
    ab = 4 if precision == "float32" else 2  # activations, KV cache, vision weights
    v, lm, ex = cfg.vision, cfg.lm, cfg.expert
    t = v.tokens_per_image
    imgs = batch * num_cameras

    # vision: conv patchify + encoder + projector
    layer_macs = 4 * t * v.width**2 + 2 * t * t * v.width + 2 * t * v.width * v.mlp_dim
    macs = t * v.num_channels * v.patch_size**2 * v.width + v.depth * layer_macs
    macs += t * v.width * lm.width
    vision = StageCost(
        2.0 * imgs * macs,
        vision_params(cfg) * ab + imgs * v.num_channels * v.image_size**2 * 4
        + imgs * t * lm.width * ab)

    # prefix: depth-1 full LM layers + K/V of the last one
    p = num_cameras * t + prompt_len
    nh, nkv, dh = lm.num_heads, lm.num_kv_heads, lm.head_dim
    attn_w, mlp_w = _gemma_layer_params(lm.width, lm.mlp_dim, nh, nkv, dh)
    kv_w = lm.width * 2 * nkv * dh
    full = (attn_w + mlp_w) * p + 2 * nh * p * p * dh  # per row
    macs = (lm.depth - 1) * full + kv_w * p
    weight_bytes = ((lm.depth - 1) * (attn_w + mlp_w) + kv_w) * wb + prompt_len * lm.width * ab
    kv_bytes = batch * lm.depth * 2 * nkv * p * dh * ab
    prefix = StageCost(2.0 * batch * macs,
                       weight_bytes * 1.0 + kv_bytes + batch * num_cameras * t * lm.width * ab)

    # denoise: num_steps expert passes over the suffix, attending the cached prefix
    s, h, a, we = cfg.suffix_len, cfg.action_horizon, cfg.action_dim, ex.width
    attn_w, mlp_w = _gemma_layer_params(we, ex.mlp_dim, ex.num_heads, ex.num_kv_heads,
                                        ex.head_dim)
    k = p + s
    layer_macs = (attn_w + mlp_w) * s + 2 * ex.num_heads * s * k * ex.head_dim
    proj_w = a * we + we * a  # action_in / action_out (float32)
    if not cfg.pi05:
        proj_w += 2 * we * we + we * we  # action_time_mlp_in / _out
        proj_macs = 2 * h * a * we + h * 3 * we * we + a * we  # + state_proj (1 token)
        proj_w += a * we
    else:
        proj_macs = 2 * h * a * we
    step_macs = ex.depth * layer_macs + proj_macs
    step_bytes = (ex.depth * (attn_w + mlp_w) * wb + proj_w * 4
                  + batch * ex.depth * 2 * ex.num_kv_heads * k * ex.head_dim * ab)
    denoise = StageCost(2.0 * batch * step_macs * num_steps,
                        num_steps * step_bytes + 2.0 * batch * h * a * 4)
    return {"vision": vision, "prefix": prefix, "denoise": denoise}


def roofline(cfg: Pi0Config, peak: DevicePeak, *, batch: int, num_cameras: int,
             prompt_len: int, num_steps: int, precision: str = "bfloat16") -> dict:
    """Per stage and total: GFLOP, MB, floor_ms (and which bound), on ``peak``."""
    costs = stage_costs(cfg, batch=batch, num_cameras=num_cameras, prompt_len=prompt_len,
                        num_steps=num_steps, precision=precision)
    # Vision stays bf16 under fp8; float32 matmuls use the float32 (TF32) peak.
    out: dict[str, dict] = {}
    total_ms = 0.0
    for stage, cost in costs.items():
        prec = "bfloat16" if (stage == "vision" and precision == "fp8") else precision
        tflops = peak.tflops(prec) if prec != "fp8" or peak.tflops_fp8 else peak.tflops_bfloat16
        compute_ms = cost.flops / (tflops * 1e12) * 1e3
        memory_ms = cost.bytes / (peak.gbps * 1e9) * 1e3
        floor = max(compute_ms, memory_ms)
        total_ms += floor
        out[stage] = {"gflop": cost.flops / 1e9, "mbytes": cost.bytes / 1e6,
                      "compute_ms": compute_ms, "memory_ms": memory_ms, "floor_ms": floor,
                      "bound": "compute" if compute_ms >= memory_ms else "memory"}
    total = sum(costs.values(), StageCost(0.0, 0.0))
    out["total"] = {"gflop": total.flops / 1e9, "mbytes": total.bytes / 1e6,
                    "floor_ms": total_ms}
    out["peak"] = asdict(peak)
    out["precision"] = precision
    return out


def ratio_to_floor(measured_ms: Mapping[str, float], floors: Mapping[str, Mapping]) -> dict:
    """measured / floor per stage and total (1.0 = at the roofline)."""
    return {stage: measured_ms[stage] / floors[stage]["floor_ms"]
            for stage in measured_ms if stage in floors and floors[stage]["floor_ms"] > 0}


# -- kernel counts ------------------------------------------------------------------------------
# aten ops that only make views / aliases (no kernel launch).
_VIEW_OPS = frozenset((
    "view", "_unsafe_view", "reshape", "_reshape_alias", "transpose", "t", "expand", "unsqueeze",
    "squeeze", "slice", "select", "as_strided", "alias", "permute", "detach", "unbind", "split",
    "split_with_sizes", "chunk", "unflatten", "flatten", "lift_fresh", "empty", "empty_like",
    "empty_strided"))


def count_kernels(cfg: Pi0Config, *, batch: int, num_cameras: int, prompt_len: int,
                  num_steps: int, dtype: str = "bfloat16") -> dict[str, int]:
    """Non-view aten ops per stage of the eager model (~ kernel launches without fusion), from
    one pass on the meta device (no memory, no compute). A CUDA graph removes the CPU launch
    cost but keeps one GPU kernel per op, each with a few microseconds of minimum duration, so
    thousands of them are a latency floor of their own; ``torch.compile`` fuses most of them.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    from ..model import Pi0Model

    class _Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in _VIEW_OPS:
                self.n += 1
            return func(*args, **(kwargs or {}))

    meta = torch.device("meta")
    with meta:
        model = Pi0Model(cfg)
    model.set_precision(dtype)
    s = cfg.vision.image_size
    counts = {}
    with torch.no_grad():
        images = torch.zeros(batch, num_cameras, cfg.vision.num_channels, s, s, device=meta)
        with _Count() as c:
            tokens = model.embed_images(images)
        counts["vision"] = c.n
        cache = model.new_cache(batch, num_cameras, prompt_len)
        masks = torch.ones(batch, num_cameras, dtype=torch.bool, device=meta)
        ids = torch.zeros(batch, prompt_len, dtype=torch.long, device=meta)
        ids_mask = torch.ones(batch, prompt_len, dtype=torch.bool, device=meta)
        with _Count() as c:
            model.fill_prefix(cache, tokens, masks, ids, ids_mask)
        counts["prefix"] = c.n
        conds = model.time_conditioning(num_steps)
        state = torch.zeros(batch, cfg.action_dim, device=meta)
        noise = torch.zeros(batch, cfg.action_horizon, cfg.action_dim, device=meta)
        with _Count() as c:
            model.denoise(cache, state, noise, conds)
        counts["denoise"] = c.n
    counts["total"] = sum(counts.values())
    return counts
