"""torch.compile(fullgraph=True) of every stage on CPU with a cheap backend (no Inductor codegen):
dynamo must trace each stage as one graph (no graph break), which is what ``compile=True`` in
the CUDA graph backend relies on. A few seconds on the tiny geometry."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from pi0_ros.engine.base import EngineSpec, dummy_inputs
from pi0_ros.engine.eager import EagerBackend
from pi0_ros.model import Pi0Model, tiny_config

COMPILED_ATOL = 1e-5  # aot_eager runs the same aten ops after decomposition (float32)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(old)


@pytest.mark.parametrize("pi05", [True, False], ids=["pi05", "pi0"])
def test_every_stage_compiles_fullgraph_and_matches_eager(pi05):
    torch.manual_seed(0)
    model = Pi0Model(tiny_config(pi05=pi05, num_cameras=2)).eval()
    spec = EngineSpec(num_cameras=2, num_steps=2, max_batch=1, prompt_buckets=(16, 48))
    backend = EagerBackend(model, warmup=0)
    backend.prepare(spec)
    x = dummy_inputs(model.config, 1, 2, 30, seed=1)
    ref = backend.infer(x).actions
    slot = backend._slots[0]
    # The backend's buffers now hold x's values: recompute each stage compiled and compare.
    for key in backend.stage_keys():
        if key[0] != "vision" and key[2] != 48:
            continue  # x ran at bucket 48
        compiled = torch.compile(backend._stage_fn(*key), backend="aot_eager", fullgraph=True,
                                 dynamic=False)
        compiled()
    torch.testing.assert_close(slot.actions[:1], ref, atol=COMPILED_ATOL, rtol=0)


def test_a_graph_break_fails_fullgraph(monkeypatch):
    torch.manual_seed(0)
    model = Pi0Model(tiny_config(pi05=True, num_cameras=2)).eval()
    backend = EagerBackend(model, warmup=0)
    backend.prepare(EngineSpec(num_cameras=2, num_steps=2, prompt_buckets=(48,)))
    original = Pi0Model.denoise_step

    def denoise_step(self, cache, state, x_t, conds, step):
        if x_t.abs().amax().item() > 1e9:  # data-dependent Python branch: a graph break
            x_t = x_t * 0
        return original(self, cache, state, x_t, conds, step)

    monkeypatch.setattr(Pi0Model, "denoise_step", denoise_step)
    compiled = torch.compile(backend._stage_fn("denoise", 0, 48, 1), backend="eager",
                             fullgraph=True, dynamic=False)
    with pytest.raises(Exception, match="(?i)graph break|data-dependent|Unsupported|item"):
        compiled()
