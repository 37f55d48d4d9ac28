"""Raw robot observation <-> model tensors, numerically as openpi does it.

Everything here reproduces openpi's policy-side transforms (commit ``15a9616a``; see
``docs/SEMANTICS.md`` of the reference data, sections 1-4) and is checked value by value against
the ``openpi_preprocess`` fixture:

* images: ``pi0_ros.images`` (resize-with-pad, uint8 -> [-1, 1]; re-exported here)
* ``PromptTokenizer``  <- ``models.tokenizer.PaligemmaTokenizer.tokenize`` (pi0 / pi0.5 formats)
* ``discretize_state`` <- the ``np.digitize`` line of that tokenizer
* ``Normalizer``       <- ``transforms.Normalize`` / ``transforms.Unnormalize``
* ``CameraMapping``    <- the robot input transforms (``LiberoInputs`` and friends): robot
  cameras -> model slots, missing slots black with mask False
* ``check_image`` / ``check_state`` / ``resolve_prompt``: input validation with errors that name
  the field, what was expected and what was found; ``InjectDefaultPrompt`` semantics.

numpy / Pillow / sentencepiece; torch only for the fast resize, ``prepare_image_tensor`` and
``set_torch_threads`` (imported on first use); no rclpy.

Size (~650 lines, over the house's ~600): the prompt, state and normalization transforms with
their validation, each a short function checked value by value against the fixture; images are
in images.py, checkpoint side files in model/assets.py.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from .images import (  # noqa: F401  (re-exported: the image half of the transforms)
    DEFAULT_RESIZE,
    RESIZE_METHODS,
    UINT8_TO_FLOAT_LUT,
    PreparedImage,
    check_image,
    check_resize,
    image_to_model,
    prepare_image,
    prepare_image_tensor,
    resize_geometry,
    resize_with_pad,
    set_torch_threads,
)

logger = logging.getLogger(__name__)

# openpi's three image slots, in token order (openpi `models/model.py` IMAGE_KEYS).
MODEL_SLOTS: tuple[str, ...] = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")

# LeRobot names its camera features `observation.images.<name>`.
LEROBOT_IMAGE_PREFIX = "observation.images."

# pi0.5 state bins: np.digitize(x, np.linspace(-1, 1, 257)[:-1]) - 1 compares x against these
# float64 edges (-1 + k/128, k = 0..255).  (openpi `models/tokenizer.py`)
STATE_BIN_EDGES: np.ndarray = np.linspace(-1.0, 1.0, 256 + 1)[:-1]  # (256,) float64

NORM_STATS_FILENAME = "norm_stats.json"
NORM_EPS = 1e-6  # openpi's `+ 1e-6` in every normalization formula (SEMANTICS section 4)

NORM_MODES = ("quantile", "zscore", "identity")

# Whose formulas a Normalizer applies (``Normalizer.semantics``): openpi's (float64, ``+ 1e-6``)
# or LeRobot's ``NormalizerProcessorStep`` (float32, ``eps`` 1e-8).
SEMANTICS = ("openpi", "lerobot")
LEROBOT_NORM_EPS = np.float32(1e-8)  # LeRobot's `eps` (the normalizer steps' default)


@dataclasses.dataclass(frozen=True)
class CameraMapping:
    """Robot camera names (observation keys) -> model image slots.

    ``slots``: the model's slots in token order (``Pi0Config.cameras``; openpi's
    ``base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb`` or a checkpoint's own camera keys).
    ``sources``: ``{robot_key: slot}``.  A slot no robot camera maps to, or whose camera is
    absent from an observation, is fed black (all -1.0) with mask False, as openpi's robot
    transforms do for e.g. LIBERO's right wrist (SEMANTICS section 3).  A target written without
    LeRobot's ``observation.images.`` prefix matches the prefixed slot.
    """

    slots: tuple[str, ...]
    sources: Mapping[str, str]

    def __post_init__(self) -> None:
        slots = tuple(self.slots)
        if not slots or len(set(slots)) != len(slots):
            raise ValueError(f"CameraMapping.slots must be non-empty and unique, got {slots!r}")
        resolved: dict[str, str] = {}
        for key, target in dict(self.sources).items():
            slot = _match_slot(target, slots)
            if slot is None:
                raise ValueError(
                    f"camera {key!r} maps to slot {target!r}, which the model does not have; "
                    f"model slots: {list(slots)}"
                )
            if slot in resolved.values():
                raise ValueError(f"two cameras map to model slot {slot!r}: {dict(self.sources)}")
            resolved[key] = slot
        object.__setattr__(self, "slots", slots)
        object.__setattr__(self, "sources", resolved)

    def slot_sources(self) -> list[str | None]:
        """Robot key feeding each slot, in slot order (None: always black / masked)."""
        by_slot = {slot: key for key, slot in self.sources.items()}
        return [by_slot.get(slot) for slot in self.slots]

    def assemble(
        self,
        obs: Mapping[str, Any],
        size: int,
        out: np.ndarray | None = None,
        executor: Executor | None = None,
        *,
        resize: str = DEFAULT_RESIZE,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Images float32 ``[N, 3, size, size]`` and masks bool ``[N]`` in slot order.

        Each camera: a uint8 HWC RGB image (resized with ``resize``) or a ``PreparedImage``.
        ``executor``: optional thread pool to resize cameras in parallel (the resizers release
        the GIL).
        """
        check_resize(resize)
        n = len(self.slots)
        if out is None:
            out = np.empty((n, 3, size, size), dtype=np.float32)
        masks = np.zeros(n, dtype=bool)
        jobs = []
        for i, key in enumerate(self.slot_sources()):
            image = obs.get(key) if key is not None else None
            if image is None:
                if key is not None and key not in _WARNED_MISSING:
                    _WARNED_MISSING.add(key)
                    logger.warning("camera %r missing from the observation: slot %r is fed "
                                   "black with mask False", key, self.slots[i])
                out[i].fill(UINT8_TO_FLOAT_LUT[0])
                continue
            masks[i] = True
            if isinstance(image, PreparedImage):
                if image.size != size:
                    raise ValueError(f"camera {key!r}: prepared at {image.size}x{image.size}, "
                                     f"the model needs {size}x{size}")
                if image.resize not in (None, resize):
                    raise ValueError(f"camera {key!r}: prepared with resize={image.resize!r}, "
                                     f"the preprocessor uses resize={resize!r}")
                out[i] = image.data
                continue
            image = check_image(key, image)
            if executor is None:
                prepare_image(image, size, out=out[i], resize=resize)
            else:
                jobs.append(executor.submit(prepare_image, image, size, out[i], resize=resize))
        for job in jobs:
            job.result()
        return out, masks


_WARNED_MISSING: set[str] = set()  # cameras already reported missing (warn once each)


def _match_slot(target: str, slots: Sequence[str]) -> str | None:
    if target in slots:
        return target
    prefixed = LEROBOT_IMAGE_PREFIX + target
    return prefixed if prefixed in slots else None


@dataclasses.dataclass(frozen=True, eq=False)
class Preprocessor:
    """One raw observation -> model inputs (numpy, batch dim 1), openpi's steps and order.

    state (``state_key``) -> check -> ``Normalize`` (float64) -> tokenized with the prompt
    (``prompt_key``, or ``default_prompt``) when the tokenizer has ``discrete_state`` ->
    zero-padded to ``model_action_dim``; cameras -> resize-with-pad -> float32 [-1, 1] in slot
    order.  Used by ``Policy.preprocess`` and the host benchmark; needs no model.
    ``image_threads`` > 1 resizes the cameras on a thread pool.  ``resize``: one of
    ``RESIZE_METHODS`` ("fast": within 1 level of openpi's pixels; "pillow": openpi's bytes).
    """

    normalizer: Normalizer
    tokenizer: PromptTokenizer
    cameras: CameraMapping
    image_size: int
    model_action_dim: int
    state_dim: int | None = None
    state_key: str = "observation/state"
    prompt_key: str = "prompt"
    default_prompt: str | None = None
    image_threads: int = 1
    resize: str = DEFAULT_RESIZE

    def __post_init__(self) -> None:
        check_resize(self.resize, "Preprocessor.resize")
        for name in ("image_size", "model_action_dim", "image_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Preprocessor.{name} must be a positive int, got {value!r}")
        if self.state_dim is not None and not 0 < self.state_dim <= self.model_action_dim:
            raise ValueError(f"state_dim {self.state_dim} must be in 1..{self.model_action_dim} "
                             "(the state is zero-padded to the model's action dim)")
        pool = None
        if self.image_threads > 1:
            pool = ThreadPoolExecutor(self.image_threads, thread_name_prefix="pi0_images")
        object.__setattr__(self, "_pool", pool)

    def __call__(self, obs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """-> images (1, N, 3, S, S) float32, image_masks (1, N) bool, tokens (1, L) int64,
        token_mask (1, L) bool, state (1, A) float32."""
        if not isinstance(obs, Mapping):
            raise TypeError(f"observation must be a dict, found {type(obs).__name__}")
        raw_state = check_state(self.state_key, obs.get(self.state_key), self.state_dim)
        state = self.normalizer.normalize(raw_state, "state")  # (D,) float64 as openpi
        prompt = resolve_prompt(obs.get(self.prompt_key), self.default_prompt, self.prompt_key)
        images, masks = self.cameras.assemble(obs, self.image_size, executor=self._pool,
                                              resize=self.resize)
        discrete = self.tokenizer.discrete_state
        ids, token_mask = self.tokenizer.encode(prompt, state if discrete else None)
        padded = pad_to_dim(state, self.model_action_dim).astype(np.float32)  # (A,)
        return {
            "images": images[None],
            "image_masks": masks[None],
            "tokens": ids[None].copy(),  # the tokenizer's cached arrays are read-only
            "token_mask": token_mask[None].copy(),
            "state": padded[None],
        }

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def check_state(name: str, state: Any, expected_dim: int | None) -> np.ndarray:
    """1-D finite float state of ``expected_dim`` values; keeps a float dtype (float32 stays)."""
    if state is None:
        raise ValueError(f"state {name!r}: missing from the observation")
    arr = np.asarray(state)
    if not np.issubdtype(arr.dtype, np.floating):
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise ValueError(f"state {name!r}: expected real numbers, found dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    if arr.ndim != 1:
        raise ValueError(f"state {name!r}: expected a 1-D vector, found shape {list(arr.shape)}")
    if expected_dim is not None and arr.shape[0] != expected_dim:
        raise ValueError(
            f"state {name!r}: expected {expected_dim} values, found {arr.shape[0]}"
        )
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = np.flatnonzero(bad).tolist()
        raise ValueError(f"state {name!r}: non-finite values (NaN/Inf) at indices {idx}: {arr}")
    return arr


def resolve_prompt(prompt: Any, default_prompt: str | None = None, name: str = "prompt") -> str:
    """openpi's ``InjectDefaultPrompt`` + ``TokenizePrompt`` prompt rules.

    A missing (None) prompt takes ``default_prompt`` if configured, else is an error ("Prompt is
    required").  An empty string is a valid prompt (openpi tokenizes it to BOS [+ "\\n"]).
    numpy string scalars / 0-d arrays and UTF-8 bytes are accepted.
    """
    if prompt is None:
        if default_prompt is None:
            raise ValueError(
                f"prompt {name!r}: missing from the observation and no default_prompt configured"
            )
        return default_prompt
    if isinstance(prompt, np.ndarray) and prompt.ndim == 0:
        prompt = prompt.item()
    if isinstance(prompt, bytes):
        prompt = prompt.decode("utf-8")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt {name!r}: expected a string, found {type(prompt).__name__}")
    return str(prompt)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def clean_prompt(prompt: str) -> str:
    """openpi: ``prompt.strip().replace("_", " ").replace("\\n", " ")`` (no lower-casing)."""
    return prompt.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: Any) -> np.ndarray:
    """pi0.5 state bins, int64 ``[D]``, exactly ``np.digitize(x, STATE_BIN_EDGES) - 1``.

    Values are compared as float64 against the float64 edges (a float32 input converts
    exactly).  Below -1 gives -1, >= 1 - 1/128 gives 255.  Do not use the closed form
    ``floor((x + 1) * 128)``: for tiny negatives ``x + 1`` rounds to 1.0 (128 instead of 127).
    """
    x = np.asarray(state, dtype=np.float64)
    # digitize(x, bins, right=False) for increasing bins is searchsorted(bins, x, "right").
    return np.searchsorted(STATE_BIN_EDGES, x, side="right").astype(np.int64) - 1


def pi05_prompt(cleaned: str, bins: np.ndarray) -> str:
    """The pi0.5 text: ``"Task: {cleaned}, State: {bins};\\nAction: "`` (trailing space kept)."""
    state_str = " ".join(map(str, bins.tolist()))
    return f"Task: {cleaned}, State: {state_str};\nAction: "


class PromptTokenizer:
    """openpi's ``PaligemmaTokenizer.tokenize`` on a local SentencePiece model.

    ``discrete_state=False`` (pi0, pi0.5 ``discrete_state_input=False``):
        ids = encode(cleaned, add_bos=True) + encode("\\n")
    ``discrete_state=True`` (pi0.5 default):
        ids = encode("Task: {cleaned}, State: {bins};\\nAction: ", add_bos=True)
    then right-padded with 0 / mask False to ``max_len`` or truncated to it (mask all True).

    Caching: results are cached per full text (LRU).  The pi0 format depends on the prompt only,
    so it is encoded once per prompt change.  The pi0.5 text changes when a state bin changes;
    it is always encoded whole, because a BPE encoding of a concatenation is not in general the
    concatenation of the encodings (no piece-wise caching); repeated bins (a robot at rest, or
    a 1/128 bin width against small motions) hit the cache.  ``encode`` returns read-only arrays.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        max_len: int,
        discrete_state: bool = False,
        cache_size: int = 1024,
    ) -> None:
        import sentencepiece  # local: only the tokenizer needs it

        if int(max_len) < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        path = Path(model_path).expanduser()
        if path.is_file():
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        else:  # a directory: its SentencePiece file, else a transformers tokenizer (LeRobot)
            from .model.assets import open_tokenizer

            self._sp, path = open_tokenizer(path)
        self.path = path
        self.max_len = int(max_len)
        self.discrete_state = bool(discrete_state)
        self._newline = list(self._sp.encode("\n"))
        self._cache: collections.OrderedDict[str, tuple[np.ndarray, np.ndarray]] = (
            collections.OrderedDict()
        )
        self._cache_size = int(cache_size)
        self._lock = threading.Lock()  # the cache is shared by the ROS and worker threads

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def text(self, prompt: str, state: Any = None) -> str:
        """The exact string openpi passes to SentencePiece (pi0.5) or the cleaned prompt (pi0)."""
        cleaned = clean_prompt(prompt)
        if not self.discrete_state:
            return cleaned
        if state is None:
            raise ValueError(
                "PromptTokenizer(discrete_state=True) needs the normalized state for the pi0.5 "
                "prompt; got state=None"
            )
        return pi05_prompt(cleaned, discretize_state(state))

    def n_tokens(self, prompt: str, state: Any = None) -> int:
        """Tokens of the whole text before padding / truncation (> ``max_len``: it is cut)."""
        ids = self._sp.encode(self.text(prompt, state), add_bos=True)
        return len(ids) + (0 if self.discrete_state else len(self._newline))

    def encode(self, prompt: str, state: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids int64 ``[max_len]``, mask bool ``[max_len]``).  ``state`` ignored for pi0."""
        text = self.text(prompt, state)
        with self._lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                return hit
        if self.discrete_state:
            ids = self._sp.encode(text, add_bos=True)
        else:
            ids = self._sp.encode(text, add_bos=True) + self._newline
        if len(ids) > self.max_len:
            logger.warning(
                "prompt is %d tokens, truncated to max_token_len %d", len(ids), self.max_len
            )
        result = _pad_tokens(ids, self.max_len)
        with self._lock:
            self._cache[text] = result
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return result


def _pad_tokens(ids: Sequence[int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    n = min(len(ids), max_len)
    tokens = np.zeros(max_len, dtype=np.int64)
    tokens[:n] = ids[:n]
    mask = np.zeros(max_len, dtype=bool)
    mask[:n] = True
    tokens.flags.writeable = False
    mask.flags.writeable = False
    return tokens, mask


# --------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------


def _vec(name: str, value: Any) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.array(value, dtype=np.float64)  # JSON floats / float32 tensors -> float64 (exact)
    if arr.ndim != 1:
        raise ValueError(f"norm stat {name!r}: expected a 1-D vector, found {list(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"norm stat {name!r}: non-finite values {arr}")
    arr.flags.writeable = False
    return arr


@dataclasses.dataclass(frozen=True, eq=False)
class NormStats:
    """Per-dimension statistics of one feature (openpi ``shared/normalize.NormStats``), float64."""

    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None

    def __post_init__(self) -> None:
        dims = {}
        for field in ("mean", "std", "q01", "q99"):
            arr = _vec(field, getattr(self, field))
            object.__setattr__(self, field, arr)
            if arr is not None:
                dims[field] = arr.shape[0]
        if len(set(dims.values())) > 1:
            raise ValueError(f"norm stats have different lengths: {dims}")
        if (self.mean is None) != (self.std is None) or (self.q01 is None) != (self.q99 is None):
            raise ValueError(f"norm stats need mean+std and/or q01+q99, found {sorted(dims)}")
        if not dims:
            raise ValueError("norm stats are empty (need mean+std and/or q01+q99)")

    @property
    def dim(self) -> int:
        return int((self.q01 if self.q01 is not None else self.mean).shape[0])

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NormStats:
        return cls(**{k: data.get(k) for k in ("mean", "std", "q01", "q99")})


@dataclasses.dataclass(frozen=True, eq=False)
class Normalizer:
    """openpi's ``Normalize`` / ``Unnormalize`` for the keys ``"state"`` and ``"actions"``.

    ``modes[key]``: ``"quantile"`` (pi0.5 / openpi ``use_quantile_norm``), ``"zscore"`` (pi0) or
    ``"identity"``.  Formulas (openpi ``transforms.py``, SEMANTICS section 4), with the float64
    stats of ``norm_stats.json``; a float32 ``x`` therefore gives a float64 result:

    * zscore:   ``(x - mean[:d]) / (std[:d] + 1e-6)``;  inverse ``x * (std' + 1e-6) + mean'``
      with mean' / std' padded with 0 / 1 to ``x``'s width.
    * quantile: ``(x - q01[:d]) / (q99[:d] - q01[:d] + 1e-6) * 2 - 1``;  inverse
      ``(x + 1.0) / 2.0 * (q99 - q01 + 1e-6) + q01`` on the first ``len(q01)`` dims only (the
      rest pass through); ``(x + 1.0) / 2.0`` is evaluated in ``x``'s dtype as numpy does.

    ``semantics="lerobot"``: LeRobot's ``NormalizerProcessorStep`` / ``UnnormalizerProcessorStep``
    (``_apply_transform``, lerobot 0.4-0.6) instead, in float32 (its stats tensors; robots and
    datasets deliver float32 states) with its operation order, so results are bit-equal:

    * quantile: ``d = q99 - q01``, ``d = 1e-8`` where ``d == 0``;  ``2 * (x - q01) / d - 1``;
      inverse ``(x + 1) * d / 2 + q01``.
    * zscore:   ``(x - mean) / (std + 1e-8)``;  inverse ``x * std + mean``.
    """

    stats: Mapping[str, NormStats]
    modes: Mapping[str, str]
    semantics: str = "openpi"

    def __post_init__(self) -> None:
        if self.semantics not in SEMANTICS:
            raise ValueError(f"Normalizer.semantics: expected one of {list(SEMANTICS)}, found "
                             f"{self.semantics!r}")
        stats = dict(self.stats)
        modes = dict(self.modes)
        for key, mode in modes.items():
            if mode not in NORM_MODES:
                raise ValueError(f"normalization mode for {key!r} must be one of {NORM_MODES}, "
                                 f"got {mode!r}")
            if mode == "identity":
                continue
            if key not in stats:
                raise ValueError(f"no norm stats for {key!r} (have {sorted(stats)})")
            st = stats[key]
            if mode == "quantile" and st.q01 is None:
                raise ValueError(f"norm stats {key!r} have no q01/q99 but quantile normalization "
                                 "is configured (use_quantiles=True)")
            if mode == "zscore" and st.mean is None:
                raise ValueError(f"norm stats {key!r} have no mean/std but z-score normalization "
                                 "is configured (use_quantiles=False)")
        object.__setattr__(self, "stats", stats)
        object.__setattr__(self, "modes", modes)

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_json(cls, path: str | os.PathLike, use_quantiles: bool) -> Normalizer:
        """openpi ``norm_stats.json``: ``{"norm_stats": {"state": {...}, "actions": {...}}}``."""
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / NORM_STATS_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"norm stats file not found: {path}")
        raw = json.loads(path.read_text())
        table = raw.get("norm_stats", raw)
        if not isinstance(table, dict) or not table:
            raise ValueError(
                f"{path}: expected {{'norm_stats': {{key: stats}}}}, found {raw!r:.200}"
            )
        stats = {key: NormStats.from_dict(val) for key, val in table.items()}
        mode = "quantile" if use_quantiles else "zscore"
        return cls(stats, {key: mode for key in stats if key in ("state", "actions")})

    @classmethod
    def from_lerobot(cls, checkpoint_dir: str | os.PathLike, *,
                     allow_unknown_processor_steps: bool = False) -> Normalizer:
        """Stats of a LeRobot policy folder, read (and its processor steps checked) by
        ``pi0_ros.model.assets.read_lerobot_processors``: the preprocessor's normalizer file for
        the state, the postprocessor's unnormalizer file for the actions, the modes from
        ``norm_map``.  With openpi's formulas unless ``with_semantics("lerobot")`` (what
        ``Policy`` does for a LeRobot folder by default); the two differ in the last float32 bits
        and hugely on degenerate dims (std = 0, q01 = q99).
        """
        from .model.assets import read_lerobot_processors

        found = read_lerobot_processors(
            checkpoint_dir, allow_unknown_processor_steps=allow_unknown_processor_steps)
        stats = {key: NormStats.from_dict(values) for key, values in found.stats.items()}
        return cls(stats, found.modes)

    def with_modes(self, use_quantiles: bool) -> Normalizer:
        mode = "quantile" if use_quantiles else "zscore"
        return Normalizer(self.stats, {key: mode for key in self.modes}, self.semantics)

    def with_semantics(self, semantics: str) -> Normalizer:
        """The same stats and modes with openpi's or LeRobot's formulas (``SEMANTICS``)."""
        return Normalizer(self.stats, self.modes, semantics)

    def dim(self, key: str) -> int:
        return self.stats[key].dim

    # -- math -------------------------------------------------------------------------------

    def normalize(self, x: Any, key: str = "state") -> np.ndarray:
        """openpi ``Normalize`` of ``x[..., d]`` with the first ``d`` stats entries."""
        x = np.asarray(x)
        mode = self._mode(key)
        if mode == "identity":
            return x
        st = self.stats[key]
        d = x.shape[-1]
        if d > st.dim:
            raise ValueError(f"{key}: {d} values but the norm stats have {st.dim} dims")
        if self.semantics == "lerobot":
            return _lerobot_normalize(x, st, mode, d)
        if mode == "zscore":
            return (x - st.mean[:d]) / (st.std[:d] + NORM_EPS)
        return (x - st.q01[:d]) / (st.q99[:d] - st.q01[:d] + NORM_EPS) * 2.0 - 1.0

    def unnormalize(self, x: Any, key: str = "actions") -> np.ndarray:
        """openpi ``Unnormalize`` of a (padded-width) model output ``x[..., A]``."""
        x = np.asarray(x)
        mode = self._mode(key)
        if mode == "identity":
            return x
        st = self.stats[key]
        width = x.shape[-1]
        if st.dim > width:
            raise ValueError(f"{key}: width {width} is smaller than the norm stats ({st.dim})")
        if self.semantics == "lerobot":
            head = _lerobot_unnormalize(x[..., : st.dim], st, mode)
            if st.dim == width:
                return head
            return np.concatenate([head, x[..., st.dim :].astype(np.float32)], axis=-1)
        if mode == "zscore":
            pad = width - st.dim
            mean = np.pad(st.mean, (0, pad), constant_values=0.0)
            std = np.pad(st.std, (0, pad), constant_values=1.0)
            return x * (std + NORM_EPS) + mean
        d = st.dim
        # (x + 1.0) / 2.0 stays in x's dtype (Python scalars do not promote), the rest float64.
        head = (x[..., :d] + 1.0) / 2.0 * (st.q99 - st.q01 + NORM_EPS) + st.q01
        if d == width:
            return head
        return np.concatenate([head, x[..., d:]], axis=-1)

    def _mode(self, key: str) -> str:
        try:
            return self.modes[key]
        except KeyError:
            raise KeyError(
                f"no normalization configured for {key!r} (have {sorted(self.modes)})"
            ) from None


def _f32(stat: np.ndarray, d: int | None = None) -> np.ndarray:
    return np.asarray(stat if d is None else stat[:d], dtype=np.float32)


def _quantile_range(st: NormStats, d: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """LeRobot's (q01, q99 - q01) in float32, the width replaced by eps where it is 0."""
    q01 = _f32(st.q01, d)
    width = _f32(st.q99, d) - q01
    return q01, np.where(width == 0, LEROBOT_NORM_EPS, width).astype(np.float32)


def _lerobot_normalize(x: np.ndarray, st: NormStats, mode: str, d: int) -> np.ndarray:
    """LeRobot ``_apply_transform(inverse=False)``, float32, its operation order."""
    x = np.asarray(x, dtype=np.float32)
    if mode == "zscore":
        return (x - _f32(st.mean, d)) / (_f32(st.std, d) + LEROBOT_NORM_EPS)
    q01, width = _quantile_range(st, d)
    return np.float32(2.0) * (x - q01) / width - np.float32(1.0)


def _lerobot_unnormalize(x: np.ndarray, st: NormStats, mode: str) -> np.ndarray:
    """LeRobot ``_apply_transform(inverse=True)``, float32, its operation order."""
    x = np.asarray(x, dtype=np.float32)
    if mode == "zscore":
        return x * _f32(st.std) + _f32(st.mean)
    q01, width = _quantile_range(st)
    return (x + np.float32(1.0)) * width / np.float32(2.0) + q01


def pad_to_dim(x: np.ndarray, dim: int) -> np.ndarray:
    """Zero-pad the last axis to ``dim`` (openpi ``PadStatesAndActions``); longer is an error."""
    width = x.shape[-1]
    if width > dim:
        raise ValueError(f"cannot pad width {width} to model dim {dim}: robot dim too large")
    if width == dim:
        return x
    out = np.zeros((*x.shape[:-1], dim), dtype=x.dtype)
    out[..., :width] = x
    return out

