"""Policy: openpi-style ``infer(obs) -> {"actions", "policy_timing"}`` on a local checkpoint.

Pipeline per observation, in openpi's order (SEMANTICS section 1; openpi
``policies/policy_config.create_trained_policy`` + ``training/config.ModelTransformFactory``):

1. robot inputs -> model slots (``CameraMapping``; missing slots black with mask False), raw state
   and prompt read from configurable keys (``InputKeys``; LIBERO-style by default);
2. ``Normalize`` of the state (float64, openpi's formulas and stats);
3. resize-with-pad of every camera to the model resolution; prompt tokenized with the
   *normalized, unpadded* state (pi0.5 ``discrete_state_input``); state zero-padded to A;
4. uint8 -> float32 [-1, 1], channels first, batch dimension;
5. model ``sample_actions`` (through ``_run_model``, the one seam an engine backend replaces);
6. ``Unnormalize`` of the padded-width actions, then the first ``action_dim`` dims (the robot's).

``preprocess`` (steps 1-4) and ``postprocess`` (step 6) are separate public methods: the ROS node
runs them on other threads than the model.  No rclpy here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .processing import (
    CameraMapping,
    Normalizer,
    Preprocessor,
    PromptTokenizer,
    find_norm_stats,
    find_tokenizer,
)

logger = logging.getLogger(__name__)

# "eager": the model's own sample_actions (any batch size).  Any other name is built by
# pi0_ros.engine.make_backend (e.g. "cuda_graph") and used through _run_model.
DIRECT_BACKEND = "eager"


@dataclasses.dataclass(frozen=True)
class InputKeys:
    """Where a robot observation dict keeps each input.

    ``cameras``: ``{observation key: model slot}``; None maps every model slot from the key of the
    same name.  ``state`` / ``prompt``: observation keys of the raw state vector and the prompt.
    """

    cameras: Mapping[str, str] | None
    state: str = "observation/state"
    prompt: str = "prompt"

    def __post_init__(self) -> None:
        for name in ("state", "prompt"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"InputKeys.{name} must be a non-empty string, "
                                 f"got {getattr(self, name)!r}")
        if self.cameras is not None:
            object.__setattr__(self, "cameras", dict(self.cameras))

    @classmethod
    def coerce(cls, value: str | Mapping[str, Any] | InputKeys) -> InputKeys:
        if isinstance(value, InputKeys):
            return value
        if isinstance(value, str):
            try:
                return INPUT_PRESETS[value]
            except KeyError:
                raise ValueError(f"unknown input_keys preset {value!r}; presets: "
                                 f"{sorted(INPUT_PRESETS)}") from None
        data = dict(value)
        data.setdefault("cameras", None)
        return cls(**data)


INPUT_PRESETS: dict[str, InputKeys] = {
    # openpi `policies/libero_policy.LiberoInputs` (examples/libero/main.py client keys).
    "libero": InputKeys(
        cameras={"observation/image": "base_0_rgb", "observation/wrist_image": "left_wrist_0_rgb"},
        state="observation/state",
        prompt="prompt",
    ),
    # Observation keys equal to the model's slot names, plus "state" / "prompt".
    "slots": InputKeys(cameras=None, state="state", prompt="prompt"),
}


@dataclasses.dataclass(frozen=True)
class PolicySettings:
    """Resolved per-checkpoint settings (what ``Policy`` actually runs with)."""

    pi05: bool
    discrete_state_input: bool
    max_token_len: int
    image_size: int
    model_action_dim: int  # A: padded width of state and actions inside the model
    action_horizon: int  # H
    state_dim: int | None  # robot state dims (None: any length <= A)
    action_dim: int  # robot action dims returned by infer
    num_steps: int
    default_prompt: str | None

    def __post_init__(self) -> None:
        for name in ("max_token_len", "image_size", "model_action_dim", "action_horizon",
                     "action_dim", "num_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.action_dim > self.model_action_dim:
            raise ValueError(f"action_dim {self.action_dim} exceeds the model's action dim "
                             f"{self.model_action_dim}")
        if self.state_dim is not None and not 0 < self.state_dim <= self.model_action_dim:
            raise ValueError(f"state_dim {self.state_dim} must be in 1..{self.model_action_dim} "
                             "(the state is zero-padded to the model's action dim)")


def _load_model(checkpoint_dir, *, device, dtype, geometry):
    """The model loader (a module function so tests can substitute a fake)."""
    from .model import load_checkpoint

    return load_checkpoint(checkpoint_dir, device=device, dtype=dtype, geometry=geometry)


class Policy:
    """A pi0 / pi0.5 checkpoint + openpi's input / output transforms.

    ``norm_stats``: None (the single ``assets/<id>/norm_stats.json``, or LeRobot's normalizer
    files), an asset id, or a path.  ``tokenizer``: path of ``tokenizer.model`` (or a directory
    holding it); None searches the checkpoint dir, its parent and ``assets/``.  ``cameras``:
    ``{observation key: model slot}``, overriding ``input_keys``' cameras.  ``state_dim`` /
    ``action_dim``: robot dims (default: the norm stats' lengths).  ``discrete_state_input`` /
    ``use_quantiles``: default from the checkpoint config (``discrete_state_input``; pi0.5 ->
    True / quantile, pi0 -> False / z-score).  ``default_prompt``: used when an observation has
    no prompt (openpi ``InjectDefaultPrompt``).  ``image_threads``: cameras resized in parallel
    (PIL releases the GIL) when > 1.  ``backend``: "eager" runs the model's ``sample_actions``;
    any other name (e.g. "cuda_graph") is built by ``pi0_ros.engine.make_backend`` and prepared
    for batch 1 on the first inference call, on the calling thread.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        backend: str = "eager",
        num_steps: int = 10,
        norm_stats: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
        cameras: Mapping[str, str] | None = None,
        state_dim: int | None = None,
        action_dim: int | None = None,
        discrete_state_input: bool | None = None,
        use_quantiles: bool | None = None,
        default_prompt: str | None = None,
        input_keys: str | Mapping[str, Any] | InputKeys = "libero",
        geometry: Any = None,
        image_threads: int = 1,
    ) -> None:
        if not isinstance(backend, str) or not backend:
            raise ValueError(f"backend must be a backend name, got {backend!r}")
        self.checkpoint_dir = Path(checkpoint_dir).expanduser()
        self.device = torch.device(device)
        self.backend = backend
        keys = InputKeys.coerce(input_keys)

        # Fail on missing side files before the (slow) weight load.
        tokenizer_path = find_tokenizer(self.checkpoint_dir, tokenizer)
        stats_kind, stats_path = find_norm_stats(self.checkpoint_dir, norm_stats)

        self.model, self.config = _load_model(
            self.checkpoint_dir, device=self.device, dtype=dtype, geometry=geometry
        )
        cfg = self.config
        pi05 = bool(cfg.pi05)
        if discrete_state_input is None:
            discrete_state_input = getattr(cfg, "discrete_state_input", None)
        discrete = pi05 if discrete_state_input is None else bool(discrete_state_input)
        quantiles = pi05 if use_quantiles is None else bool(use_quantiles)

        if stats_kind == "lerobot":
            # LeRobot's norm_map decides the mode unless use_quantiles is given explicitly.
            self.normalizer = Normalizer.from_lerobot(stats_path)
            if use_quantiles is not None:
                self.normalizer = self.normalizer.with_modes(quantiles)
        else:
            self.normalizer = Normalizer.from_json(stats_path, use_quantiles=quantiles)

        max_len = int(cfg.max_token_len) or (200 if pi05 else 48)
        self.tokenizer = PromptTokenizer(tokenizer_path, max_len, discrete_state=discrete)
        self._check_vocab()

        self.input_keys = keys
        slots = tuple(cfg.cameras)
        sources = cameras if cameras is not None else keys.cameras
        if sources is None:
            sources = {slot: slot for slot in slots}
        self.cameras = CameraMapping(slots=slots, sources=sources)

        model_a = int(cfg.action_dim)
        settings = PolicySettings(
            pi05=pi05,
            discrete_state_input=discrete,
            max_token_len=max_len,
            image_size=int(getattr(cfg, "image_size", None) or cfg.vision.image_size),
            model_action_dim=model_a,
            action_horizon=int(cfg.action_horizon),
            state_dim=state_dim if state_dim is not None else self._stats_dim("state"),
            action_dim=action_dim if action_dim is not None else (
                self._stats_dim("actions") or model_a),
            num_steps=int(num_steps),
            default_prompt=default_prompt,
        )
        stats_dim = self._stats_dim("state")
        if None not in (stats_dim, settings.state_dim) and settings.state_dim > stats_dim:
            raise ValueError(f"state_dim {settings.state_dim} exceeds the {stats_dim} dims of the "
                             "state norm stats (openpi normalizes with the first state_dim stats)")
        self.settings = settings
        self._engine = None
        if backend != DIRECT_BACKEND:
            from .engine import make_backend  # lazy: the engine is only needed for these

            self._engine = make_backend(backend, self.model, self.device)
        self.preprocessor = Preprocessor(
            normalizer=self.normalizer, tokenizer=self.tokenizer, cameras=self.cameras,
            image_size=settings.image_size, model_action_dim=settings.model_action_dim,
            state_dim=settings.state_dim, state_key=keys.state, prompt_key=keys.prompt,
            default_prompt=settings.default_prompt, image_threads=int(image_threads),
        )
        logger.info(
            "policy %s: %s, prompt %s, %s norm from %s, tokenizer %s, cameras %s",
            self.checkpoint_dir, "pi0.5" if pi05 else "pi0",
            "with discrete state" if discrete else "without state", self.normalizer.modes,
            stats_path, tokenizer_path, self.cameras.sources,
        )

    # -- setup helpers ----------------------------------------------------------------------

    def _stats_dim(self, key: str) -> int | None:
        if self.normalizer.modes.get(key, "identity") == "identity":
            return None
        return self.normalizer.dim(key)

    def _check_vocab(self) -> None:
        lm = getattr(self.config, "lm", None)
        vocab = getattr(lm, "vocab_size", None)
        if vocab is not None and self.tokenizer.vocab_size > int(vocab):
            raise ValueError(
                f"tokenizer {self.tokenizer.path} has {self.tokenizer.vocab_size} pieces but the "
                f"model's vocabulary is {vocab}: wrong tokenizer for this checkpoint"
            )

    # -- pipeline ---------------------------------------------------------------------------

    def preprocess(self, obs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Observation -> model host tensors with batch dim 1 (the keys of engine ModelInputs).

        images (1, N, 3, S, S) float32; image_masks (1, N) bool; tokens (1, L) int64;
        token_mask (1, L) bool; state (1, A) float32.  Thread-safe; no device work.
        """
        return {k: torch.from_numpy(v) for k, v in self.preprocessor(obs).items()}

    def postprocess(self, actions_normalized: Any) -> np.ndarray:
        """Model output (H, A) or (B, H, A), normalized -> robot actions float32 (.., H, D).

        openpi ``Unnormalize`` on the padded width (float64), then the first ``action_dim``
        dims (e.g. ``LiberoOutputs``), returned as float32.
        """
        if isinstance(actions_normalized, torch.Tensor):
            actions_normalized = actions_normalized.detach().to("cpu", torch.float32).numpy()
        a = np.asarray(actions_normalized)
        if a.ndim not in (2, 3) or a.shape[-1] != self.settings.model_action_dim:
            raise ValueError(f"actions: expected (H, {self.settings.model_action_dim}) or "
                             f"(B, H, {self.settings.model_action_dim}), found {list(a.shape)}")
        out = self.normalizer.unnormalize(a.astype(np.float32, copy=False), "actions")
        return np.ascontiguousarray(out[..., : self.settings.action_dim], dtype=np.float32)

    def _run_model(self, batch: Mapping[str, torch.Tensor], noise: torch.Tensor | None):
        """The model seam: host tensors (B, ...) -> normalized actions (B, H, A) float32, host.

        ``backend="eager"``: the model's ``sample_actions``.  Other backends: the engine backend
        (``pi0_ros.engine``), prepared for batch 1 on the first call, on the calling thread (on
        CUDA that must be the thread that runs inference: warm up from the worker thread).
        """
        if self._engine is not None:
            return self._engine_infer(batch, noise)
        dev = self.device
        with torch.inference_mode():
            args = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
            if noise is not None:
                noise = noise.to(dev, torch.float32)
            actions = self.model.sample_actions(
                args["images"], args["image_masks"], args["tokens"], args["token_mask"],
                args["state"], noise=noise, num_steps=self.settings.num_steps,
            )
            return actions.to("cpu", torch.float32)

    def _engine_infer(self, batch: Mapping[str, torch.Tensor], noise: torch.Tensor | None):
        from .engine import EngineSpec, ModelInputs

        if not self._engine.prepared:
            self._engine.prepare(EngineSpec(num_cameras=len(self.cameras.slots),
                                            num_steps=self.settings.num_steps, max_batch=1))
        rows = int(batch["images"].shape[0])
        if rows > self._engine.spec.max_batch:
            raise ValueError(f"backend {self.backend!r} is prepared for batch "
                             f"{self._engine.spec.max_batch}, got {rows} observations; use "
                             "backend='eager' for infer_batch")
        result = self._engine.infer(ModelInputs(**batch, noise=noise))
        return result.actions.to("cpu", torch.float32)

    def infer(self, obs: Mapping[str, Any], noise: Any = None) -> dict[str, Any]:
        """One observation -> ``{"actions": float32 (H, action_dim), "policy_timing": {...}}``.

        ``noise``: optional (H, A) or (1, H, A) initial x_1 (reproducible runs).  Timing (ms):
        ``infer_ms`` (whole call), ``preprocess_ms``, ``model_ms``, ``postprocess_ms``.
        """
        t0 = time.perf_counter()
        batch = self.preprocess(obs)
        t1 = time.perf_counter()
        actions = self._run_model(batch, self._noise(noise, 1))
        t2 = time.perf_counter()
        out = self.postprocess(actions[0])
        t3 = time.perf_counter()
        return {"actions": out, "policy_timing": _timing(t0, t1, t2, t3)}

    def infer_batch(self, observations: Sequence[Mapping[str, Any]], noise: Any = None):
        """Several observations in one model call -> a list of ``infer``-style dicts.

        ``noise``: optional (B, H, A).  ``policy_timing`` is the batch's (same dict values).
        """
        if not observations:
            return []
        t0 = time.perf_counter()
        items = [self.preprocess(obs) for obs in observations]
        batch = {k: torch.cat([item[k] for item in items]) for k in items[0]}
        t1 = time.perf_counter()
        actions = self._run_model(batch, self._noise(noise, len(items)))
        t2 = time.perf_counter()
        out = self.postprocess(actions)
        t3 = time.perf_counter()
        timing = _timing(t0, t1, t2, t3)
        return [{"actions": a, "policy_timing": dict(timing)} for a in out]

    def _noise(self, noise: Any, batch: int) -> torch.Tensor | None:
        if noise is None:
            return None
        t = torch.as_tensor(np.asarray(noise, dtype=np.float32))
        if t.ndim == 2:
            t = t[None]
        expected = (batch, self.settings.action_horizon, self.settings.model_action_dim)
        if tuple(t.shape) != expected:
            raise ValueError(f"noise: expected shape {list(expected)} (or without the batch "
                             f"dim for one observation), found {list(t.shape)}")
        return t


def _timing(t0: float, t1: float, t2: float, t3: float) -> dict[str, float]:
    return {
        "infer_ms": (t3 - t0) * 1e3,
        "preprocess_ms": (t1 - t0) * 1e3,
        "model_ms": (t2 - t1) * 1e3,
        "postprocess_ms": (t3 - t2) * 1e3,
    }
