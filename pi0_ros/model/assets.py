"""Checkpoint side files: the tokenizer, the norm stats, LeRobot's processor pipelines and
`rtc_config`.  The weights and config.json are `weights.py`'s; everything else a checkpoint
directory carries (or points at) is found and read here.  Nothing is downloaded.

LeRobot policy folders (`save_pretrained` of LeRobot 0.4-0.6) hold `policy_preprocessor.json` /
`policy_postprocessor.json`: ``{"name", "steps": [{"registry_name", "config", "state_file"?}]}``.
pi0_ros runs LeRobot's pi0 / pi05 pipelines with its own code, so a pipeline is accepted only
when every step is one pi0_ros implements, with the configuration it implements (`STEP_CHECKS`);
anything else would be silently skipped, so it is refused unless the caller says
``allow_unknown_processor_steps=True``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .weights import CheckpointError

log = logging.getLogger(__name__)

TOKENIZER_FILENAMES: tuple[str, ...] = ("tokenizer.model", "paligemma_tokenizer.model")
HF_TOKENIZER_FILE = "tokenizer.json"  # marks a transformers tokenizer directory
PALIGEMMA_TOKENIZER = "google/paligemma-3b-pt-224"  # what LeRobot's tokenizer_processor names
NORM_STATS_FILENAME = "norm_stats.json"
PREPROCESSOR_FILE = "policy_preprocessor.json"
POSTPROCESSOR_FILE = "policy_postprocessor.json"
TOKENIZER_HELP = (
    "Get it with `huggingface-cli download google/paligemma-3b-pt-224 tokenizer.model "
    "--local-dir DIR` (a gated repo: accept its licence on huggingface.co and log in first) or "
    "from openpi's `gs://big_vision/paligemma_tokenizer.model`, then put it next to the "
    "checkpoint or pass tokenizer=PATH (a tokenizer.model file or a transformers tokenizer "
    "directory)")

# Probe texts for the transformers guard: every character class a pi0.5 prompt uses.
_PROBES = ("pick up the red block", "Task: put it in the bowl, State: 230 -1 86 255 0;\nAction: ",
           "\n")


def checkpoint_dir_of(path: str | os.PathLike) -> Path:
    """The checkpoint directory whose side files are looked up; a missing path, a file and an
    empty directory are refused as exactly that (not as a missing tokenizer)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    if next(path.iterdir(), None) is None:
        raise CheckpointError(f"checkpoint directory {path} is empty (expected model.safetensors "
                              "and config.json)")
    return path


# -- tokenizer --------------------------------------------------------------------------------
def find_tokenizer(checkpoint_dir: str | os.PathLike | None, configured: Any = None) -> Path:
    """The PaliGemma tokenizer of a checkpoint: a SentencePiece file, or a transformers tokenizer
    directory (one holding `tokenizer.json`; read by `open_tokenizer`).

    ``configured`` (a file, or a directory holding one) is taken as given or refused.  Otherwise
    looks, in order, in: the checkpoint dir, its parent, `<checkpoint>/assets/`, the Hugging Face
    cache of the tokenizer a LeRobot preprocessor names (`$HF_HUB_CACHE`, `$HF_HOME/hub`,
    `~/.cache/huggingface/hub`), openpi's cache (`$OPENPI_DATA_HOME/big_vision`,
    `~/.cache/openpi/big_vision`).  One `FileNotFoundError` lists every place and how to get it.
    """
    if configured is not None:
        path = Path(configured).expanduser()
        if path.is_file():
            return path
        if not path.is_dir():
            raise FileNotFoundError(f"configured tokenizer {path}: no such file or directory")
        tried: list[str] = []
        found = _tokenizer_in(path, tried)
        if found is None:
            raise FileNotFoundError(f"configured tokenizer directory {path} holds none of "
                                    f"{[*TOKENIZER_FILENAMES, HF_TOKENIZER_FILE]}. "
                                    + TOKENIZER_HELP)
        return found
    dirs: list[Path] = []
    tried = []
    if checkpoint_dir is not None:
        ckpt = checkpoint_dir_of(checkpoint_dir)
        dirs += [ckpt, ckpt.parent, ckpt / "assets"]
        name = lerobot_tokenizer_name(ckpt)
        if name is not None:
            snapshots, cache_tried = _hf_cache_snapshots(name)
            dirs += snapshots
            tried += cache_tried
    openpi_cache = Path(os.environ.get("OPENPI_DATA_HOME", "~/.cache/openpi")).expanduser()
    dirs.append(openpi_cache / "big_vision")
    for d in dirs:
        found = _tokenizer_in(d, tried)
        if found is not None:
            return found
    raise FileNotFoundError("PaliGemma tokenizer not found; looked at: " + ", ".join(tried)
                            + ". " + TOKENIZER_HELP)


def _tokenizer_in(d: Path, tried: list[str]) -> Path | None:
    for name in TOKENIZER_FILENAMES:
        if (d / name).is_file():
            return d / name
        tried.append(str(d / name))
    if (d / HF_TOKENIZER_FILE).is_file():
        return d
    tried.append(str(d / HF_TOKENIZER_FILE))
    return None


def _hf_cache_snapshots(repo_id: str) -> tuple[list[Path], list[str]]:
    """Snapshot dirs of ``repo_id`` in the local Hugging Face cache (refs/main first)."""
    if "HF_HUB_CACHE" in os.environ:
        cache = Path(os.environ["HF_HUB_CACHE"])
    else:
        cache = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub"
    repo = cache.expanduser() / ("models--" + repo_id.replace("/", "--"))
    snapshots = sorted(p for p in (repo / "snapshots").glob("*") if p.is_dir())
    main = repo / "refs" / "main"
    if main.is_file():
        head = repo / "snapshots" / main.read_text().strip()
        snapshots = [head] + [s for s in snapshots if s != head]
    return snapshots, ([] if snapshots else [f"{repo}/snapshots/* ({repo_id} not in the "
                                             "Hugging Face cache)"])


class TransformersTokenizer:
    """A transformers PaliGemma tokenizer behind the SentencePiece calls `PromptTokenizer` makes
    (``encode(text, add_bos=...)``, ``get_piece_size()``).

    Loaded as LeRobot's checkpoints expect (`GemmaTokenizer.from_pretrained(dir,
    add_bos_token=True)`: BOS added, no EOS) and checked before use: some transformers versions
    build a tokenizer that silently maps every text to `<unk>` (e.g. `GemmaTokenizer(vocab_file=)`
    in 5.5), and when the directory also holds `tokenizer.model` the ids must equal
    SentencePiece's on the probe texts.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        from transformers import GemmaTokenizer

        self.path = Path(directory)
        try:
            self._tok = GemmaTokenizer.from_pretrained(str(self.path), add_bos_token=True,
                                                       add_eos_token=False, local_files_only=True)
        except Exception as e:  # transformers raises many types for a broken directory
            raise ValueError(f"transformers could not load the tokenizer in {self.path} "
                             f"({type(e).__name__}: {e}). " + TOKENIZER_HELP) from None
        self._check()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return list(self._tok(text, add_special_tokens=add_bos)["input_ids"])

    def get_piece_size(self) -> int:
        return int(self._tok.vocab_size)

    def _check(self) -> None:
        bos, unk = self._tok.bos_token_id, self._tok.unk_token_id
        for text in _PROBES:
            ids = self.encode(text, add_bos=True)
            if bos is None or not ids or ids[0] != bos:
                raise ValueError(f"tokenizer {self.path}: {text!r} -> {ids[:8]}, expected BOS "
                                 f"({bos}) first (add_bos_token was not honoured)")
            if unk is not None and all(i == unk for i in ids[1:]):
                raise ValueError(f"tokenizer {self.path}: {text!r} -> only <unk> ({ids[:8]}); "
                                 "this transformers version built a broken tokenizer")
        spm = next((self.path / n for n in TOKENIZER_FILENAMES if (self.path / n).is_file()),
                   None)
        if spm is not None:
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_file=str(spm))
            for text in _PROBES:
                ours, theirs = self.encode(text, add_bos=True), sp.encode(text, add_bos=True)
                if ours != theirs:
                    raise ValueError(f"tokenizer {self.path}: transformers gives {ours} for "
                                     f"{text!r}, SentencePiece ({spm.name}) {theirs}")


def open_tokenizer(path: str | os.PathLike) -> tuple[Any, Path]:
    """-> (encoder for `PromptTokenizer`, the file or directory read): SentencePiece for a
    `.model` file (or a directory holding one), `TransformersTokenizer` for a directory with
    only `tokenizer.json`."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = find_tokenizer(None, path)
        if path.is_dir():
            return TransformersTokenizer(path), path
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path}: no such file or directory")
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(path)), path


# -- norm stats -------------------------------------------------------------------------------
def find_norm_stats(checkpoint_dir: str | os.PathLike,
                    norm_stats: str | os.PathLike | None = None) -> tuple[str, Path]:
    """Locate the norm stats of a checkpoint -> ``("openpi", norm_stats.json)`` or
    ``("lerobot", checkpoint_dir)``.

    ``norm_stats``: an explicit ``norm_stats.json`` / directory holding one, or an openpi asset
    id (``<checkpoint>/assets/<asset_id>/norm_stats.json``).  None: the single asset directory
    under ``<checkpoint>/assets/`` (several: the asset id is required), else
    ``<checkpoint>/norm_stats.json``, else LeRobot's ``policy_preprocessor.json``.
    """
    ckpt = checkpoint_dir_of(checkpoint_dir)
    assets = ckpt / "assets"
    tried: list[str] = []
    if norm_stats is not None:
        explicit = Path(norm_stats).expanduser()
        for candidate in (explicit, explicit / NORM_STATS_FILENAME,
                          assets / str(norm_stats) / NORM_STATS_FILENAME):
            if candidate.is_file():
                return "openpi", candidate
            tried.append(str(candidate))
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
    if (ckpt / NORM_STATS_FILENAME).is_file():
        return "openpi", ckpt / NORM_STATS_FILENAME
    tried.append(str(ckpt / NORM_STATS_FILENAME))
    if (ckpt / PREPROCESSOR_FILE).is_file():
        return "lerobot", ckpt
    tried.append(str(ckpt / PREPROCESSOR_FILE))
    raise FileNotFoundError("norm stats not found; looked at: " + ", ".join(tried)
                            + ". Pass norm_stats=<asset id or path to norm_stats.json>.")


# -- LeRobot processor pipelines --------------------------------------------------------------
def _rename_empty(config: Mapping[str, Any]) -> str | None:
    if config.get("rename_map"):
        return (f"rename_map {config['rename_map']} renames inputs; pi0_ros maps robot inputs "
                "with its own camera / input-key settings")
    return None


def _disabled(config: Mapping[str, Any]) -> str | None:
    if config.get("enabled", False):
        return ("enabled=true: relative actions (state-relative training targets) are not "
                "implemented by pi0_ros")
    return None


def _right_padded(config: Mapping[str, Any]) -> str | None:
    if config.get("padding_side", "right") != "right":
        return f"padding_side={config['padding_side']!r}; pi0_ros pads on the right"
    return None


def _no_check(config: Mapping[str, Any]) -> str | None:
    return None


# Steps of LeRobot's pi0 / pi05 pipelines (0.4.x-0.6.x) and what pi0_ros requires of their
# config; the check returns why a configuration is not supported, or None.
STEP_CHECKS: dict[str, dict[str, Callable[[Mapping[str, Any]], str | None]]] = {
    "preprocessor": {
        "rename_observations_processor": _rename_empty,
        "to_batch_processor": _no_check,
        "relative_actions_processor": _disabled,
        "normalizer_processor": _no_check,  # modes are checked where the stats are read
        "pi05_prepare_state_tokenizer_processor_step": _no_check,
        "pi0_new_line_processor": _no_check,
        "tokenizer_processor": _right_padded,
        "device_processor": _no_check,
    },
    "postprocessor": {
        "unnormalizer_processor": _no_check,
        "absolute_actions_processor": _disabled,
        "device_processor": _no_check,
    },
}
# LeRobot normalization modes by feature type -> pi0_ros Normalizer modes.
LEROBOT_NORM_MODES = {"QUANTILES": "quantile", "MEAN_STD": "zscore", "IDENTITY": "identity"}
_LEROBOT_KEYS = {"STATE": "state", "ACTION": "actions"}


@dataclasses.dataclass(frozen=True)
class RTCConfig:
    """LeRobot's `rtc_config` (real-time chunking) of a policy config.json, as written; not yet
    applied by pi0_ros (logged at load so a user sees it is there)."""

    enabled: bool = True
    prefix_attention_schedule: str = "LINEAR"
    max_guidance_weight: float = 10.0
    execution_horizon: int = 10

    @classmethod
    def from_json(cls, raw: Any, source: str = "config.json") -> RTCConfig | None:
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            raise CheckpointError(f"{source}: rtc_config must be an object or null, found "
                                  f"{raw!r:.80}")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            cfg = cls(enabled=bool(raw.get("enabled", True)),
                      prefix_attention_schedule=str(raw.get("prefix_attention_schedule",
                                                            "LINEAR")).upper(),
                      max_guidance_weight=float(raw.get("max_guidance_weight", 10.0)),
                      execution_horizon=int(raw.get("execution_horizon", 10)))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: rtc_config {dict(raw)} ({e})") from None
        ignored = sorted(set(raw) - known - {"debug", "debug_maxlen"})
        if ignored:
            log.warning("%s: rtc_config fields %s are not known to pi0_ros", source, ignored)
        return cfg


@dataclasses.dataclass(frozen=True)
class LeRobotProcessors:
    """What pi0_ros reads from a LeRobot policy folder besides the weights."""

    stats: dict[str, dict[str, np.ndarray]]  # {"state" | "actions": {stat: float32 vector}}
    modes: dict[str, str]  # {"state" | "actions": Normalizer mode}
    steps: dict[str, tuple[str, ...]]  # {"preprocessor" | "postprocessor": registry names}
    tokenizer_name: str | None
    tokenizer_max_length: int | None
    rtc: RTCConfig | None


def read_lerobot_processors(checkpoint_dir: str | os.PathLike, *,
                            allow_unknown_processor_steps: bool = False) -> LeRobotProcessors:
    """Read and check a LeRobot policy folder's processor pipelines, stats and `rtc_config`.

    Every step must be in `STEP_CHECKS` with a supported configuration, else `CheckpointError`
    naming the file, the step and why; ``allow_unknown_processor_steps=True`` logs a warning and
    skips such steps instead (their effect is then NOT applied).
    """
    ckpt = Path(checkpoint_dir).expanduser()
    steps: dict[str, tuple[str, ...]] = {}
    pipelines: dict[str, list[dict]] = {}
    for kind, fname in (("preprocessor", PREPROCESSOR_FILE), ("postprocessor",
                                                               POSTPROCESSOR_FILE)):
        path = ckpt / fname
        if not path.is_file():
            if kind == "preprocessor":
                raise FileNotFoundError(f"LeRobot processor file not found: {path}")
            continue
        pipelines[kind] = _read_pipeline(path, kind, allow_unknown_processor_steps)
        steps[kind] = tuple(s["registry_name"] for s in pipelines[kind])
    pre = _step(pipelines["preprocessor"], "normalizer_processor", ckpt / PREPROCESSOR_FILE)
    stats, modes = _read_stats(ckpt, pre)
    if "postprocessor" in pipelines:
        post = _step(pipelines["postprocessor"], "unnormalizer_processor",
                     ckpt / POSTPROCESSOR_FILE)
        post_stats, post_modes = _read_stats(ckpt, post)
        if "actions" in post_stats:
            stats["actions"], modes["actions"] = post_stats["actions"], post_modes["actions"]
    tok = next((s.get("config", {}) for s in pipelines["preprocessor"]
                if s["registry_name"] == "tokenizer_processor"), {})
    max_length = tok.get("max_length")
    rtc = _read_rtc(ckpt)
    return LeRobotProcessors(stats=stats, modes=modes, steps=steps,
                             tokenizer_name=tok.get("tokenizer_name"),
                             tokenizer_max_length=None if max_length is None else int(max_length),
                             rtc=rtc)


def lerobot_tokenizer_name(checkpoint_dir: Path) -> str | None:
    """The tokenizer a LeRobot preprocessor names (None for other checkpoints)."""
    path = checkpoint_dir / PREPROCESSOR_FILE
    if not path.is_file():
        return None
    for step in _load_json(path).get("steps", []):
        if isinstance(step, Mapping) and step.get("registry_name") == "tokenizer_processor":
            return (step.get("config") or {}).get("tokenizer_name") or PALIGEMMA_TOKENIZER
    return None


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _read_pipeline(path: Path, kind: str, allow_unknown: bool) -> list[dict]:
    raw_steps = _load_json(path).get("steps")
    if not isinstance(raw_steps, list):
        raise CheckpointError(f"{path}: expected a 'steps' list, found {raw_steps!r:.80}")
    checks = STEP_CHECKS[kind]
    kept = []
    for i, step in enumerate(raw_steps):
        name = step.get("registry_name") if isinstance(step, Mapping) else None
        if name is None:
            raise CheckpointError(f"{path}: step {i} has no registry_name ({step!r:.80})")
        if name not in checks:
            why = (f"unknown step {name!r} (pi0_ros implements {sorted(checks)}); it would "
                   "be skipped")
        else:
            why = checks[name](step.get("config") or {})
        if why is None:
            kept.append(step)
            continue
        message = f"{path}: {kind} step {i} {name!r}: {why}"
        if not allow_unknown:
            raise CheckpointError(message + ". Pass allow_unknown_processor_steps=True to load "
                                  "it anyway without that step")
        log.warning("%s; skipped (allow_unknown_processor_steps=True)", message)
    return kept


def _step(steps: list[dict], registry_name: str, path: Path) -> dict:
    for step in steps:
        if step["registry_name"] == registry_name:
            if not step.get("state_file"):
                raise CheckpointError(f"{path}: step {registry_name!r} has no state_file")
            return step
    raise CheckpointError(f"{path}: no {registry_name!r} step (steps: "
                          f"{[s['registry_name'] for s in steps]})")


def _read_stats(ckpt: Path, step: dict) -> tuple[dict[str, dict[str, np.ndarray]],
                                                  dict[str, str]]:
    """A normalizer step's state file -> ({key: {stat: vector}}, {key: mode})."""
    from safetensors.numpy import load_file

    state_file = ckpt / step["state_file"]
    if not state_file.is_file():
        raise FileNotFoundError(f"LeRobot normalizer state file not found: {state_file}")
    tensors = load_file(str(state_file))
    config = step.get("config", {})
    norm_map = config.get("norm_map", {})
    if norm_map.get("VISUAL", "IDENTITY") != "IDENTITY":
        raise CheckpointError(f"{state_file}: images normalized with {norm_map['VISUAL']!r}; "
                              "pi0_ros (as openpi / LeRobot pi0 / pi05) expects IDENTITY")
    stats: dict[str, dict[str, np.ndarray]] = {}
    modes: dict[str, str] = {}
    for feature, spec in config.get("features", {}).items():
        key = _LEROBOT_KEYS.get(spec.get("type"))
        if key is None:
            continue
        mode = norm_map.get(spec["type"], "IDENTITY")
        if mode not in LEROBOT_NORM_MODES:
            raise CheckpointError(f"{state_file}: {feature} uses LeRobot normalization {mode!r}; "
                                  f"pi0_ros supports {sorted(LEROBOT_NORM_MODES)}")
        modes[key] = LEROBOT_NORM_MODES[mode]
        found = {stat: tensors[f"{feature}.{stat}"] for stat in ("mean", "std", "q01", "q99")
                 if f"{feature}.{stat}" in tensors}
        if found:
            stats[key] = found
    return stats, modes


def _read_rtc(ckpt: Path) -> RTCConfig | None:
    cfg_file = ckpt / "config.json"
    if not cfg_file.is_file():
        return None
    rtc = RTCConfig.from_json(_load_json(cfg_file).get("rtc_config"), str(cfg_file))
    if rtc is not None:
        log.info("%s: rtc_config %s (read; not applied by pi0_ros, which runs its own chunk "
                 "executor)", cfg_file, rtc)
    return rtc
