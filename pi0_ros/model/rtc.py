"""Real-time chunking (RTC): a new chunk that continues the one being executed.

Black, Galliker, Levine, "Real-Time Execution of Action Chunking Flow Policies" (2025). While a
chunk is computed, the executor keeps running the previous one; the first ``d`` actions of the
new chunk will never be executed (they are "frozen" to the previous chunk's) and the rest of the
overlap should agree with it. RTC inpaints that prefix during denoising with guidance through a
vector-Jacobian product (VJP) of the denoised estimate, weighted by a soft mask.

In openpi's convention (SEMANTICS.md; t = 1 noise, t = 0 data, ``x_t = t*eps + (1-t)*x0``,
velocity ``v = eps - x0``, Euler ``x_{t+dt} = x_t + dt*v`` with ``dt = -1/N``) one guided step is

    x0_hat = x_t - t * v(x_t)                                  # denoised estimate (exact for
                                                               # a perfect v on a straight path)
    g      = (W * (Y - x0_hat))^T  d x0_hat / d x_t            # VJP, (B, H, A)
    v_rtc  = v - min(beta, ((1-t)^2 + t^2) / (t * (1-t))) * g

``Y`` is the previous chunk aligned to the new observation time (``align_prefix``), ``W`` the soft
mask (``prefix_weights``): 1 on the ``d`` frozen actions, decaying over the rest of the overlap,
0 where the previous chunk has no action (so a short or absent previous chunk never pulls towards
zero, the "mean" of normalized actions). The weight is the paper's ``(1-tau)/(tau r_tau^2)``
with tau = 1 - t (it is symmetric in t <-> 1 - t) clipped at ``beta``. The sign: paper's v points
to the data, openpi's to the noise, and ``dt < 0``, so ``-w*g`` here is the paper's ``+w*g``.

Device side: ``RTCDenoiser.denoise`` has static shapes and no host synchronization: the delay
``d`` and the overlap length are tensors (``RTCPrefix``), the per-step weights are Python floats
of the fixed time grid. With RTC off, or no previous chunk (``valid_len == 0``), the output is
bit-identical to ``Pi0Model.denoise`` (the VJP of a zero cotangent is exactly zero).
Host side (numpy): ``delay_from_latency`` (measured latency percentile -> d at the chunk's dt;
``DelayEstimator`` keeps the recent window) and ``align_prefix`` (previous chunk -> the new
chunk's time base).

Backends: RTC needs the backward of the action expert. ``eager`` runs it, ``cuda_graph`` can
capture it (no syncs, static buffers; capture not yet exercised on a GPU), the ONNX/TensorRT
stages are forward-only and FP8 GEMMs have no backward: ``check_backend`` refuses them at
configure. float32 and bfloat16 models both run it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .pi0 import Pi0Model, PrefixCache, TimeConditioning

logger = logging.getLogger(__name__)

# Soft-mask schedules over the overlap d <= i < n (n = previous actions available), as functions
# of c_i = (n - i) / (n - d + 1) in (0, 1): the paper's eq. (5) is "exp"; the others are
# LeRobot's names for the same knob ("zeros" = hard-frozen prefix only, "ones" = whole overlap).
SCHEDULES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "exp": lambda c: c * torch.expm1(c) / (math.e - 1.0),
    "linear": lambda c: c,
    "ones": torch.ones_like,
    "zeros": torch.zeros_like,
}

# Which engine backends can run the guided sampler (it needs autograd through the expert), and
# in which numeric formats (FP8 linears run torch._scaled_mm, which has no backward).
RTC_BACKENDS: dict[str, bool] = {"eager": True, "cuda_graph": True, "tensorrt": False}
RTC_PRECISIONS = ("float32", "bfloat16")
DEFAULT_MAX_GUIDANCE_WEIGHT = 5.0  # the paper's beta for 5..10 denoising steps


def rtc_supported(backend: str) -> bool:
    """True if the engine ``backend`` (a name of engine/registry.py BACKENDS) can run RTC."""
    return RTC_BACKENDS.get(backend, False)


def check_backend(backend: str, precision: str = "float32") -> None:
    """Refuse RTC at configure time on a backend / numeric format that cannot run the backward
    pass (names as in engine/registry.py BACKENDS / PRECISIONS)."""
    if not rtc_supported(backend):
        able = sorted(k for k, v in RTC_BACKENDS.items() if v)
        raise ValueError(f"rtc.enabled needs the action expert's backward (a vector-Jacobian "
                         f"product); model.backend '{backend}' cannot run it (ONNX/TensorRT "
                         f"stages are forward-only). Use one of {able} or disable RTC.")
    if precision not in RTC_PRECISIONS:
        raise ValueError(f"rtc.enabled: model.precision expected one of {RTC_PRECISIONS}, "
                         f"found {precision!r} (FP8 GEMMs have no backward)")


@dataclass(frozen=True)
class RTCConfig:
    """``enabled``: guide towards the previous chunk. ``max_guidance_weight``: beta, the clip
    of the guidance weight. ``schedule``: soft-mask shape over the overlap (``SCHEDULES``).
    ``max_delay``: upper bound of d (frozen actions); None = half the horizon, checked against
    the horizon by ``RTCDenoiser``. ``latency_percentile``: which percentile of the measured
    latencies sets d (``delay_from_latency``)."""

    enabled: bool = False
    max_guidance_weight: float = DEFAULT_MAX_GUIDANCE_WEIGHT
    schedule: str = "exp"
    max_delay: int | None = None
    latency_percentile: float = 95.0

    def __post_init__(self) -> None:
        beta = self.max_guidance_weight
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"rtc.max_guidance_weight: expected a finite number > 0, "
                             f"found {beta!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"rtc.schedule: expected one of {sorted(SCHEDULES)}, "
                             f"found {self.schedule!r}")
        if self.max_delay is not None and (not isinstance(self.max_delay, int)
                                           or self.max_delay < 0):
            raise ValueError(f"rtc.max_delay: expected an int >= 0 or None, "
                             f"found {self.max_delay!r}")
        if not 0.0 <= self.latency_percentile <= 100.0:
            raise ValueError(f"rtc.latency_percentile: expected a value in [0, 100], "
                             f"found {self.latency_percentile!r}")

    def delay_bound(self, horizon: int) -> int:
        bound = horizon // 2 if self.max_delay is None else self.max_delay
        if bound > horizon:
            raise ValueError(f"rtc.max_delay: expected <= action horizon {horizon}, "
                             f"found {bound}")
        return bound


def guidance_weight(t: float, beta: float) -> float:
    """min(beta, ((1-t)^2 + t^2) / (t (1-t))): the paper's (1-tau)/(tau r_tau^2), tau = 1 - t;
    infinite (so beta) at t = 1 and t = 0."""
    if t <= 0.0 or t >= 1.0:
        return float(beta)
    return float(min(beta, ((1.0 - t) ** 2 + t**2) / (t * (1.0 - t))))


def prefix_weights(delay: torch.Tensor, valid_len: torch.Tensor, horizon: int,
                   schedule: str = "exp") -> torch.Tensor:
    """Soft mask (B, H) float32 from delay d (B,) and overlap length n (B,) (int tensors):
    1 for i < d, SCHEDULES[schedule](c_i) for d <= i < n, 0 for i >= n (no previous action),
    c_i = (n - i) / (n - d + 1). Pure tensor ops: no host sync, capturable for any d, n."""
    i = torch.arange(horizon, device=delay.device, dtype=torch.float32)[None]  # (1, H)
    d = delay.to(torch.float32)[:, None]  # (B, 1)
    n = valid_len.to(torch.float32)[:, None]
    c = ((n - i) / (n - d + 1.0).clamp(min=1.0)).clamp(0.0, 1.0)
    w = torch.where(i < d, torch.ones_like(c), SCHEDULES[schedule](c))
    return torch.where(i < n, w, torch.zeros_like(w))


@dataclass
class RTCPrefix:
    """Static device inputs of a guided sampling (allocate once, ``load_`` per inference).

    ``actions`` (B, H, A) float32: previous chunk, normalized model space, aligned so that row i
    is meant for the new chunk's action i; ``delay`` (B,) int64: d; ``valid_len`` (B,) int64:
    rows [0, n) hold a previous action (n = 0: no previous chunk, no guidance); ``dim_mask``
    (B, A) float32: 1 on the action dims the previous chunk carries."""

    actions: torch.Tensor
    delay: torch.Tensor
    valid_len: torch.Tensor
    dim_mask: torch.Tensor

    @classmethod
    def empty(cls, batch: int, horizon: int, action_dim: int,
              device: torch.device | str = "cpu") -> RTCPrefix:
        z = dict(device=device)
        return cls(torch.zeros(batch, horizon, action_dim, **z),
                   torch.zeros(batch, dtype=torch.int64, **z),
                   torch.zeros(batch, dtype=torch.int64, **z),
                   torch.zeros(batch, action_dim, **z))

    def load_(self, rows: Sequence[AlignedPrefix | None]) -> RTCPrefix:
        """Copy host prefixes into the buffers in place (None: that row has no previous chunk)."""
        b, h, a = self.actions.shape
        if len(rows) != b:
            raise ValueError(f"rtc prefix rows: expected {b}, found {len(rows)}")
        actions = np.zeros((b, h, a), np.float32)
        dim_mask = np.zeros((b, a), np.float32)
        delay, valid = np.zeros(b, np.int64), np.zeros(b, np.int64)
        for r, p in enumerate(rows):
            if p is None:
                continue
            if p.actions.shape != (h, a):
                raise ValueError(f"rtc prefix actions: expected {(h, a)}, "
                                 f"found {p.actions.shape}")
            actions[r], dim_mask[r], delay[r], valid[r] = (p.actions, p.dim_mask, p.delay,
                                                           p.valid_len)
        for dst, src in ((self.actions, actions), (self.dim_mask, dim_mask),
                         (self.delay, delay), (self.valid_len, valid)):
            dst.copy_(torch.from_numpy(src), non_blocking=False)
        return self


class RTCDenoiser:
    """The guided Euler sampler over a ``Pi0Model``'s public stages.

        rtc = RTCDenoiser(model, RTCConfig(enabled=True))
        prefix = RTCPrefix.empty(B, H, A, device).load_([align_prefix(...)])
        actions = rtc.denoise(cache, state, noise, conds, prefix)   # (B, H, A) float32

    Autograd needs one thing the plain sampler does not: the expert writes its suffix keys /
    values into the K/V buffer in place, layer after layer, and all layers of ``cache.k`` share
    one version counter, so a backward would see "modified by an inplace operation". The
    denoiser therefore keeps per-layer copies (allocated once per cache shape, refreshed with
    ``copy_`` per observation: one extra prefix cache of memory, one copy per inference).
    Call it outside ``torch.inference_mode`` (autograd is enabled locally, also under no_grad).
    """

    def __init__(self, model: Pi0Model, config: RTCConfig):
        self.model, self.config = model, config
        self.max_delay = config.delay_bound(model.config.action_horizon)
        self._scratch: PrefixCache | None = None

    # -- per-layer cache copies (autograd-safe in-place suffix writes) ----------------------------
    def bind(self, cache: PrefixCache) -> PrefixCache:
        """A PrefixCache whose K/V are per-layer tensors holding ``cache``'s prefix."""
        s = self._scratch
        if s is None or s.k[0].shape != cache.k[0].shape or s.prefix_len != cache.prefix_len \
                or s.k[0].device != cache.k.device or s.k[0].dtype != cache.k.dtype:
            s = self._scratch = dataclasses.replace(
                cache, k=[torch.empty_like(x, memory_format=torch.contiguous_format)
                          for x in cache.k],
                v=[torch.empty_like(x, memory_format=torch.contiguous_format) for x in cache.v],
                suffix_mask=torch.empty_like(cache.suffix_mask),
                suffix_cos=torch.empty_like(cache.suffix_cos),
                suffix_sin=torch.empty_like(cache.suffix_sin))
        p = cache.prefix_len
        with torch.no_grad():
            for dst, src in zip(s.k + s.v, list(cache.k) + list(cache.v)):
                dst.detach_()
                dst[:, :, :p].copy_(src[:, :, :p])
            for name in ("suffix_mask", "suffix_cos", "suffix_sin"):
                getattr(s, name).copy_(getattr(cache, name))
        for name in ("pad_mask", "positions", "prefix_mask"):  # read-only, never saved
            setattr(s, name, getattr(cache, name))
        return s

    # -- one guided step --------------------------------------------------------------------------
    def guidance(self, scratch: PrefixCache, state: torch.Tensor, x_t: torch.Tensor,
                 conds: TimeConditioning, step: int, target: torch.Tensor,
                 weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (v, g): the velocity at x_t (B, H, A) and the VJP (W*(Y - x0_hat))^T dx0_hat/dx_t.
        ``scratch`` from ``bind``; target Y (B, H, A); weights W broadcastable to it."""
        t = conds.times[step]
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            v = self.model.denoise_step(scratch, state, x, conds, step)
            x0_hat = x - t * v
            cotangent = (target - x0_hat.detach()) * weights
            (g,) = torch.autograd.grad(x0_hat, x, cotangent)
        for buf in scratch.k + scratch.v:
            buf.detach_()  # drop the (already consumed) graph the in-place writes hung on it
        return v.detach(), g

    def weights(self, prefix: RTCPrefix) -> torch.Tensor:
        """(B, H, A) float32: the soft mask over time times the dims the prefix carries."""
        d = prefix.delay.clamp(0, self.max_delay)
        w = prefix_weights(d, prefix.valid_len, prefix.actions.shape[1], self.config.schedule)
        return w[:, :, None] * prefix.dim_mask[:, None, :]

    # -- the sampler ------------------------------------------------------------------------------
    def denoise(self, cache: PrefixCache, state: torch.Tensor, noise: torch.Tensor,
                conds: TimeConditioning, prefix: RTCPrefix | None) -> torch.Tensor:
        """Euler from x_1 = noise to x_0 with RTC guidance; ``Pi0Model.denoise`` when disabled or
        without a prefix. Same trip count, no host sync, shapes independent of d."""
        if not self.config.enabled or prefix is None:
            return self.model.denoise(cache, state, noise, conds)
        _check_autograd_usable(conds)
        state, noise = _normal(state), _normal(noise)  # e.g. made under Policy's inference_mode
        return self.integrate(self.bind(cache), state, noise, conds, prefix)

    def integrate(self, scratch: PrefixCache, state: torch.Tensor, noise: torch.Tensor,
                  conds: TimeConditioning, prefix: RTCPrefix) -> torch.Tensor:
        """The guided Euler loop on a cache from ``bind`` (also drives duck-typed toy models)."""
        weights, target = self.weights(prefix), prefix.actions
        beta = self.config.max_guidance_weight
        x = noise.float()
        for step in range(conds.num_steps):
            v, g = self.guidance(scratch, state, x, conds, step, target, weights)
            x = x + conds.dt * (v - guidance_weight(conds.times[step], beta) * g)
        return x


def _normal(t: torch.Tensor) -> torch.Tensor:
    """An inference tensor cannot be saved for backward; a clone made here is a normal one."""
    return t.clone() if t.is_inference() else t


def _check_autograd_usable(conds: TimeConditioning) -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError("RTC guidance needs autograd: call RTCDenoiser.denoise outside "
                           "torch.inference_mode() (torch.no_grad() is fine)")
    for name in ("time_emb", "cond", "modulation"):
        value = getattr(conds, name)
        if value is not None and value.is_inference():
            raise ValueError(f"conds.{name}: expected a normal tensor, found an inference "
                             f"tensor (build time_conditioning outside torch.inference_mode)")


# -- host side: the delay d and the aligned prefix ------------------------------------------------
def delay_from_latency(latencies_s: Sequence[float], dt: float, percentile: float = 95.0,
                       max_delay: int | None = None) -> int:
    """d = ceil(p / dt): the actions of the new chunk whose times t0 + i*dt fall before the
    chunk is available, p = the ``percentile`` of the measured latencies (observation stamp ->
    chunk at the executor, seconds; numpy's "higher" method: an observed value, never an
    interpolation below it). Clamped to ``max_delay`` with a warning."""
    lat = np.asarray(latencies_s, dtype=np.float64).ravel()
    if lat.size == 0:
        raise ValueError("latencies_s: expected at least one measured latency, found none")
    if not np.all(np.isfinite(lat)) or np.any(lat < 0):
        raise ValueError(f"latencies_s: expected finite values >= 0, found min {lat.min()!r}")
    if not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"dt: expected a finite value > 0 s, found {dt!r}")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile: expected a value in [0, 100], found {percentile!r}")
    p = float(np.percentile(lat, percentile, method="higher"))
    d = math.ceil(p / dt - 1e-9)  # a latency of exactly k*dt freezes k actions, not k + 1
    if max_delay is not None and d > max_delay:
        logger.warning("RTC delay %d actions (p%g latency %.1f ms at dt %.1f ms) exceeds "
                       "max_delay %d: clamped", d, percentile, p * 1e3, dt * 1e3, max_delay)
        d = max_delay
    return d


class DelayEstimator:
    """The last ``window`` measured latencies -> d for the next inference (host side, one
    owner: the pipeline's inference loop; not thread-safe by itself)."""

    def __init__(self, config: RTCConfig, horizon: int, window: int = 50):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"rtc latency window: expected an int >= 1, found {window!r}")
        self.percentile, self.max_delay = config.latency_percentile, config.delay_bound(horizon)
        self._latencies: deque[float] = deque(maxlen=window)

    def add(self, latency_s: float) -> None:
        """One measured latency: observation stamp -> chunk available to the executor (s)."""
        if not (math.isfinite(latency_s) and latency_s >= 0):
            raise ValueError(f"latency_s: expected a finite value >= 0, found {latency_s!r}")
        self._latencies.append(float(latency_s))

    def delay(self, dt: float, default: int = 0) -> int:
        """d at the chunk's ``dt``; ``default`` before any measurement (the first chunk has no
        previous one to continue, so its d is never used for guidance)."""
        if not self._latencies:
            return default
        return delay_from_latency(self._latencies, dt, self.percentile, self.max_delay)


@dataclass(frozen=True)
class AlignedPrefix:
    """A previous chunk on the new chunk's time base (host side, see ``align_prefix``)."""

    actions: np.ndarray  # (H, A) float32, zero outside [0, valid_len) x dims
    dim_mask: np.ndarray  # (A,) float32
    delay: int  # d: actions [0, d) are executed from the previous chunk
    valid_len: int  # rows [0, valid_len) have a previous action
    shift: float  # previous-chunk index that the new chunk's action 0 falls on


def align_prefix(prev_actions, prev_t0: float, obs_t0: float, dt: float, delay: int,
                 horizon: int, action_dim: int | None = None,
                 prev_dt: float | None = None) -> AlignedPrefix:
    """Previous chunk (Hp, a) (normalized model space; action k meant for prev_t0 + k*dt) ->
    the prefix row i meant for obs_t0 + i*dt. Whole-step shifts copy rows exactly; a fractional
    shift interpolates linearly between neighbouring rows (the executor's own reading between
    two actions is the same to first order). Rows past the previous chunk's end are invalid
    (``valid_len``) and dims past ``a`` too (``dim_mask``): no zero padding is ever a target."""
    prev = np.asarray(prev_actions, dtype=np.float64)
    if prev.ndim != 2 or prev.shape[0] < 1:
        raise ValueError(f"prev_actions: expected (H>=1, A), found shape {prev.shape}")
    a = prev.shape[1] if action_dim is None else action_dim
    if prev.shape[1] > a:
        raise ValueError(f"prev_actions: expected at most {a} dims, found {prev.shape[1]}")
    if not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"dt: expected a finite value > 0 s, found {dt!r}")
    if prev_dt is not None and abs(prev_dt - dt) > 1e-9 * dt:
        raise ValueError(f"prev_dt: expected the new chunk's dt {dt!r}, found {prev_dt!r}")
    if not isinstance(delay, (int, np.integer)) or not 0 <= delay <= horizon:
        raise ValueError(f"delay: expected an int in [0, {horizon}], found {delay!r}")
    shift = (obs_t0 - prev_t0) / dt
    if not math.isfinite(shift) or shift < -1e-6:
        raise ValueError(f"obs_t0: expected >= prev_t0 {prev_t0!r}, found {obs_t0!r}")
    if abs(shift - round(shift)) < 1e-6:
        shift = float(round(shift))
    last = prev.shape[0] - 1
    valid_len = int(min(horizon, max(0, math.floor(last - shift + 1e-9) + 1)))
    pos = shift + np.arange(valid_len)  # (n,) fractional rows of prev
    lo = np.minimum(np.floor(pos).astype(np.int64), last)
    hi = np.minimum(lo + 1, last)
    frac = (pos - lo)[:, None]
    out = np.zeros((horizon, a), np.float32)
    out[:valid_len, :prev.shape[1]] = prev[lo] * (1.0 - frac) + prev[hi] * frac
    dim_mask = np.zeros(a, np.float32)
    dim_mask[:prev.shape[1]] = 1.0
    if delay > valid_len:
        logger.warning("RTC delay %d exceeds the %d actions left of the previous chunk: the "
                       "executor will hold its last action", delay, valid_len)
    return AlignedPrefix(out, dim_mask, int(delay), valid_len, float(shift))


# LeRobot's prefix_attention_schedule names -> SCHEDULES.
LEROBOT_SCHEDULES = {"LINEAR": "linear", "EXP": "exp", "ZEROS": "zeros", "ONES": "ones"}


def from_lerobot(rtc_config, latency_percentile: float = 95.0) -> RTCConfig:
    """LeRobot's ``rtc_config`` of a policy config.json (``model.assets.RTCConfig``) as these
    settings: ``enabled``, ``max_guidance_weight`` and the schedule carry over. Its
    ``execution_horizon`` (a fixed number of executed actions) has no counterpart: here d is
    measured from the latency (``DelayEstimator``), bounded by ``max_delay``."""
    name = str(rtc_config.prefix_attention_schedule).upper()
    if name not in LEROBOT_SCHEDULES:
        raise ValueError(f"rtc_config.prefix_attention_schedule: expected one of "
                         f"{sorted(LEROBOT_SCHEDULES)}, found {name!r}")
    return RTCConfig(enabled=bool(rtc_config.enabled),
                     max_guidance_weight=float(rtc_config.max_guidance_weight),
                     schedule=LEROBOT_SCHEDULES[name], latency_percentile=latency_percentile)
