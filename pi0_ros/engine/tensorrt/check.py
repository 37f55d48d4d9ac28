"""onnxruntime against eager: run exported stages on CPU and measure how far they are from the
model's own stage functions (``pi0-ros-export``'s check and the tests' ONNX == eager checks)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any
from collections.abc import Mapping, Sequence

import torch

from ...model import Pi0Model
from ..base import ModelInputs
from .export import StageExport, eager_stage, example_feeds
from .stages import step_conditioning


def ort_session(path: str | Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_session(session, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = [i.name for i in session.get_inputs()]
    out = session.run(None, {k: feeds[k].detach().cpu().numpy() for k in names})
    return {o.name: torch.from_numpy(v) for o, v in zip(session.get_outputs(), out)}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.double(), b.double()
    same = a == b  # equal entries (mask constants included) differ by 0, not inf - inf
    return float(torch.where(same, 0.0, (a - b).abs()).max()) if a.numel() else 0.0


@torch.no_grad()
def check_stages(model: Pi0Model, exports: Sequence[StageExport], inputs: ModelInputs,
                 threads: int = 0) -> dict[str, float]:
    """Max |onnxruntime - eager| of every output of every exported stage (float32 exports),
    each stage fed the eager upstream values; keys ``<stage_id>/<output>``."""
    diffs = {}
    for ex in exports:
        num_steps = ex.num_steps or 10
        request = _fit_prompt(inputs, ex.prompt_len) if ex.prompt_len else inputs
        feeds = example_feeds(model, ex.stage, request, num_steps)
        expected = eager_stage(model, ex.stage, feeds, num_steps)
        got = run_session(ort_session(ex.path, threads), feeds)
        for name in ex.outputs:
            diffs[f"{ex.name}/{name}"] = max_abs_diff(got[name], expected[name].float())
    return diffs


@torch.no_grad()
def onnx_sample_actions(sessions: Mapping[str, Any], inputs: ModelInputs,
                        model: Pi0Model | None = None, num_steps: int = 10) -> torch.Tensor:
    """Actions through the ONNX stages only (vision -> prefix -> denoise), or through
    ``denoise_step`` in a Python loop when ``sessions`` has no ``denoise`` (then ``model``
    supplies the per-step conditioning)."""
    tokens = run_session(sessions["vision"], {"images": inputs.images.float()})["image_tokens"]
    cache = run_session(sessions["prefix"], {
        "image_tokens": tokens, "image_masks": inputs.image_masks.bool(),
        "tokens": inputs.tokens.long(), "token_mask": inputs.token_mask.bool()})
    feeds = dict(cache, state=inputs.state.float())
    if "denoise" in sessions:
        return run_session(sessions["denoise"], dict(feeds, noise=inputs.noise.float()))["actions"]
    conds = model.time_conditioning(num_steps)
    x = inputs.noise.float()
    cond_name = "modulation" if model.config.pi05 else "time_emb"
    for step in range(num_steps):
        v = run_session(sessions["denoise_step"], dict(
            feeds, x_t=x, **{cond_name: step_conditioning(model, conds, step)}))["velocity"]
        x = x + conds.dt * v
    return x


def _fit_prompt(inputs: ModelInputs, prompt_len: int) -> ModelInputs:
    """Cut (or zero-pad) a request's prompt to ``prompt_len`` columns (a bucket)."""
    L = inputs.tokens.shape[1]
    if L == prompt_len:
        return inputs
    if L > prompt_len:
        return dataclasses.replace(inputs, tokens=inputs.tokens[:, :prompt_len],
                                   token_mask=inputs.token_mask[:, :prompt_len])
    pad = (0, prompt_len - L)
    return dataclasses.replace(
        inputs, tokens=torch.nn.functional.pad(inputs.tokens, pad),
        token_mask=torch.nn.functional.pad(inputs.token_mask, pad))
