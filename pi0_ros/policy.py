"""Policy: openpi-style ``infer(obs) -> {"actions", "policy_timing"}`` on a local checkpoint.

Pipeline per observation, in openpi's order (SEMANTICS section 1; openpi
``policies/policy_config.create_trained_policy`` + ``training/config.ModelTransformFactory``):

1. robot inputs -> model slots (``CameraMapping``; missing slots black with mask False), raw state
   and prompt read from configurable keys (``InputKeys``; LIBERO-style by default);
2. ``Normalize`` of the state (float64, openpi's formulas and stats);
3. resize-with-pad of every camera to the model resolution; prompt tokenized with the
   *normalized, unpadded* state (pi0.5 ``discrete_state_input``); state zero-padded to A;
4. uint8 -> float32 [-1, 1], channels first, batch dimension;
5. the model through an engine backend (``pi0_ros.engine.registry``: eager, CUDA graphs,
   TensorRT), whose static buffers and KV cache are allocated once and reused;
6. ``Unnormalize`` of the padded-width actions, then the first ``action_dim`` dims (the robot's).

``preprocess`` (steps 1-4) and ``postprocess`` (step 6) are separate public methods: the ROS node
runs them on other threads than the model.  No rclpy here.

Size (~620 lines, over the house's ~600): one class whose loading, transforms and inference
protocol (``infer`` = ``begin`` + ``begin_denoise`` + ``collect``) share its state; the transforms
themselves live in processing.py / images.py.
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

from .model.assets import PREPROCESSOR_FILE, checkpoint_dir_of, find_norm_stats, find_tokenizer
from .processing import (
    CameraMapping,
    DEFAULT_RESIZE,
    SEMANTICS,
    Normalizer,
    PreparedImage,
    Preprocessor,
    PromptTokenizer,
)

logger = logging.getLogger(__name__)

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


@dataclasses.dataclass
class PolicyTicket:
    """An observation between ``Policy.begin`` and ``Policy.collect``."""

    engine: Any  # the engine backend's Ticket
    t0: float  # perf_counter at begin
    t1: float  # after preprocessing


class Policy:
    """A pi0 / pi0.5 model behind an engine backend + openpi's input / output transforms.

    Build it from a checkpoint with :meth:`from_checkpoint`; the constructor takes the parts
    (tests, tools and servers that build them otherwise). ``engine``: a ``pi0_ros.engine``
    backend around ``model`` (None: an eager backend on the model's device), prepared on the
    first inference, on the calling thread, for batches of up to ``max_batch`` rows (the eager
    backend re-prepares for a larger batch; a graph or TensorRT backend refuses one).
    ``model`` may be None for host-only use (preprocess / postprocess).
    """

    # Whose numerics it reproduces ("openpi" | "lerobot"; set by ``from_model``; the parts a
    # constructor caller passes decide it themselves: normalizer, resize, model.time_grid).
    semantics: str = "openpi"

    def __init__(self, model: Any, config: Any, *, normalizer: Normalizer,
                 tokenizer: PromptTokenizer, settings: PolicySettings, cameras: CameraMapping,
                 input_keys: InputKeys = INPUT_PRESETS["libero"], engine: Any = None,
                 name: str = "", image_threads: int = 1, max_batch: int = 1,
                 prompt_buckets: Sequence[int] = (), seed: int = 0,
                 pipeline: bool = False, resize: str = DEFAULT_RESIZE,
                 rtc: Any = None) -> None:
        self.model, self.config = model, config
        self.normalizer, self.tokenizer, self.settings = normalizer, tokenizer, settings
        self.cameras, self.input_keys = cameras, input_keys
        self.model_name = name
        if engine is None and model is not None:
            from .engine.eager import EagerBackend

            engine = EagerBackend(model, model.device, warmup=0)
        self.engine = engine
        # Real-time chunking (model/rtc.py RTCConfig; None or disabled: off). With it on, the
        # engine runs the guided sampler and ``infer`` takes the previous chunk's aligned prefix.
        self.rtc = rtc if rtc is not None and rtc.enabled else None
        if self.rtc is not None and engine is not None:
            from .engine.base import _precision_name
            from .model.rtc import check_backend

            check_backend(engine.name, _precision_name(model) if model is not None
                          else "float32")
        # The last inference's raw output (H, A) float32, normalized model space: what RTC
        # aligns as the next inference's prefix (``infer`` returns it as "actions_normalized"
        # when RTC is on).
        self.last_normalized: np.ndarray | None = None
        self.device = model.device if model is not None else torch.device("cpu")
        self._max_batch, self._buckets, self._seed = int(max_batch), tuple(prompt_buckets), seed
        self.pipeline = bool(pipeline)  # two buffer slots for the pipelined protocol
        self._check_vocab()
        self.preprocessor = Preprocessor(
            normalizer=normalizer, tokenizer=tokenizer, cameras=cameras,
            image_size=settings.image_size, model_action_dim=settings.model_action_dim,
            state_dim=settings.state_dim, state_key=input_keys.state,
            prompt_key=input_keys.prompt, default_prompt=settings.default_prompt,
            image_threads=int(image_threads), resize=resize,
        )

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_dir: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        backend: str = "eager",
        engine_options: Any = None,
        geometry: Any = None,
        embedding: str | None = None,
        **side: Any,
    ) -> Policy:
        """Load a checkpoint (openpi or LeRobot layout), put it into its numeric format, build
        its engine backend, then :meth:`from_model` with the remaining keywords.

        ``backend`` / ``dtype``: a backend and numeric format of the engine registry
        (``pi0_ros.engine.registry``) on ``device``; or ``engine_options`` (an ``EngineOptions``,
        whose backend / precision / device win). ``geometry``: a geometry override for a
        checkpoint whose config does not describe its real sizes. ``embedding``: which stored
        token embedding to use when a checkpoint holds two different ones (``load_checkpoint``).
        """
        from .engine.registry import EngineOptions, build_backend, model_dtype, prepare_model
        from .model import load_checkpoint

        if not isinstance(backend, str) or not backend:
            raise ValueError(f"backend must be a backend name, got {backend!r}")
        ckpt = Path(checkpoint_dir).expanduser()
        if not ckpt.is_dir():
            raise FileNotFoundError(f"checkpoint directory {ckpt} does not exist"
                                    if not ckpt.exists() else
                                    f"checkpoint {ckpt} is not a directory")
        opts = engine_options or EngineOptions(backend=backend, precision=dtype,
                                               device=str(device))
        opts = dataclasses.replace(opts, checkpoint=opts.checkpoint or str(ckpt)).resolved()
        rtc = side.get("rtc")
        if rtc is not None and rtc.enabled:  # refuse before the (slow) weight load
            from .model.rtc import check_backend

            check_backend(opts.backend, opts.precision)
        # Fail on missing side files before the (slow) weight load.
        find_tokenizer(ckpt, side.get("tokenizer"))
        find_norm_stats(ckpt, side.get("norm_stats"))
        model, cfg = load_checkpoint(ckpt, device=opts.device, dtype=model_dtype(opts.precision),
                                     geometry=geometry, embedding=embedding)
        prepare_model(model, opts.precision)
        policy = cls.from_model(model, cfg, ckpt, engine=build_backend(model, opts), **side)
        logger.info("policy %s on %s: backend %s, format %s", ckpt, opts.device, opts.backend,
                    opts.precision)
        return policy

    @classmethod
    def from_model(
        cls,
        model: Any,
        cfg: Any,
        checkpoint_dir: str | os.PathLike,
        *,
        engine: Any = None,
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
        image_threads: int = 1,
        max_batch: int = 1,
        prompt_buckets: Sequence[int] = (),
        seed: int = 0,
        pipeline: bool = False,
        allow_unknown_processor_steps: bool = False,
        resize: str | None = None,
        rtc: Any = None,
        semantics: str | None = None,
    ) -> Policy:
        """A loaded model (or None, host-only) + the side files of its checkpoint directory.

        ``norm_stats``: None (the single ``assets/<id>/norm_stats.json``, or LeRobot's
        normalizer files), an asset id, or a path.  ``tokenizer``: path of ``tokenizer.model``
        (or a directory holding it); None searches the checkpoint dir, its parent and
        ``assets/``.  ``cameras``: ``{observation key: model slot}``, overriding ``input_keys``'
        cameras.  ``state_dim`` / ``action_dim``: robot dims (default: the norm stats' lengths).
        ``discrete_state_input`` / ``use_quantiles``: default from the checkpoint config (pi0.5
        -> True / quantile, pi0 -> False / z-score).  ``default_prompt``: used when an
        observation has no prompt (openpi ``InjectDefaultPrompt``).  ``image_threads``: cameras
        resized in parallel when > 1; ``resize``: "fast" (torch's uint8 kernel, within 1 level
        of openpi's pixels), "pillow" (openpi's exact bytes) or "lerobot" (LeRobot's float
        bilinear); None: by ``semantics`` (openpi: "fast", lerobot: "lerobot").
        ``semantics``: whose numerics the policy reproduces, "openpi" or "lerobot" (the
        denoising time grid, the state normalization that feeds the prompt's bins and the
        actions' unnormalization, the image resize; README "LeRobot"); None / "auto":
        by the checkpoint layout (``checkpoint_semantics``: LeRobot folder -> "lerobot").
        ``allow_unknown_processor_steps``: load a LeRobot folder whose processors hold steps
        this project does not implement (they are then skipped).
        ``rtc``: a ``pi0_ros.model.rtc.RTCConfig`` (real-time chunking; None: off).
        """
        ckpt = Path(checkpoint_dir).expanduser()
        keys = InputKeys.coerce(input_keys)
        semantics, semantics_from = resolve_semantics(semantics, ckpt)
        resize = resize if resize is not None else SEMANTICS_RESIZE[semantics]
        tokenizer_path = find_tokenizer(ckpt, tokenizer)
        stats_kind, stats_path = find_norm_stats(ckpt, norm_stats)
        pi05 = bool(cfg.pi05)
        if discrete_state_input is None:
            discrete_state_input = getattr(cfg, "discrete_state_input", None)
        discrete = pi05 if discrete_state_input is None else bool(discrete_state_input)
        quantiles = pi05 if use_quantiles is None else bool(use_quantiles)
        if stats_kind == "lerobot":
            # LeRobot's norm_map decides the mode unless use_quantiles is given explicitly.
            normalizer = Normalizer.from_lerobot(
                stats_path, allow_unknown_processor_steps=allow_unknown_processor_steps)
            if use_quantiles is not None:
                normalizer = normalizer.with_modes(quantiles)
        else:
            normalizer = Normalizer.from_json(stats_path, use_quantiles=quantiles)
        normalizer = normalizer.with_semantics(semantics)
        if model is not None:
            _set_time_grid(model, engine, semantics)
        max_len = int(cfg.max_token_len) or (200 if pi05 else 48)
        prompt_tokenizer = PromptTokenizer(tokenizer_path, max_len, discrete_state=discrete)
        slots = tuple(cfg.cameras)
        sources = cameras if cameras is not None else keys.cameras
        if sources is None:
            sources = {slot: slot for slot in slots}
        settings = _settings(cfg, normalizer, discrete=discrete, max_len=max_len,
                             state_dim=state_dim, action_dim=action_dim, num_steps=num_steps,
                             default_prompt=default_prompt)
        policy = cls(model, cfg, normalizer=normalizer, tokenizer=prompt_tokenizer,
                     settings=settings, cameras=CameraMapping(slots=slots, sources=sources),
                     input_keys=keys, engine=engine, name=ckpt.name,
                     image_threads=image_threads, max_batch=max_batch,
                     prompt_buckets=prompt_buckets, seed=seed, pipeline=pipeline,
                     resize=resize, rtc=rtc)
        policy.semantics = semantics
        logger.info(
            "policy %s: %s, prompt %s, %s norm from %s, tokenizer %s, cameras %s",
            ckpt, "pi0.5" if pi05 else "pi0",
            "with discrete state" if discrete else "without state", normalizer.modes,
            stats_path, tokenizer_path, policy.cameras.sources,
        )
        logger.info("policy %s: %s semantics (%s): time grid %s, %s normalization formulas, "
                    "image resize %r", ckpt, semantics, semantics_from,
                    getattr(model, "time_grid", "n/a (no model)"), normalizer.semantics, resize)
        return policy

    # -- what the pipeline reads (pi0_ros.pipeline.PolicyLike) ---------------------------------
    @property
    def camera_slots(self) -> tuple[str, ...]:
        return tuple(self.cameras.slots)

    @property
    def noise_shape(self) -> tuple[int, int]:
        return (self.settings.action_horizon, self.settings.model_action_dim)

    @property
    def state_dim(self) -> int | None:
        return self.settings.state_dim

    def prompt_fit(self, prompt: str, state: np.ndarray) -> tuple[int, int, bool]:
        """(tokens of ``prompt`` with ``state``, max_token_len, state in the prompt)."""
        tok = self.tokenizer
        return tok.n_tokens(prompt, state), tok.max_len, tok.discrete_state

    def prepare_image(self, rgb: np.ndarray, name: str = "image") -> PreparedImage:
        """An (H, W, 3) uint8 camera image resized with pad and scaled for the model, the way
        ``preprocess`` would (done on arrival by the node so inference only copies it)."""
        return PreparedImage.from_uint8(rgb, self.settings.image_size, name,
                                        resize=self.preprocessor.resize)

    def status(self) -> dict[str, Any]:
        """For /diagnostics: the engine backend, its device and its preparation."""
        engine = self.engine
        if engine is None:
            return {"state": "closed", "connected": True}
        return {"state": "ready", "connected": True, "backend": engine.name,
                "device": str(self.device), "prepared": engine.prepared}

    def close(self) -> None:
        """Release the engine's buffers and the preprocessing threads. Idempotent."""
        engine, self.engine = self.engine, None
        if engine is not None and engine.prepared:
            engine.release()
        self.preprocessor.close()

    # -- setup helpers ----------------------------------------------------------------------

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

    def _ensure_prepared(self, rows: int) -> Any:
        """The engine, prepared (on first use, on the calling thread: on CUDA, call from the
        inference thread) for ``rows`` rows."""
        from .engine import EngineSpec

        engine = self.engine
        if engine is None:
            raise RuntimeError("this policy has no model / engine (closed, or host-only)")
        if not engine.prepared or rows > engine.spec.max_batch:
            if engine.prepared and engine.name != "eager":
                raise ValueError(f"backend {engine.name!r} is prepared for batch "
                                 f"{engine.spec.max_batch}, got {rows} observations")
            size = max(rows, self._max_batch)
            engine.prepare(EngineSpec(
                num_cameras=len(self.cameras.slots), num_steps=self.settings.num_steps,
                max_batch=size, batch_sizes=tuple(range(1, size + 1)),
                prompt_buckets=self._buckets, seed=self._seed, pipeline=self.pipeline,
                rtc=self.rtc))
        return engine

    def run_model(self, batch: Mapping[str, torch.Tensor], noise: torch.Tensor | None,
                  prefixes: Sequence[Any] | None = None):
        """Host tensors (B, ...) -> normalized actions (B, H, A) float32, host.
        ``prefixes``: RTC only, one ``AlignedPrefix`` or None per row."""
        from .engine import ModelInputs

        rows = int(batch["images"].shape[0])
        engine = self._ensure_prepared(rows)
        result = engine.infer(ModelInputs(**batch, noise=noise,
                                          prefix=self._prefixes(prefixes, rows)))
        return result.actions.to("cpu", torch.float32)

    def infer(self, obs: Mapping[str, Any], noise: Any = None,
              prefix: Any = None) -> dict[str, Any]:
        """One observation -> ``{"actions": float32 (H, action_dim), "policy_timing": {...}}``.

        ``noise``: optional (H, A) or (1, H, A) initial x_1 (reproducible runs).  Timing (ms):
        ``infer_ms`` (whole call), ``preprocess_ms``, ``model_ms``, ``postprocess_ms``.
        ``prefix``: RTC only (``rtc`` enabled): the previous chunk aligned to this observation
        (``model.rtc.align_prefix`` of a previous "actions_normalized"), or None (no previous
        chunk). With RTC on the result also holds ``"actions_normalized"`` (H, A) float32.
        """
        ticket = self.begin(obs, noise, prefix)
        self.begin_denoise(ticket)
        return self.collect(ticket)

    # The pipelined protocol (``pipeline=True``; engine/worker.py's two-stream server): vision +
    # prefix of observation N+1 are launched while N denoises. ``infer`` is the three in a row.
    def begin(self, obs: Mapping[str, Any], noise: Any = None,
              prefix: Any = None) -> PolicyTicket:
        """Preprocess and launch vision + prefix (asynchronous on CUDA)."""
        from .engine import ModelInputs

        t0 = time.perf_counter()
        batch = self.preprocess(obs)
        t1 = time.perf_counter()
        prefixes = self._prefixes(None if prefix is None else [prefix], 1)
        engine = self._ensure_prepared(1)
        ticket = engine.begin_prefix(ModelInputs(**batch, noise=self._noise(noise, 1),
                                                 prefix=prefixes))
        return PolicyTicket(ticket, t0, t1)

    def begin_denoise(self, ticket: PolicyTicket) -> None:
        self.engine.begin_denoise(ticket.engine)

    def ready(self, ticket: PolicyTicket) -> bool:
        return self.engine.ready(ticket.engine)

    def collect(self, ticket: PolicyTicket) -> dict[str, Any]:
        """Wait for the actions; unnormalized robot actions and the timing."""
        actions = self.engine.collect(ticket.engine).actions
        t2 = time.perf_counter()
        raw = actions[0].to("cpu", torch.float32)
        self.last_normalized = raw.numpy()
        out = self.postprocess(raw)
        t3 = time.perf_counter()
        result = {"actions": out, "policy_timing": _timing(ticket.t0, ticket.t1, t2, t3)}
        if self.rtc is not None:
            result["actions_normalized"] = self.last_normalized.copy()
        return result

    def infer_batch(self, observations: Sequence[Mapping[str, Any]], noise: Any = None,
                    prefixes: Sequence[Any] | None = None):
        """Several observations in one model call -> a list of ``infer``-style dicts.

        ``noise``: optional (B, H, A).  ``policy_timing`` is the batch's (same dict values).
        ``prefixes``: RTC only, one aligned previous chunk (or None) per observation.
        """
        if not observations:
            return []
        t0 = time.perf_counter()
        items = [self.preprocess(obs) for obs in observations]
        batch = {k: torch.cat([item[k] for item in items]) for k in items[0]}
        t1 = time.perf_counter()
        actions = self.run_model(batch, self._noise(noise, len(items)), prefixes)
        t2 = time.perf_counter()
        out = self.postprocess(actions)
        t3 = time.perf_counter()
        timing = _timing(t0, t1, t2, t3)
        results = [{"actions": a, "policy_timing": dict(timing)} for a in out]
        if self.rtc is not None:
            for r, raw in zip(results, actions.numpy()):
                r["actions_normalized"] = raw.copy()
        return results

    def _prefixes(self, prefixes: Sequence[Any] | None, rows: int) -> tuple | None:
        """RTC prefixes for ``rows`` observations (None: no previous chunk anywhere)."""
        if prefixes is None:
            return None
        if self.rtc is None:
            raise ValueError("prefix: a previous chunk was given but real-time chunking is off "
                             "(Policy rtc=RTCConfig(enabled=True))")
        prefixes = tuple(prefixes)
        if len(prefixes) != rows:
            raise ValueError(f"prefixes: expected {rows} (one per observation), found "
                             f"{len(prefixes)}")
        return prefixes

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


# The image resize each semantics implies when ``resize`` is not given.
SEMANTICS_RESIZE = {"openpi": DEFAULT_RESIZE, "lerobot": "lerobot"}


def checkpoint_semantics(checkpoint_dir: str | os.PathLike) -> str:
    """The semantics a checkpoint's layout implies: "lerobot" for a LeRobot policy folder
    (``config.json`` ``"type"`` pi0 / pi05, or LeRobot's ``policy_preprocessor.json``), else
    "openpi"."""
    import json

    ckpt = checkpoint_dir_of(checkpoint_dir)
    if (ckpt / PREPROCESSOR_FILE).is_file():
        return "lerobot"
    cfg_file = ckpt / "config.json"
    if cfg_file.is_file():
        try:
            raw = json.loads(cfg_file.read_text())
        except ValueError:
            raw = None
        if isinstance(raw, dict) and raw.get("type") in ("pi0", "pi05"):
            return "lerobot"
    return "openpi"


def resolve_semantics(semantics: str | None, checkpoint_dir: str | os.PathLike
                      ) -> tuple[str, str]:
    """-> (semantics, where it came from): an explicit ``SEMANTICS`` name, or None / "auto"
    (by the checkpoint layout)."""
    if semantics is None or semantics == "auto":
        return checkpoint_semantics(checkpoint_dir), "from the checkpoint layout"
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics: expected one of {['auto', *SEMANTICS]}, found "
                         f"{semantics!r}")
    return semantics, "explicit"


def _set_time_grid(model: Any, engine: Any, grid: str) -> None:
    """Point the model's default denoising time grid at ``grid``; an engine already prepared
    on another grid is released so its next preparation uses this one."""
    model.time_grid = grid
    conds = getattr(engine, "conds", None)
    if engine is not None and engine.prepared and getattr(conds, "grid", grid) != grid:
        engine.release()


def _settings(cfg: Any, normalizer: Normalizer, *, discrete: bool, max_len: int,
              state_dim: int | None, action_dim: int | None, num_steps: int,
              default_prompt: str | None) -> PolicySettings:
    """The resolved settings of a checkpoint, checked against its norm stats."""

    def stats_dim(key: str) -> int | None:
        if normalizer.modes.get(key, "identity") == "identity":
            return None
        return normalizer.dim(key)

    model_a = int(cfg.action_dim)
    settings = PolicySettings(
        pi05=bool(cfg.pi05),
        discrete_state_input=discrete,
        max_token_len=max_len,
        image_size=int(cfg.vision.image_size),
        model_action_dim=model_a,
        action_horizon=int(cfg.action_horizon),
        state_dim=state_dim if state_dim is not None else stats_dim("state"),
        action_dim=action_dim if action_dim is not None else (stats_dim("actions") or model_a),
        num_steps=int(num_steps),
        default_prompt=default_prompt,
    )
    sdim = stats_dim("state")
    if None not in (sdim, settings.state_dim) and settings.state_dim > sdim:
        raise ValueError(f"state_dim {settings.state_dim} exceeds the {sdim} dims of the "
                         "state norm stats (openpi normalizes with the first state_dim stats)")
    return settings


def _timing(t0: float, t1: float, t2: float, t3: float) -> dict[str, float]:
    return {
        "infer_ms": (t3 - t0) * 1e3,
        "preprocess_ms": (t1 - t0) * 1e3,
        "model_ms": (t2 - t1) * 1e3,
        "postprocess_ms": (t3 - t2) * 1e3,
    }
