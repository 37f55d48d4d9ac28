"""Raw robot observation <-> model tensors, numerically as openpi does it.

Everything here reproduces openpi's policy-side transforms (commit ``15a9616a``; see
``docs/SEMANTICS.md`` of the reference data, sections 1-4) and is checked value by value against
the ``openpi_preprocess`` fixture:

* ``resize_with_pad``  <- ``openpi_client.image_tools.resize_with_pad`` (PIL, uint8 in / out)
* ``image_to_model``   <- ``models.model.Observation.from_dict`` (``u8 / 255 * 2 - 1``, float32)
* ``PromptTokenizer``  <- ``models.tokenizer.PaligemmaTokenizer.tokenize`` (pi0 / pi0.5 formats)
* ``discretize_state`` <- the ``np.digitize`` line of that tokenizer
* ``Normalizer``       <- ``transforms.Normalize`` / ``transforms.Unnormalize``
* ``CameraMapping``    <- the robot input transforms (``LiberoInputs`` and friends): robot
  cameras -> model slots, missing slots black with mask False
* ``check_image`` / ``check_state`` / ``resolve_prompt``: input validation with errors that name
  the field, what was expected and what was found; ``InjectDefaultPrompt`` semantics.

Pure numpy / Pillow / sentencepiece; no torch, no rclpy.
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
from PIL import Image

logger = logging.getLogger(__name__)

# openpi's three image slots, in token order (openpi `models/model.py` IMAGE_KEYS).
MODEL_SLOTS: tuple[str, ...] = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")

# LeRobot names its camera features `observation.images.<name>`.
LEROBOT_IMAGE_PREFIX = "observation.images."

# pi0.5 state bins: np.digitize(x, np.linspace(-1, 1, 257)[:-1]) - 1 compares x against these
# float64 edges (-1 + k/128, k = 0..255).  (openpi `models/tokenizer.py`)
STATE_BIN_EDGES: np.ndarray = np.linspace(-1.0, 1.0, 256 + 1)[:-1]  # (256,) float64

# uint8 -> float32 in [-1, 1]; openpi: `image.to(float32) / 255.0 * 2.0 - 1.0` (float32 ops).
# A lookup table gives the same bits (each entry is that float32 expression) and is ~10x faster.
UINT8_TO_FLOAT_LUT: np.ndarray = (
    np.arange(256, dtype=np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)
)  # (256,) float32
UINT8_TO_FLOAT_LUT.flags.writeable = False

TOKENIZER_FILENAMES: tuple[str, ...] = ("tokenizer.model", "paligemma_tokenizer.model")
NORM_STATS_FILENAME = "norm_stats.json"
NORM_EPS = 1e-6  # openpi's `+ 1e-6` in every normalization formula (SEMANTICS section 4)

NORM_MODES = ("quantile", "zscore", "identity")
_LEROBOT_MODES = {"QUANTILES": "quantile", "MEAN_STD": "zscore", "IDENTITY": "identity"}
_LEROBOT_KEYS = {"STATE": "state", "ACTION": "actions"}


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def resize_geometry(in_h: int, in_w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left) of openpi's resize-with-pad for an ``in_h x in_w`` image.

    Same float expressions as ``image_tools._resize_with_pad_pil`` (truncation, not rounding;
    the odd padding pixel goes to the bottom / right).
    """
    ratio = max(in_w / width, in_h / height)
    new_h, new_w = int(in_h / ratio), int(in_w / ratio)
    if new_h < 1 or new_w < 1:
        raise ValueError(
            f"image {in_h}x{in_w}: aspect ratio too extreme to resize-with-pad into "
            f"{height}x{width} (would be {new_h}x{new_w})"
        )
    top, left = max(0, int((height - new_h) / 2)), max(0, int((width - new_w) / 2))
    return new_h, new_w, top, left


def _pil_resize(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """PIL bilinear resize of a uint8 HWC RGB array (antialiased when shrinking).

    Done as two one-axis resizes, horizontal then vertical.  Pillow resamples separably and
    rounds to uint8 between the passes, so the pass order changes results by 1 level.  Pillow
    <= 12 (openpi's fixture: 11.2.1) always runs horizontal first; Pillow 13 picks the order
    itself (vertical first for e.g. a 301x97 -> 224x72 shrink, 11134 pixels off by 1).  Two
    explicit passes give Pillow <= 12's bytes on every version, at the same cost.
    """
    pil = Image.fromarray(image)
    in_h, in_w = image.shape[:2]
    if new_w != in_w:
        pil = pil.resize((new_w, in_h), resample=Image.BILINEAR)
    if new_h != in_h:
        pil = pil.resize((new_w, new_h), resample=Image.BILINEAR)
    return np.asarray(pil)  # (new_h, new_w, 3) uint8


def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> uint8 ``[height, width, 3]``: openpi's resize-with-pad.

    Already that size: returned unchanged (the same object, as openpi does).  Otherwise the
    aspect-preserving PIL ``BILINEAR`` resize pasted on a black canvas; bit-identical to
    ``openpi_client.image_tools.resize_with_pad`` (PIL's own fixed-point resampler is used).
    """
    image = check_image("image", image)
    in_h, in_w = image.shape[:2]
    if (in_h, in_w) == (height, width):
        return image
    new_h, new_w, top, left = resize_geometry(in_h, in_w, height, width)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas[top : top + new_h, left : left + new_w] = _pil_resize(image, new_h, new_w)
    return canvas


def image_to_model(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 ``[S, S, 3]`` -> float32 ``[3, S, S]`` in [-1, 1], bit-identical to openpi.

    ``out``: optional preallocated float32 ``[3, S, S]`` buffer written in place (C-contiguous).
    """
    image = check_image("image", image)
    chw = np.ascontiguousarray(image.transpose(2, 0, 1))  # (3, S, S) uint8: cheap byte copy
    if out is None:
        return UINT8_TO_FLOAT_LUT[chw]
    np.take(UINT8_TO_FLOAT_LUT, chw, out=out)
    return out


def prepare_image(image: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 HWC RGB camera image -> model float32 ``[3, size, size]`` (resize-with-pad + convert).

    Same values as ``image_to_model(resize_with_pad(image, size, size))`` without the canvas:
    the padding is written directly as ``-1.0`` (= black) and the resized pixels through the LUT.
    Thread-safe (PIL releases the GIL while resampling), so cameras can be prepared in parallel
    or as they arrive.
    """
    image = check_image("image", image)
    if out is None:
        out = np.empty((3, size, size), dtype=np.float32)
    in_h, in_w = image.shape[:2]
    if (in_h, in_w) == (size, size):
        return image_to_model(image, out=out)
    new_h, new_w, top, left = resize_geometry(in_h, in_w, size, size)
    resized_chw = np.ascontiguousarray(_pil_resize(image, new_h, new_w).transpose(2, 0, 1))
    if (new_h, new_w) == (size, size):
        np.take(UINT8_TO_FLOAT_LUT, resized_chw, out=out)
    else:
        out.fill(UINT8_TO_FLOAT_LUT[0])  # black padding
        region = out[:, top : top + new_h, left : left + new_w]  # (3, new_h, new_w) view
        np.take(UINT8_TO_FLOAT_LUT, resized_chw, out=region)
    return out  # (3, size, size) float32


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedImage:
    """A camera image already through ``prepare_image``: float32 ``[3, S, S]`` in [-1, 1].

    Lets a caller resize each camera as it arrives (e.g. in its ROS callback) so that only a copy
    remains on the observation's critical path; ``CameraMapping.assemble`` accepts it in place of
    the uint8 image.  Same values as preparing inside ``assemble``.
    """

    data: np.ndarray

    def __post_init__(self) -> None:
        d = self.data
        if (not isinstance(d, np.ndarray) or d.dtype != np.float32 or d.ndim != 3
                or d.shape[0] != 3 or d.shape[1] != d.shape[2]):
            found = f"{d.dtype} {list(d.shape)}" if isinstance(d, np.ndarray) else type(d)
            raise ValueError(f"PreparedImage.data: expected float32 [3, S, S], found {found}")

    @classmethod
    def from_uint8(cls, image: np.ndarray, size: int, name: str = "image") -> PreparedImage:
        return cls(prepare_image(check_image(name, image), size))

    @property
    def size(self) -> int:
        return int(self.data.shape[1])


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
    ) -> tuple[np.ndarray, np.ndarray]:
        """Images float32 ``[N, 3, size, size]`` and masks bool ``[N]`` in slot order.

        Each camera: a uint8 HWC RGB image or a ``PreparedImage``.  ``executor``: optional
        thread pool to resize cameras in parallel (PIL releases the GIL).
        """
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
                out[i] = image.data
                continue
            image = check_image(key, image)
            if executor is None:
                prepare_image(image, size, out=out[i])
            else:
                jobs.append(executor.submit(prepare_image, image, size, out[i]))
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
    ``image_threads`` > 1 resizes the cameras on a thread pool.
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

    def __post_init__(self) -> None:
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
        images, masks = self.cameras.assemble(obs, self.image_size, executor=self._pool)
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


def check_image(name: str, image: Any) -> np.ndarray:
    """Require a uint8 ``[H, W, 3]`` RGB numpy array; error names the field, expected and found."""
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"image {name!r}: expected a numpy uint8 array [H, W, 3] (HWC RGB), "
            f"found {type(image).__name__}"
        )
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image {name!r}: expected uint8 [H, W, 3] (HWC RGB), "
            f"found {image.dtype} {list(image.shape)}"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image {name!r}: empty image {list(image.shape)}")
    return image


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


def find_tokenizer(checkpoint_dir: str | os.PathLike | None, configured: Any = None) -> Path:
    """Locate the SentencePiece ``tokenizer.model``; nothing is downloaded.

    Looks in order at: ``configured`` (a file, or a directory holding one), the checkpoint dir,
    its parent, ``<checkpoint>/assets/``.  Raises ``FileNotFoundError`` listing every path tried.
    A transformers directory with only ``tokenizer.json`` is reported as such (pi0_ros reads the
    SentencePiece file; the ``tokenizers`` package is not a dependency).
    """
    dirs: list[Path] = []
    tried: list[str] = []
    if configured is not None:
        cpath = Path(configured).expanduser()
        if cpath.is_file():
            return cpath
        if cpath.is_dir():
            dirs.append(cpath)
        else:
            tried.append(f"{cpath} (configured tokenizer: no such file or directory)")
    if checkpoint_dir is not None:
        ckpt = Path(checkpoint_dir).expanduser()
        dirs += [ckpt, ckpt.parent, ckpt / "assets"]
    json_only: list[Path] = []
    for d in dirs:
        for fname in TOKENIZER_FILENAMES:
            candidate = d / fname
            if candidate.is_file():
                return candidate
            tried.append(str(candidate))
        if (d / "tokenizer.json").is_file():
            json_only.append(d / "tokenizer.json")
    hint = ""
    if json_only:
        hint = (
            f"; found {[str(p) for p in json_only]} but pi0_ros needs the SentencePiece model "
            "file tokenizer.model (it sits next to tokenizer.json in the PaliGemma repo)"
        )
    raise FileNotFoundError(
        "PaliGemma SentencePiece tokenizer not found; looked at: "
        + ", ".join(tried)
        + hint
        + ". Pass tokenizer=<path to tokenizer.model> (openpi caches it at "
        "~/.cache/openpi/big_vision/paligemma_tokenizer.model)."
    )


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
        if path.is_dir() or not path.is_file():
            path = find_tokenizer(None, path)
        self.path = path
        self.max_len = int(max_len)
        self.discrete_state = bool(discrete_state)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
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
    """

    stats: Mapping[str, NormStats]
    modes: Mapping[str, str]

    def __post_init__(self) -> None:
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
    def from_lerobot(cls, checkpoint_dir: str | os.PathLike) -> Normalizer:
        """Stats of a LeRobot policy folder (``policy_preprocessor.json`` + its state files).

        The normalizer step's ``state_file`` (``observation.state.<stat>`` / ``action.<stat>``)
        gives the state stats, the postprocessor's unnormalizer file the action stats; the mode
        of each comes from ``norm_map`` (QUANTILES -> quantile, MEAN_STD -> zscore).  We still
        apply openpi's formulas (``+ 1e-6``, float64), not LeRobot's (``eps`` 1e-8, float32): this
        package reproduces openpi, and the two differ on degenerate dims (std = 0, q01 = q99).
        """
        ckpt = Path(checkpoint_dir).expanduser()
        pre = _lerobot_step(ckpt / "policy_preprocessor.json", "normalizer_processor")
        stats, modes = _lerobot_stats(ckpt, pre)
        post_file = ckpt / "policy_postprocessor.json"
        if post_file.is_file():
            post = _lerobot_step(post_file, "unnormalizer_processor")
            post_stats, post_modes = _lerobot_stats(ckpt, post)
            if "actions" in post_stats:
                stats["actions"] = post_stats["actions"]
                modes["actions"] = post_modes["actions"]
        return cls(stats, modes)

    def with_modes(self, use_quantiles: bool) -> Normalizer:
        mode = "quantile" if use_quantiles else "zscore"
        return Normalizer(self.stats, {key: mode for key in self.modes})

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


def _lerobot_step(pipeline_file: Path, registry_name: str) -> dict:
    if not pipeline_file.is_file():
        raise FileNotFoundError(f"LeRobot processor file not found: {pipeline_file}")
    pipeline = json.loads(pipeline_file.read_text())
    for step in pipeline.get("steps", []):
        if step.get("registry_name") == registry_name:
            if not step.get("state_file"):
                raise ValueError(f"{pipeline_file}: step {registry_name!r} has no state_file")
            return step
    names = [s.get("registry_name") for s in pipeline.get("steps", [])]
    raise ValueError(f"{pipeline_file}: no {registry_name!r} step (steps: {names})")


def _lerobot_stats(ckpt: Path, step: dict) -> tuple[dict[str, NormStats], dict[str, str]]:
    from safetensors.numpy import load_file

    tensors = load_file(str(ckpt / step["state_file"]))
    config = step.get("config", {})
    norm_map = config.get("norm_map", {})
    stats: dict[str, NormStats] = {}
    modes: dict[str, str] = {}
    for feature, spec in config.get("features", {}).items():
        key = _LEROBOT_KEYS.get(spec.get("type"))
        if key is None:
            continue
        lerobot_mode = norm_map.get(spec["type"], "IDENTITY")
        if lerobot_mode not in _LEROBOT_MODES:
            raise ValueError(
                f"{step['state_file']}: {feature} uses LeRobot normalization {lerobot_mode!r}; "
                f"openpi semantics support {sorted(_LEROBOT_MODES)}"
            )
        modes[key] = _LEROBOT_MODES[lerobot_mode]
        found = {
            stat: tensors[f"{feature}.{stat}"]
            for stat in ("mean", "std", "q01", "q99")
            if f"{feature}.{stat}" in tensors
        }
        if found:
            stats[key] = NormStats.from_dict(found)
    return stats, modes


def find_norm_stats(
    checkpoint_dir: str | os.PathLike, norm_stats: str | os.PathLike | None = None
) -> tuple[str, Path]:
    """Locate the norm stats of a checkpoint -> ``("openpi", norm_stats.json)`` or
    ``("lerobot", checkpoint_dir)``.

    ``norm_stats``: an explicit ``norm_stats.json`` / directory holding one, or an openpi asset
    id (``<checkpoint>/assets/<asset_id>/norm_stats.json``).  None: the single asset directory
    under ``<checkpoint>/assets/`` (several: the asset id is required), else
    ``<checkpoint>/norm_stats.json``, else LeRobot's ``policy_preprocessor.json``.
    """
    ckpt = Path(checkpoint_dir).expanduser()
    assets = ckpt / "assets"
    tried: list[str] = []
    if norm_stats is not None:
        explicit = Path(norm_stats).expanduser()
        for candidate in (explicit, explicit / NORM_STATS_FILENAME):
            if candidate.is_file():
                return "openpi", candidate
            tried.append(str(candidate))
        by_id = assets / str(norm_stats) / NORM_STATS_FILENAME
        if by_id.is_file():
            return "openpi", by_id
        tried.append(str(by_id))
        raise FileNotFoundError(f"norm stats {str(norm_stats)!r} not found; looked at: "
                                + ", ".join(tried))
    asset_files = sorted(assets.glob(f"*/{NORM_STATS_FILENAME}")) if assets.is_dir() else []
    if len(asset_files) == 1:
        return "openpi", asset_files[0]
    if len(asset_files) > 1:
        ids = [p.parent.name for p in asset_files]
        raise ValueError(f"{assets} holds norm stats for several assets {ids}; "
                         "pass norm_stats=<asset id> (or a path)")
    tried.append(f"{assets}/*/{NORM_STATS_FILENAME}")
    for candidate in (ckpt / NORM_STATS_FILENAME,):
        if candidate.is_file():
            return "openpi", candidate
        tried.append(str(candidate))
    if (ckpt / "policy_preprocessor.json").is_file():
        return "lerobot", ckpt
    tried.append(str(ckpt / "policy_preprocessor.json"))
    raise FileNotFoundError("norm stats not found; looked at: " + ", ".join(tried)
                            + ". Pass norm_stats=<asset id or path to norm_stats.json>.")


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

