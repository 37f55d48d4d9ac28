"""Real-time chunking (pi0_ros/model/rtc.py): exactness when off, prefix inpainting, the VJP
against finite differences, capture safety, and the host-side delay / alignment helpers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pi0_ros.model import Pi0Model, random_init_, tiny_config
from pi0_ros.model.rtc import (RTC_BACKENDS, SCHEDULES, AlignedPrefix, DelayEstimator, RTCConfig,
                               RTCDenoiser, RTCPrefix, align_prefix, check_backend,
                               delay_from_latency, guidance_weight, prefix_weights)

STEPS = 10
# Frozen prefix (first d actions) after guided sampling with the default beta = 5, as a fraction
# of the disagreement of an unguided chunk from the same observation (other noise). RTC is a
# soft guidance, not a hard replacement: in the locally linear regime (dx0_hat/dx_t ~ I) each
# Euler step removes a fraction beta*|dt| = 0.5 of the remaining residual Y - x0_hat, and the
# last step leaves half of the residual of the model's final estimate, so the result is close,
# never equal. Measured on the tiny random models (3 seeds, pi0 and pi0.5, d = 1 and H/2): RMS
# ratio 0.035-0.061, max ratio 0.045-0.094; the bounds leave ~1.6x margin.
PREFIX_RMS_RATIO = 0.1
PREFIX_MAX_RATIO = 0.15
# float64 central differences, h = 1e-5: truncation ~h^2 = 1e-10, rounding ~1e-16/h = 1e-11.
FD64_RTOL = 1e-7
# float32 tiny model, directional derivative, h = 1e-2: rounding ~ |x0| * 6e-8 / h ~ 3e-5 on
# values ~5, truncation ~h^2 * |d3 x0| (measured < 1e-4); relative to |g.u| ~ 1..10.
FD32_RTOL = 5e-3
BF16_REL = 2e-2  # bf16 vs f32: max |diff| <= 2e-2 * max(1, max |actions|) (test_model.py)
BATCH_ATOL = 1e-5  # a row of a batch vs a batch of 1, guided: measured 1.1e-6
SDPA_ATOL = 1e-5  # guided chunk, sdpa vs eager attention, float32: measured 4.8e-7 (~5 sized)


# -- fixtures -------------------------------------------------------------------------------------
def _setup(pi05: bool, seed: int = 0):
    cfg = tiny_config(pi05=pi05, num_cameras=2)
    model = random_init_(Pi0Model(cfg), seed).eval()
    g = torch.Generator().manual_seed(seed + 100)
    s, length = cfg.vision.image_size, cfg.max_token_len
    token_mask = torch.zeros(1, length, dtype=torch.bool)
    token_mask[:, :13] = True
    tokens = torch.where(token_mask, torch.randint(3, cfg.lm.vocab_size, (1, length),
                                                   generator=g), 0)
    images = torch.rand(1, 2, 3, s, s, generator=g) * 2 - 1
    image_masks = torch.ones(1, 2, dtype=torch.bool)
    state = torch.randn(1, cfg.action_dim, generator=g)
    with torch.no_grad():
        cache = model.new_cache(1, 2, length)
        model.fill_prefix(cache, model.embed_images(images), image_masks, tokens, token_mask)
    noises = torch.randn(2, 1, cfg.action_horizon, cfg.action_dim, generator=g)
    t = SimpleNamespace(model=model, cfg=cfg, cache=cache, state=state, images=images,
                        image_masks=image_masks, tokens=tokens, token_mask=token_mask,
                        noise=noises[1], conds=model.time_conditioning(STEPS))
    # The chunk being executed: same observation, other noise (so it disagrees).
    t.prev, t.plain = _plain(t, noises[0]), _plain(t)
    return t


@pytest.fixture(scope="module", params=[True, False], ids=["pi05", "pi0"])
def tiny(request):
    return _setup(request.param)


def _plain(t, noise=None):
    with torch.no_grad():
        return t.model.denoise(t.cache, t.state, t.noise if noise is None else noise, t.conds)


def _prefix(t, prev, delay, obs_shift=0, valid_dims=None):
    """The previous chunk ``prev`` (1, H, A) as a loaded RTCPrefix (obs ``obs_shift`` steps on)."""
    h, a = t.cfg.action_horizon, t.cfg.action_dim
    rows = prev[0].numpy() if valid_dims is None else prev[0, :, :valid_dims].numpy()
    aligned = align_prefix(rows, 0.0, obs_shift * 0.02, 0.02, delay, h, a)
    return RTCPrefix.empty(1, h, a).load_([aligned])


def _rtc(t, prefix, **cfg):
    cfg.setdefault("enabled", True)
    with torch.no_grad():
        return RTCDenoiser(t.model, RTCConfig(**cfg)).denoise(t.cache, t.state, t.noise,
                                                              t.conds, prefix)


# -- exactness when off ---------------------------------------------------------------------------
def test_disabled_is_bit_identical_to_sample_actions(tiny):
    prev = tiny.prev
    out = _rtc(tiny, _prefix(tiny, prev, 3), enabled=False)
    with torch.no_grad():
        sampled = tiny.model.sample_actions(tiny.images, tiny.image_masks, tiny.tokens,
                                            tiny.token_mask, tiny.state, noise=tiny.noise,
                                            num_steps=STEPS)
    assert torch.equal(out, tiny.plain)
    assert torch.equal(out, sampled)


def test_no_previous_chunk_is_bit_identical(tiny):
    """RTC on, but no previous chunk: an empty prefix, or garbage with valid_len = 0, or the
    previous chunk entirely in the past (shift >= its length)."""
    plain = tiny.plain
    empty = RTCPrefix.empty(1, tiny.cfg.action_horizon, tiny.cfg.action_dim)
    assert torch.equal(_rtc(tiny, empty), plain)
    garbage = RTCPrefix.empty(1, tiny.cfg.action_horizon, tiny.cfg.action_dim)
    garbage.actions.normal_(0.0, 10.0)
    garbage.dim_mask.fill_(1.0)
    garbage.delay.fill_(5)
    assert torch.equal(_rtc(tiny, garbage), plain)
    prev = tiny.prev
    past = _prefix(tiny, prev, 0, obs_shift=tiny.cfg.action_horizon)
    assert int(past.valid_len) == 0
    assert torch.equal(_rtc(tiny, past), plain)


def test_zeros_schedule_with_no_delay_is_bit_identical(tiny):
    prev = tiny.prev
    assert torch.equal(_rtc(tiny, _prefix(tiny, prev, 0), schedule="zeros"), tiny.plain)


# -- inpainting the committed prefix --------------------------------------------------------------
@pytest.mark.parametrize("delay", [0, 1, "half"])
def test_frozen_prefix_matches_previous_chunk(tiny, delay):
    h = tiny.cfg.action_horizon
    d = h // 2 if delay == "half" else delay
    prev = tiny.prev
    unguided, guided = tiny.plain, _rtc(tiny, _prefix(tiny, prev, d))
    if d == 0:
        # Nothing frozen; the exp schedule still weighs the seam (i = 0) at ~0.94: pulled in.
        seam = lambda x: (x - prev)[:, 0].abs().max()  # noqa: E731
        assert seam(guided) < 0.5 * seam(unguided)
        return
    err, ref = (guided - prev)[:, :d], (unguided - prev)[:, :d]
    rms = lambda x: x.pow(2).mean().sqrt()  # noqa: E731
    assert rms(err) <= PREFIX_RMS_RATIO * rms(ref), (rms(err), rms(ref))
    assert err.abs().max() <= PREFIX_MAX_RATIO * ref.abs().max(), (err.abs().max(),
                                                                    ref.abs().max())


def test_shifted_observation_guides_towards_the_aligned_rows(tiny):
    """New observation 4 steps after the previous chunk's: row i targets previous row i + 4."""
    prev, d, k = tiny.prev, 6, 4
    guided = _rtc(tiny, _prefix(tiny, prev, d, obs_shift=k))
    aligned_err = (guided[:, :d] - prev[:, k:k + d]).abs().max()
    unaligned_err = (guided[:, :d] - prev[:, :d]).abs().max()
    assert aligned_err < 0.2 * unaligned_err


def test_positions_without_previous_action_have_no_influence(tiny):
    """A short previous chunk (or fewer dims) must not pull the rest towards zero (the mean of
    normalized actions): whatever lies past valid_len / dim_mask changes nothing."""
    h, a = tiny.cfg.action_horizon, tiny.cfg.action_dim
    prev = tiny.prev
    short = align_prefix(prev[0, :10, :7].numpy(), 0.0, 0.0, 0.02, 5, h, a)
    assert short.valid_len == 10 and short.dim_mask.sum() == 7
    zero_padded = RTCPrefix.empty(1, h, a).load_([short])
    other_padding = RTCPrefix.empty(1, h, a).load_([short])
    other_padding.actions[:, 10:].normal_(0.0, 5.0)
    other_padding.actions[:, :, 7:].normal_(0.0, 5.0)
    out = _rtc(tiny, zero_padded)
    assert torch.equal(out, _rtc(tiny, other_padding))
    assert not torch.equal(out, tiny.plain)  # the valid part does guide


def test_batch_rows_are_guided_independently(tiny):
    """Batch of 3: d = 4; d = 12 with the observation 3 steps on; no previous chunk. Each row
    equals its batch-of-1 result (RTC resp. plain) within the batching tolerance."""
    m, h, a = tiny.model, tiny.cfg.action_horizon, tiny.cfg.action_dim
    with torch.no_grad():
        cache = m.new_cache(3, 2, tiny.cfg.max_token_len)
        m.fill_prefix(cache, m.embed_images(tiny.images.repeat(3, 1, 1, 1, 1)),
                      tiny.image_masks.repeat(3, 1), tiny.tokens.repeat(3, 1),
                      tiny.token_mask.repeat(3, 1))
    rows = [(4, 0), (12, 3)]
    aligned = [align_prefix(tiny.prev[0].numpy(), 0.0, k * 0.02, 0.02, d, h, a) for d, k in rows]
    prefix = RTCPrefix.empty(3, h, a).load_(aligned + [None])
    with torch.no_grad():
        out = RTCDenoiser(m, RTCConfig(enabled=True)).denoise(
            cache, tiny.state.repeat(3, 1), tiny.noise.repeat(3, 1, 1), tiny.conds, prefix)
    for r, (d, k) in enumerate(rows):
        expected = _rtc(tiny, _prefix(tiny, tiny.prev, d, obs_shift=k))
        torch.testing.assert_close(out[r:r + 1], expected, rtol=0, atol=BATCH_ATOL)
    torch.testing.assert_close(out[2:], tiny.plain, rtol=0, atol=BATCH_ATOL)


def test_sdpa_attention_gives_the_same_guided_chunk():
    """The guided loop through the fused-attention path (autograd through SDPA) agrees with the
    eager attention within the SDPA-vs-eager tolerance of the plain sampler, compounded over the
    guided steps (test_model_sdpa.py: 1e-5 per call)."""
    from pi0_ros.model.gemma import set_attention

    t = _setup(True, seed=3)
    prefix = _prefix(t, t.prev, 5)
    eager = _rtc(t, prefix)
    set_attention(t.model, "sdpa")
    torch.testing.assert_close(_rtc(t, prefix), eager, rtol=0, atol=SDPA_ATOL)


def test_bfloat16_model_gives_the_float32_guided_chunk():
    """openpi's bf16 mode (float32 islands) through the backward: within test_model.py's bf16
    tolerance of the float32 result, frozen prefix as close to the previous chunk."""
    t = _setup(True, seed=5)
    prefix = _prefix(t, t.prev, 10)
    f32 = _rtc(t, prefix)
    t.model.set_precision("bfloat16")
    with torch.no_grad():
        t.cache = t.model.new_cache(1, 2, t.cfg.max_token_len)
        t.model.fill_prefix(t.cache, t.model.embed_images(t.images), t.image_masks, t.tokens,
                            t.token_mask)
    t.conds = t.model.time_conditioning(STEPS)
    bf16 = _rtc(t, prefix)
    assert bf16.dtype == torch.float32
    assert (bf16 - f32).abs().max() <= BF16_REL * max(1.0, f32.abs().max().item())
    ref = (t.plain - t.prev)[:, :10].pow(2).mean().sqrt()
    assert (bf16 - t.prev)[:, :10].pow(2).mean().sqrt() <= PREFIX_RMS_RATIO * ref


# -- the guidance gradient ------------------------------------------------------------------------
class _ToyVelocity:
    """A float64 velocity field with attention-like mixing over the horizon (a stand-in for the
    expert: the VJP must see cross-position terms), exposing ``denoise_step`` like Pi0Model."""

    def __init__(self, h: int, a: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(a, 16, generator=g, dtype=torch.float64) / 2
        self.w2 = torch.randn(16, a, generator=g, dtype=torch.float64) / 4
        self.q = torch.randn(a, a, generator=g, dtype=torch.float64) / 2
        self.config = SimpleNamespace(action_horizon=h)

    def denoise_step(self, scratch, state, x, conds, step):
        t = conds.times[step]
        att = torch.softmax(x @ self.q @ x.transpose(1, 2), dim=-1)  # (B, H, H)
        return torch.tanh(att @ x @ self.w1 + t) @ self.w2 + 0.3 * x


def test_vjp_matches_finite_differences_float64():
    h, a = 6, 3
    toy = _ToyVelocity(h, a)
    rtc = RTCDenoiser(toy, RTCConfig(enabled=True, max_delay=h))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, h, a, generator=g, dtype=torch.float64)
    target = torch.randn(2, h, a, generator=g, dtype=torch.float64)
    weights = prefix_weights(torch.tensor([2, 0]), torch.tensor([5, 6]), h)[:, :, None].double()
    conds = SimpleNamespace(times=(1.0, 0.7, 0.3))
    scratch = SimpleNamespace(k=[], v=[])
    for step, t in enumerate(conds.times):
        _, vjp = rtc.guidance(scratch, None, x, conds, step, target, weights)

        def x0_hat(z, t=t, step=step):
            return z - t * toy.denoise_step(None, None, z, conds, step)

        cot = (target - x0_hat(x)) * weights
        fd = torch.zeros_like(x)
        eps = 1e-5
        for idx in np.ndindex(*x.shape):
            e = torch.zeros_like(x)
            e[idx] = eps
            fd[idx] = ((x0_hat(x + e) - x0_hat(x - e)) * cot).sum() / (2 * eps)
        torch.testing.assert_close(vjp, fd, rtol=FD64_RTOL, atol=FD64_RTOL * fd.abs().max())


def test_vjp_through_the_model_matches_finite_differences(tiny):
    """The real expert (per-layer K/V copies, in-place suffix writes) in float32: g . u equals
    the central difference of (x0_hat . cotangent) along random directions u."""
    m, h, a = tiny.model, tiny.cfg.action_horizon, tiny.cfg.action_dim
    rtc = RTCDenoiser(m, RTCConfig(enabled=True))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, h, a, generator=g)
    target = torch.randn(1, h, a, generator=g)
    weights = prefix_weights(torch.tensor([8]), torch.tensor([30]), h)[:, :, None]
    scratch = rtc.bind(tiny.cache)
    for step in (0, 4, STEPS - 1):
        t = tiny.conds.times[step]
        _, vjp = rtc.guidance(scratch, tiny.state, x, tiny.conds, step, target, weights)

        def x0_hat(z, t=t, step=step):
            with torch.no_grad():
                return z - t * m.denoise_step(tiny.cache, tiny.state, z, tiny.conds, step)

        cot = (target - x0_hat(x)) * weights
        for _ in range(3):
            u = torch.randn(x.shape, generator=g)
            eps = 1e-2
            fd = ((x0_hat(x + eps * u) - x0_hat(x - eps * u)) * cot).sum() / (2 * eps)
            an = (vjp * u).sum()
            assert abs(an - fd) <= FD32_RTOL * max(1.0, abs(fd)), (step, an.item(), fd.item())


def test_guidance_weight_is_clipped_and_symmetric():
    assert guidance_weight(1.0, 5.0) == 5.0 and guidance_weight(0.0, 5.0) == 5.0
    assert guidance_weight(0.5, 5.0) == pytest.approx(2.0)  # (0.25 + 0.25) / 0.25
    assert guidance_weight(0.9, 5.0) == 5.0  # 0.82 / 0.09 = 9.1, clipped
    assert guidance_weight(0.3, 100.0) == pytest.approx(guidance_weight(0.7, 100.0))
    tau = 0.3  # the paper's form: (1 - tau) / (tau * r^2), r^2 = (1-tau)^2 / (tau^2 + (1-tau)^2)
    r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
    assert guidance_weight(1 - tau, 100.0) == pytest.approx((1 - tau) / (tau * r2))


# -- the soft mask --------------------------------------------------------------------------------
def test_prefix_weights_follow_the_paper():
    h, d, n = 12, 3, 9
    w = prefix_weights(torch.tensor([d]), torch.tensor([n]), h, "exp")[0]
    assert torch.equal(w[:d], torch.ones(d)) and torch.equal(w[n:], torch.zeros(h - n))
    for i in range(d, n):
        c = (n - i) / (n - d + 1)
        assert w[i].item() == pytest.approx(c * math.expm1(c) / (math.e - 1), rel=1e-6)
    assert torch.all(w[d:n][1:] < w[d:n][:-1])  # strictly decaying over the overlap
    lin = prefix_weights(torch.tensor([d]), torch.tensor([n]), h, "linear")[0]
    assert lin[d].item() == pytest.approx((n - d) / (n - d + 1))
    # A delay longer than the previous chunk: only existing rows are weighted.
    over = prefix_weights(torch.tensor([8]), torch.tensor([5]), h, "exp")[0]
    assert torch.equal(over, torch.tensor([1.0] * 5 + [0.0] * 7))
    assert set(SCHEDULES) == {"exp", "linear", "ones", "zeros"}


def test_prefix_weights_batch_rows_are_independent():
    w = prefix_weights(torch.tensor([0, 2, 4]), torch.tensor([0, 6, 10]), 10, "ones")
    assert torch.equal(w.sum(1), torch.tensor([0.0, 6.0, 10.0]))


# -- capture safety -------------------------------------------------------------------------------
class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = tuple(tuple(x.shape) for x in args if isinstance(x, torch.Tensor))
        self.calls.append((str(func.overloadpacket), shapes))
        return out


SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.is_nonzero",
            "aten.masked_select", "aten.unique", "aten._unique2"}


def test_guided_sampling_has_no_host_sync_and_one_op_sequence_for_any_delay(tiny):
    """No .item() / data-dependent op anywhere in the guided loop (forward and backward), and
    the dispatched op sequence (ops and shapes) is the same for every d and overlap length:
    d is data, not a Python branch, so one captured CUDA graph serves them all."""
    h, a = tiny.cfg.action_horizon, tiny.cfg.action_dim
    rtc = RTCDenoiser(tiny.model, RTCConfig(enabled=True))
    prev = tiny.prev
    conds = tiny.model.time_conditioning(2)  # the step count changes nothing here
    with torch.no_grad():  # warm-up, as a graph runner does: allocates the per-layer K/V once
        rtc.denoise(tiny.cache, tiny.state, tiny.noise, conds, _prefix(tiny, prev, 2))
    traces = []
    for d, shift in ((1, 0), (h // 2, 7)):
        prefix = _prefix(tiny, prev, d, obs_shift=shift)
        with _Recorder() as rec, torch.no_grad():
            rtc.denoise(tiny.cache, tiny.state, tiny.noise, conds, prefix)
        names = {name for name, _ in rec.calls}
        assert not names & SYNC_OPS, sorted(names & SYNC_OPS)
        assert any("mm" in n for n in names) and len(rec.calls) > 100
        traces.append(rec.calls)
    assert traces[0] == traces[1]
    assert prefix.actions.shape == (1, h, a)


@pytest.mark.parametrize("pi05", [True, False])
def test_guided_sampling_runs_on_the_meta_device(pi05):
    """On the meta device any .item() or data-dependent shape raises: capture-safe end to end
    (prefix cache, per-layer copies, forward, VJP, soft mask)."""
    cfg = tiny_config(pi05=pi05, num_cameras=2)
    h, a, s, length = cfg.action_horizon, cfg.action_dim, cfg.vision.image_size, cfg.max_token_len
    with torch.device("meta"):
        model = Pi0Model(cfg)
        images = torch.empty(1, 2, 3, s, s)
        tokens, masks = torch.empty(1, length, dtype=torch.long), torch.empty(1, length).bool()
        state, noise = torch.empty(1, a), torch.empty(1, h, a)
    cache = model.new_cache(1, 2)
    model.fill_prefix(cache, model.embed_images(images), torch.empty(1, 2, dtype=torch.bool,
                                                                     device="meta"),
                      tokens, masks)
    prefix = RTCPrefix.empty(1, h, a, device="meta")
    out = RTCDenoiser(model, RTCConfig(enabled=True)).denoise(
        cache, state, noise, model.time_conditioning(3), prefix)
    assert out.shape == (1, h, a) and out.is_meta


def test_refused_under_inference_mode(tiny):
    rtc = RTCDenoiser(tiny.model, RTCConfig(enabled=True))
    prefix = RTCPrefix.empty(1, tiny.cfg.action_horizon, tiny.cfg.action_dim)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        rtc.denoise(tiny.cache, tiny.state, tiny.noise, tiny.conds, prefix)


def test_inference_mode_conds_are_refused_and_inference_mode_cache_is_fine(tiny):
    """time_conditioning under inference_mode gives tensors autograd cannot save: refused by
    name. A prefix cache filled under inference_mode (as Policy does) is copied, so it works."""
    h, a = tiny.cfg.action_horizon, tiny.cfg.action_dim
    rtc = RTCDenoiser(tiny.model, RTCConfig(enabled=True))
    prefix = _prefix(tiny, tiny.prev, 3)
    with torch.inference_mode():
        conds = tiny.model.time_conditioning(2)
    with pytest.raises(ValueError, match="conds.time_emb.*inference tensor"):
        rtc.denoise(tiny.cache, tiny.state, tiny.noise, conds, prefix)
    conds = tiny.model.time_conditioning(2)
    with torch.no_grad():
        expected = rtc.denoise(tiny.cache, tiny.state, tiny.noise, conds, prefix)
    with torch.inference_mode():
        cache = tiny.model.new_cache(1, 2, tiny.cfg.max_token_len)
        tiny.model.fill_prefix(cache, tiny.model.embed_images(tiny.images), tiny.image_masks,
                               tiny.tokens, tiny.token_mask)
        state, noise = tiny.state.clone(), tiny.noise.clone()
    assert cache.k.is_inference() and state.is_inference() and noise.is_inference()
    out = rtc.denoise(cache, state, noise, conds, prefix)
    assert torch.equal(out, expected) and out.shape == (1, h, a)


@pytest.mark.slow
def test_offline_measurement_shows_smaller_seams_with_rtc():
    """pi0_ros/tools/rtc_eval.py (the figures in docs/EXECUTOR.md), few seams: RTC's mean seam
    position jump and frozen-prefix error are below replace's on both policies."""
    from pi0_ros.tools import rtc_eval

    for fn, seams in ((rtc_eval.bimodal, 16), (rtc_eval.tiny, 3)):
        replace = rtc_eval.summarize(fn(4, 8, seams, False, 5.0)[1])
        rtc = rtc_eval.summarize(fn(4, 8, seams, True, 5.0)[1])
        assert rtc["pos"] < 0.7 * replace["pos"], (fn.__name__, rtc, replace)
        assert rtc["frozen"] < 0.7 * replace["frozen"], (fn.__name__, rtc, replace)


# -- configuration and backends -------------------------------------------------------------------
def test_backends_without_backward_are_refused_at_configure():
    check_backend("eager")
    check_backend("cuda_graph")
    with pytest.raises(ValueError, match="tensorrt.*forward-only"):
        check_backend("tensorrt")
    with pytest.raises(ValueError, match="onnx"):
        check_backend("onnx")
    check_backend("cuda_graph", "bfloat16")
    with pytest.raises(ValueError, match="precision.*found 'fp8'"):
        check_backend("eager", "fp8")
    assert RTC_BACKENDS == {"eager": True, "cuda_graph": True, "tensorrt": False}


@pytest.mark.parametrize("field, value, needle", [
    ("max_guidance_weight", 0.0, "max_guidance_weight"),
    ("max_guidance_weight", float("nan"), "max_guidance_weight"),
    ("schedule", "cosine", "schedule.*cosine"),
    ("max_delay", -1, "max_delay"),
    ("latency_percentile", 101.0, "latency_percentile"),
])
def test_config_rejects_bad_values(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        RTCConfig(**{field: value})


def test_max_delay_beyond_horizon_is_refused():
    model = Pi0Model(tiny_config(pi05=True, num_cameras=1))
    with pytest.raises(ValueError, match="max_delay.*horizon 50.*found 60"):
        RTCDenoiser(model, RTCConfig(enabled=True, max_delay=60))


# -- host side: delay from measured latency -------------------------------------------------------
def test_delay_from_latency_percentile():
    dt = 0.02
    assert delay_from_latency([0.0], dt) == 0
    assert delay_from_latency([0.06], dt) == 3  # exactly 3 actions elapse: 3 frozen, not 4
    assert delay_from_latency([0.0601], dt) == 4
    assert delay_from_latency([0.07], 0.01) == 7  # 0.07 / 0.01 = 7.000000000000001 in float
    lat = [0.030] * 96 + [0.110] * 4  # p95 with "higher" takes an observed sample
    assert delay_from_latency(lat, dt, percentile=95) == 2
    assert delay_from_latency(lat, dt, percentile=96) == 6
    assert delay_from_latency(lat, dt, percentile=100) == 6
    assert delay_from_latency([0.5], dt, max_delay=10) == 10


def test_delay_estimator_uses_the_recent_window():
    est = DelayEstimator(RTCConfig(latency_percentile=100.0), horizon=50, window=3)
    assert est.delay(0.02, default=2) == 2  # nothing measured yet
    for latency in (0.30, 0.03, 0.03, 0.03):  # the 300 ms outlier leaves the window of 3
        est.add(latency)
    assert est.delay(0.02) == 2
    est.add(0.9)  # 45 actions > max_delay = H/2 = 25: clamped
    assert est.delay(0.02) == 25
    with pytest.raises(ValueError, match="latency_s.*found -1"):
        est.add(-1.0)
    with pytest.raises(ValueError, match="window.*found 0"):
        DelayEstimator(RTCConfig(), 50, window=0)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(latencies_s=[]), "latencies_s.*none"),
    (dict(latencies_s=[-0.1]), "latencies_s"),
    (dict(latencies_s=[0.1], dt=0.0), "dt"),
    (dict(latencies_s=[0.1], percentile=-1), "percentile"),
])
def test_delay_from_latency_rejects_bad_input(kwargs, needle):
    kwargs.setdefault("dt", 0.02)
    with pytest.raises(ValueError, match=needle):
        delay_from_latency(**kwargs)


# -- host side: alignment -------------------------------------------------------------------------
def test_align_whole_step_shift_copies_rows_exactly():
    prev = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    p = align_prefix(prev, prev_t0=1.0, obs_t0=1.0 + 4 * 0.05, dt=0.05, delay=2, horizon=10,
                     action_dim=5)
    assert isinstance(p, AlignedPrefix)
    assert (p.shift, p.valid_len, p.delay) == (4.0, 6, 2)
    assert np.array_equal(p.actions[:6, :3], prev[4:])
    assert not p.actions[6:].any() and not p.actions[:, 3:].any()
    assert np.array_equal(p.dim_mask, [1, 1, 1, 0, 0])


def test_align_fractional_shift_interpolates():
    prev = np.arange(8, dtype=np.float32)[:, None] * np.array([[1.0, -2.0]], np.float32)
    p = align_prefix(prev, 0.0, 0.25 * 0.1, 0.1, 0, 8)
    assert p.shift == pytest.approx(0.25) and p.valid_len == 7  # row 7.25 is past the end
    np.testing.assert_allclose(p.actions[:7, 0], np.arange(7) + 0.25, rtol=1e-6)
    np.testing.assert_allclose(p.actions[:7, 1], -2 * (np.arange(7) + 0.25), rtol=1e-6)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(prev_actions=np.zeros(5)), "prev_actions.*shape"),
    (dict(obs_t0=-1.0), "obs_t0.*prev_t0"),
    (dict(delay=11), "delay.*0, 10"),
    (dict(dt=-0.1), "dt"),
    (dict(prev_dt=0.2), "prev_dt"),
    (dict(action_dim=1), "prev_actions.*at most 1"),
])
def test_align_rejects_bad_input(kwargs, needle):
    args = dict(prev_actions=np.zeros((10, 2)), prev_t0=0.0, obs_t0=0.0, dt=0.1, delay=1,
                horizon=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        align_prefix(**args)


def test_prefix_load_rejects_wrong_rows():
    prefix = RTCPrefix.empty(2, 10, 4)
    with pytest.raises(ValueError, match="rows: expected 2, found 1"):
        prefix.load_([None])
    bad = align_prefix(np.zeros((10, 2)), 0.0, 0.0, 0.1, 1, 10, action_dim=3)
    with pytest.raises(ValueError, match=r"actions: expected \(10, 4\)"):
        prefix.load_([bad, None])
