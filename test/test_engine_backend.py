"""Engine backend interface on CPU: eager prepare / infer / release, padding, prompt buckets."""

from __future__ import annotations

import pytest
import torch

from pi0_ros.engine.base import EngineSpec, ModelInputs, default_buckets, dummy_inputs, select_rows
from pi0_ros.engine.eager import EagerBackend
from pi0_ros.model import Pi0Model, random_init_, tiny_config

STEPS = 3
# float32 on CPU: the same math at a different batch / key length rounds differently in the
# matmul / softmax reductions (masked keys contribute exactly 0), so "identical" is this close.
EXACT_ATOL = 2e-5
REF_ATOL = 2e-5  # backend vs model.sample_actions


@pytest.fixture(scope="module", params=[True, False], ids=["pi05", "pi0"])
def model(request) -> Pi0Model:
    # random_init_: every path live (a fresh module's zero adaRMS gates would cut the pi0.5
    # expert off from the prefix, and a prefix bug would go unseen).
    return random_init_(Pi0Model(tiny_config(pi05=request.param, num_cameras=2)), seed=0).eval()


def reference(model: Pi0Model, x: ModelInputs, steps: int = STEPS) -> torch.Tensor:
    return model.sample_actions(x.images, x.image_masks, x.tokens, x.token_mask, x.state,
                                x.noise, num_steps=steps)


def test_spec_validation_and_buckets():
    assert default_buckets(200) == (48, 112, 200)
    assert default_buckets(48) == (48,)
    spec = EngineSpec(num_cameras=2, max_batch=4, prompt_buckets=(112, 48, 200)).resolve(200)
    assert spec.prompt_buckets == (48, 112, 200) and spec.batch_sizes == (4,)
    assert [spec.bucket_for(n) for n in (0, 1, 48, 49, 112, 113, 200)] == [48, 48, 48, 112,
                                                                          112, 200, 200]
    with pytest.raises(ValueError, match="largest bucket"):
        spec.bucket_for(201)
    assert EngineSpec(num_cameras=1, max_batch=8, batch_sizes=(1, 2, 8)).batch_for(3) == 8
    with pytest.raises(ValueError, match="max_batch"):
        EngineSpec(num_cameras=1, max_batch=8, batch_sizes=(1, 2)).batch_for(3)
    with pytest.raises(ValueError, match="num_steps"):
        EngineSpec(num_cameras=1, num_steps=0)
    with pytest.raises(ValueError, match="max_token_len"):
        EngineSpec(num_cameras=1, prompt_buckets=(300,)).resolve(200)


def test_eager_matches_sample_actions_and_release(model):
    cfg = model.config
    backend = EagerBackend(model)
    assert not backend.prepared
    backend.prepare(EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=2))
    x = dummy_inputs(cfg, 2, 2, 20, seed=1)
    out = backend.infer(x)
    assert out.actions.shape == (2, cfg.action_horizon, cfg.action_dim)
    assert out.actions.device.type == "cpu" and out.batch == 2 and out.bucket == 48
    assert set(out.timing) >= {"upload", "vision", "prefix", "denoise", "total"}
    torch.testing.assert_close(out.actions, reference(model, x), atol=REF_ATOL, rtol=0)
    # The output is a copy: the next request does not change it.
    kept = out.actions.clone()
    backend.infer(dummy_inputs(cfg, 2, 2, 7, seed=2))
    assert torch.equal(kept, out.actions)
    backend.release()
    assert not backend.prepared
    with pytest.raises(RuntimeError, match="not prepared"):
        backend.infer(x)
    # Re-prepare with another configuration.
    backend.prepare(EngineSpec(num_cameras=2, num_steps=2, max_batch=1))
    one = select_rows(x, slice(0, 1))
    torch.testing.assert_close(backend.infer(one).actions, reference(model, one, 2),
                               atol=REF_ATOL, rtol=0)


def test_padding_smaller_batches_equals_unpadded(model):
    cfg = model.config
    backend = EagerBackend(model)
    backend.prepare(EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=4,
                               batch_sizes=(2, 4)))
    x = dummy_inputs(cfg, 4, 2, 30, seed=3)
    full = backend.infer(x)
    assert full.batch == 4
    for rows, padded_to in ((1, 2), (2, 2), (3, 4)):
        part = backend.infer(select_rows(x, slice(0, rows)))
        assert part.batch == padded_to and part.actions.shape[0] == rows
        torch.testing.assert_close(part.actions, full.actions[:rows], atol=EXACT_ATOL, rtol=0)
        torch.testing.assert_close(part.actions, reference(model, select_rows(x, slice(0, rows))),
                                   atol=REF_ATOL, rtol=0)
    with pytest.raises(ValueError, match="rows"):
        backend.infer(dummy_inputs(cfg, 5, 2, 30))


def test_prompt_bucket_truncation_is_exact(model):
    """The bucket is the smallest >= the valid tokens; cutting right-padding changes nothing."""
    cfg = model.config
    backend = EagerBackend(model)
    buckets = (16, 32, cfg.max_token_len)
    backend.prepare(EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=2,
                               prompt_buckets=buckets))
    for valid, bucket in ((5, 16), (16, 16), (17, 32), (cfg.max_token_len, cfg.max_token_len)):
        x = dummy_inputs(cfg, 2, 2, valid, seed=valid)
        out = backend.infer(x)
        assert out.bucket == bucket
        full = reference(model, x)  # the whole max_token_len prompt
        torch.testing.assert_close(out.actions, full, atol=EXACT_ATOL, rtol=0)
    # Rows with different lengths: the longest decides; a prompt shorter than the bucket is
    # zero-padded up to it.
    x = dummy_inputs(cfg, 2, 2, 10, seed=9)
    mask = x.token_mask.clone()
    mask[1, 10:20] = True
    x = ModelInputs(x.images, x.image_masks, x.tokens, mask, x.state, x.noise)
    out = backend.infer(x)
    assert out.bucket == 32
    torch.testing.assert_close(out.actions, reference(model, x), atol=EXACT_ATOL, rtol=0)
    short = select_rows(x, slice(0, 2))
    short = ModelInputs(short.images, short.image_masks, short.tokens[:, :20],
                        short.token_mask[:, :20], short.state, short.noise)
    torch.testing.assert_close(backend.infer(short).actions, out.actions, atol=EXACT_ATOL,
                               rtol=0)


def test_masked_camera_and_generated_noise(model):
    cfg = model.config
    backend = EagerBackend(model)
    backend.prepare(EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1, seed=5))
    x = dummy_inputs(cfg, 1, 2, 12, seed=4)
    masks = torch.tensor([[True, False]])
    x = ModelInputs(x.images, masks, x.tokens, x.token_mask, x.state, x.noise)
    torch.testing.assert_close(backend.infer(x).actions, reference(model, x), atol=REF_ATOL,
                               rtol=0)
    # No noise given: drawn from the backend's seeded generator; reproducible after re-prepare.
    nn = ModelInputs(x.images, masks, x.tokens, x.token_mask, x.state, None)
    a = backend.infer(nn).actions
    b = backend.infer(nn).actions
    assert not torch.equal(a, b)
    backend.prepare(EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1, seed=5))
    assert torch.equal(backend.infer(nn).actions, a)


def test_input_validation(model):
    cfg = model.config
    backend = EagerBackend(model)
    backend.prepare(EngineSpec(num_cameras=2, num_steps=1, max_batch=1))
    x = dummy_inputs(cfg, 1, 3, 5)
    with pytest.raises(ValueError, match="images"):
        backend.infer(x)
    x = dummy_inputs(cfg, 1, 2, 5)
    bad = ModelInputs(x.images, x.image_masks, x.tokens[:, :4], x.token_mask, x.state)
    with pytest.raises(ValueError, match="tokens"):
        backend.infer(bad)


def test_two_phase_protocol_and_pipeline_slots(model):
    """begin_prefix / begin_denoise / collect: two slots let N+1's prefix run before N is
    collected, with results equal to one-at-a-time inference; one slot refuses."""
    cfg = model.config
    xs = [dummy_inputs(cfg, 1, 2, 8 + i, seed=10 + i) for i in range(3)]
    refs = [reference(model, x) for x in xs]
    backend = EagerBackend(model)
    backend.prepare(EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1, pipeline=True))
    t0 = backend.begin_prefix(xs[0])
    backend.begin_denoise(t0)
    t1 = backend.begin_prefix(xs[1])  # while 0 is "in flight"
    with pytest.raises(RuntimeError, match="in flight"):
        backend.begin_prefix(xs[2])
    assert backend.ready(t0)
    r0 = backend.collect(t0)
    backend.begin_denoise(t1)
    t2 = backend.begin_prefix(xs[2])
    r1 = backend.collect(t1)
    backend.begin_denoise(t2)
    r2 = backend.collect(t2)
    for r, ref in zip((r0, r1, r2), refs):
        torch.testing.assert_close(r.actions, ref, atol=REF_ATOL, rtol=0)
    backend.prepare(EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1))
    t = backend.begin_prefix(xs[0])
    with pytest.raises(RuntimeError, match="in flight"):
        backend.begin_prefix(xs[1])
    with pytest.raises(RuntimeError, match="begin_denoise"):
        backend.collect(t)
    backend.begin_denoise(t)
    torch.testing.assert_close(backend.collect(t).actions, refs[0], atol=REF_ATOL, rtol=0)


def test_time_conditioning_prepared_once(model, monkeypatch):
    """The pi0.5 adaRMS modulation / time embeddings are computed at prepare, not per request."""
    calls = []
    original = model.time_conditioning
    monkeypatch.setattr(model, "time_conditioning",
                        lambda n: calls.append(n) or original(n))
    backend = EagerBackend(model, warmup=0)
    backend.prepare(EngineSpec(num_cameras=2, num_steps=STEPS, max_batch=1))
    x = dummy_inputs(model.config, 1, 2, 5)
    for _ in range(3):
        backend.infer(x)
    assert calls == [STEPS]
