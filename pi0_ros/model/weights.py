"""Checkpoint loading: openpi-converted PyTorch checkpoints and LeRobot pi0 / pi05 directories.

The model is built on the meta device and every parameter is assigned straight from the
memory-mapped safetensors file (converted to the target dtype/device), so no second full copy is
ever held. Everything is validated before a byte is loaded: missing, unexpected and mis-shaped
keys, tensor dtypes, a truncated file, and disagreement between config.json and the tensors, each
with an error naming the key, the expected and the found value.

Key layouts (one table, ``_KEY_PREFIXES``): our module names use the checkpoint's leaf names, so
a checkpoint key is a module name with one prefix swapped. LeRobot's ``save_pretrained`` adds
``model.`` in front of openpi's keys (its Hub base checkpoints do not).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import torch

from .config import GEMMA_PRESETS, Pi0Config
from .pi0 import Pi0Model

log = logging.getLogger(__name__)

P = "paligemma_with_expert."
# (our module prefix, openpi checkpoint prefix), most specific first.
_KEY_PREFIXES = (
    ("vision.layers.", P + "paligemma.model.vision_tower.vision_model.encoder.layers."),
    ("vision.", P + "paligemma.model.vision_tower.vision_model."),
    ("projector.", P + "paligemma.model.multi_modal_projector.linear."),
    ("embed_tokens.", P + "paligemma.lm_head."),
    ("lm.", P + "paligemma.model.language_model."),
    ("expert.", P + "gemma_expert.model."),
)
# Present in every openpi checkpoint, never used (not set by the converter; SEMANTICS §11).
UNUSED_KEYS = (P + "gemma_expert.lm_head.weight",)
# PaliGemma's token embedding, under either name (openpi: one tied tensor stored as `lm_head`;
# LeRobot >= 0.5: two parameters, see `_choose_embedding`).  Our `embed_tokens.weight` <- the
# chosen one.
EMBEDDING_KEYS = {"lm_head": P + "paligemma.lm_head.weight",
                  "embed_tokens": P + "paligemma.model.language_model.embed_tokens.weight"}
_EMBED_ALIAS = EMBEDDING_KEYS["embed_tokens"]
_FILE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as the configured model; the message says why."""


def to_checkpoint_key(name: str) -> str:
    for ours, theirs in _KEY_PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def checkpoint_shapes(config: Pi0Config) -> dict[str, tuple[int, ...]]:
    """Every key (and shape) an openpi checkpoint of this config holds (built on meta)."""
    with torch.device("meta"):
        model = Pi0Model(config)
    shapes = {to_checkpoint_key(n): tuple(p.shape) for n, p in model.state_dict().items()}
    shapes[UNUSED_KEYS[0]] = (config.expert.vocab_size, config.expert.width)
    return shapes


# -- safetensors header ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_index(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header without loading data: (tensors, metadata)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated file: header says {n} bytes, file has "
                                  f"{size - 8} after the length field")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_size, tensors = size - 8 - n, {}
    for key, info in header.items():
        end = info["data_offsets"][1]
        if end > data_size:
            raise CheckpointError(f"{path}: truncated file: tensor {key!r} ends at byte {end} "
                                  f"of the data section, which has only {data_size} bytes")
        tensors[key] = TensorInfo(info["dtype"], tuple(info["shape"]))
    return tensors, metadata


# -- configuration --------------------------------------------------------------------------------
def _load_geometry(geometry: str | os.PathLike | Mapping | None) -> Mapping | None:
    if geometry is None or isinstance(geometry, Mapping):
        return geometry
    data = json.loads(Path(geometry).read_text())
    return data.get("geometry", data)  # a fixture.json / config.json, or the geometry itself


def _is_pi05_keys(keys) -> bool:
    """pi0.5 checkpoints are recognizable by `time_mlp_in` / adaRMS `*.dense.*` keys (§11)."""
    return any(k.endswith("time_mlp_in.weight") and "action_time" not in k or ".dense." in k
               for k in keys)


def config_from_checkpoint(raw: Mapping[str, Any], keys, geometry=None) -> Pi0Config:
    """Model config from an openpi or LeRobot config.json, the key set and an optional geometry
    override (a dict or a JSON file in the layout of an openpi fixture's `geometry`)."""
    geometry = _load_geometry(geometry)
    lerobot = raw.get("type") in ("pi0", "pi05")
    pi05 = raw["type"] == "pi05" if lerobot else raw.get("pi05")
    if pi05 is None:
        pi05 = _is_pi05_keys(keys)
    kw: dict[str, Any] = {"pi05": bool(pi05)}
    if lerobot:
        kw["action_dim"] = int(raw.get("max_action_dim", 32))
        kw["action_horizon"] = int(raw.get("chunk_size", 50))
        kw["max_token_len"] = int(raw.get("tokenizer_max_length", 0))
        images = [k.split(".", 2)[2] for k, f in raw.get("input_features", {}).items()
                  if f.get("type") == "VISUAL" and k.startswith("observation.images.")]
        empty = [f"empty_camera_{i}" for i in range(int(raw.get("empty_cameras", 0) or 0))]
        if images or empty:
            kw["cameras"] = tuple(images + empty)
        kw["dtype"] = raw.get("dtype", "float32")
    else:
        for key in ("action_dim", "action_horizon", "max_token_len"):
            if key in raw:
                kw[key] = int(raw[key])
        if "discrete_state_input" in raw:
            kw["discrete_state_input"] = bool(raw["discrete_state_input"])
        if raw.get("precision") in ("float32", "bfloat16"):
            kw["dtype"] = raw["precision"]
    if geometry is None and not lerobot and isinstance(raw.get("geometry"), Mapping):
        geometry = raw["geometry"]
    if geometry is not None:
        return Pi0Config.from_geometry(geometry, **{k: v for k, v in kw.items()
                                                    if k not in geometry or k == "pi05"})
    for field_name, variant_key in (("lm", "paligemma_variant"),
                                    ("expert", "action_expert_variant")):
        variant = raw.get(variant_key, "gemma_2b" if field_name == "lm" else "gemma_300m")
        if variant not in GEMMA_PRESETS:
            raise CheckpointError(
                f"config.json {variant_key}={variant!r} is not a known variant "
                f"{sorted(GEMMA_PRESETS)}; pass a geometry override (--geometry FILE.json)")
        kw[field_name] = GEMMA_PRESETS[variant]
    return Pi0Config(**kw)


# -- loading --------------------------------------------------------------------------------------
def _normalize_keys(index: Mapping[str, TensorInfo], pi05: bool) -> tuple[dict[str, str],
                                                                       dict[str, str]]:
    """-> ({openpi key: file key}, {embedding key: file key}): strips LeRobot's `model.` prefix,
    applies LeRobot's documented pi05 rename (`action_time_mlp_*` -> `time_mlp_*`) and sets the
    PaliGemma embedding candidates (`lm_head` / `embed_tokens`) aside for `_choose_embedding`."""
    mapping: dict[str, str] = {}
    embeds: dict[str, str] = {}
    for file_key in index:
        key = file_key[len("model."):] if file_key.startswith("model.") else file_key
        if pi05 and key.startswith("action_time_mlp_"):
            key = key[len("action_"):]
        table = embeds if key in EMBEDDING_KEYS.values() else mapping
        if key in table:
            raise CheckpointError(f"two tensors map to the key {key!r}: "
                                  f"{table[key]!r} and {file_key!r}")
        table[key] = file_key
    return mapping, embeds


def _choose_embedding(embeds: Mapping[str, str], *, lerobot: bool, weights: Path,
                      embedding: str | None) -> str | None:
    """The file key of the token embedding the model uses.

    openpi ties PaliGemma's input embedding and LM head (one tensor, stored once as `lm_head`,
    `embed_tokens` named as its alias in the file metadata).  LeRobot >= 0.5 keeps them as two
    parameters and `save_pretrained` writes both; only `embed_tokens` is read at inference
    (`embed_language_tokens`) and only it gets gradients, so after fine-tuning `lm_head` is a stale
    copy.  Hence: one candidate -> it; two -> `embedding` if given, `embed_tokens` for the LeRobot
    layout, and for the openpi layout (which does not say) the tensors must be equal.
    """
    if embedding is not None and embedding not in EMBEDDING_KEYS:
        raise CheckpointError(f"embedding={embedding!r}: expected one of {sorted(EMBEDDING_KEYS)}")
    if len(embeds) < 2:
        return next(iter(embeds.values()), None)  # none: `validate` reports the missing key
    if embedding is not None:
        return embeds[EMBEDDING_KEYS[embedding]]
    lm_head = embeds[EMBEDDING_KEYS["lm_head"]]
    embed_tokens = embeds[EMBEDDING_KEYS["embed_tokens"]]
    if lerobot:
        log.info("%s stores both %s and %s: using embed_tokens (the one LeRobot's model reads)",
                 weights, lm_head, embed_tokens)
        return embed_tokens
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt", device="cpu") as f:
        a, b = f.get_tensor(lm_head), f.get_tensor(embed_tokens)
    if a.shape == b.shape and torch.equal(a, b):
        return lm_head
    diff = (a.float() - b.float()).abs().max().item() if a.shape == b.shape else "shape"
    raise CheckpointError(
        f"{weights}: two different token embeddings, {lm_head!r} and {embed_tokens!r} "
        f"(max |diff| {diff}), and the openpi layout does not say which the model uses (openpi "
        "ties them). Pass embedding='embed_tokens' (LeRobot >= 0.5 fine-tunes: the one used at "
        "inference) or embedding='lm_head' (pi0-ros-* CLIs: --embedding)")


def validate(config: Pi0Config, index: Mapping[str, TensorInfo], mapping: Mapping[str, str],
             source: str = "checkpoint") -> None:
    expected = checkpoint_shapes(config)
    for key, file_key in mapping.items():
        info = index[file_key]
        if info.dtype not in _FILE_DTYPES:
            raise CheckpointError(f"{source}: key {file_key!r} has dtype {info.dtype}, expected "
                                  f"one of {sorted(_FILE_DTYPES)}")
        if key in UNUSED_KEYS or key not in expected:
            continue
        if info.shape != expected[key]:
            raise CheckpointError(
                f"{source}: key {file_key!r} has shape {list(info.shape)}, expected "
                f"{list(expected[key])} from the config (config.json / geometry disagrees with "
                f"the tensors; pass --geometry FILE.json for a non-standard geometry)")
    missing = sorted(k for k in expected if k not in mapping and k not in UNUSED_KEYS)
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} missing key(s), e.g. {missing[0]!r} (expected shape "
            f"{list(expected[missing[0]])}); is this a {'pi0.5' if config.pi05 else 'pi0'} "
            f"checkpoint of this geometry? missing: {missing[:8]}")
    unexpected = sorted(mapping[k] for k in mapping if k not in expected)
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected key(s) for a "
                              f"{'pi0.5' if config.pi05 else 'pi0'} model: {unexpected[:8]}")


def checkpoint_files(path: str | os.PathLike, *, need_config: bool = True
                     ) -> tuple[Path, Path, Path]:
    """(checkpoint dir, weights file, config.json) of a checkpoint directory or a bare
    `model.safetensors`.  A missing path, an empty directory, a directory without
    `model.safetensors` or (``need_config``) without `config.json` is refused as exactly that."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        return path.parent, path, path.parent / "config.json"
    found = sorted(p.name for p in path.iterdir())
    if not found:
        raise CheckpointError(f"checkpoint directory {path} is empty (expected model.safetensors "
                              "and config.json)")
    weights, cfg_file = path / "model.safetensors", path / "config.json"
    hint = ""
    if (path / "pretrained_model").is_dir():  # a LeRobot training checkpoint step directory
        hint = f"; LeRobot keeps the policy in {path / 'pretrained_model'}"
    if not weights.is_file():
        raise CheckpointError(f"no model.safetensors in {path} (found: {found[:12]}){hint}")
    if need_config and not cfg_file.is_file():
        raise CheckpointError(
            f"no config.json in {path} (found: {found[:12]}); openpi's converter and LeRobot's "
            "save_pretrained both write one next to model.safetensors; without it pass a geometry "
            f"override (--geometry FILE.json){hint}")
    return path, weights, cfg_file


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: str = "float32", geometry=None,
                    embedding: str | None = None) -> tuple[Pi0Model, Pi0Config]:
    """Load an openpi-converted checkpoint directory (or a LeRobot pi0 / pi05 directory, or a
    bare `model.safetensors`) -> (model in eval mode with ``dtype`` precision, config).

    ``embedding``: ``"embed_tokens"`` / ``"lm_head"`` picks the token embedding when a file
    stores two different ones in a layout that does not say which (see `_choose_embedding`)."""
    ckpt_dir, weights, cfg_file = checkpoint_files(path, need_config=geometry is None)
    try:
        raw = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    index, _ = read_safetensors_index(weights)
    stripped = [k[len("model."):] if k.startswith("model.") else k for k in index]
    config = config_from_checkpoint(raw, stripped, geometry).replace(dtype=dtype)
    if config.pi05 != _is_pi05_keys(stripped):
        said = "pi05=true" if config.pi05 else "pi0 (pi05=false)"
        found = "pi0.5 (time_mlp_in / adaRMS dense keys)" if not config.pi05 else (
            "pi0 (no time_mlp_in / adaRMS dense keys)")
        raise CheckpointError(f"{cfg_file}: the config says {said} but the tensors in {weights} "
                              f"are a {found} checkpoint")
    mapping, embeds = _normalize_keys(index, config.pi05)
    lerobot = raw.get("type") in ("pi0", "pi05") or any(k.startswith("model.") for k in index)
    chosen = _choose_embedding(embeds, lerobot=lerobot, weights=weights, embedding=embedding)
    if chosen is not None:
        mapping[EMBEDDING_KEYS["lm_head"]] = chosen  # our `embed_tokens.` <- openpi's lm_head key
    validate(config, index, mapping, str(weights))

    with torch.device("meta"):
        model = Pi0Model(config)
    model.set_precision(dtype)
    target = {name: p.dtype for name, p in model.named_parameters()}
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        for name in target:
            tensor = f.get_tensor(mapping[to_checkpoint_key(name)])
            state[name] = tensor.to(device=device, dtype=target[name])
    model.load_state_dict(state, assign=True, strict=True)
    log.info("loaded %s (%s, %d tensors) as %s on %s", weights,
             "pi0.5" if config.pi05 else "pi0", len(state), dtype, device)
    return model.eval().requires_grad_(False), config


def geometry_dict(config: Pi0Config) -> dict[str, Any]:
    """The inverse of ``Pi0Config.from_geometry``: the openpi fixture `geometry` layout."""
    v = config.vision

    def gemma(g, adarms):
        return {"width": g.width, "depth": g.depth, "mlp_dim": g.mlp_dim,
                "num_heads": g.num_heads, "num_kv_heads": g.num_kv_heads,
                "head_dim": g.head_dim, "vocab_size": g.vocab_size,
                "rms_norm_eps": g.rms_norm_eps, "rope_theta": g.rope_theta, "adarms": adarms}

    return {
        "vision": {"image_size": v.image_size, "patch_size": v.patch_size,
                   "num_channels": v.num_channels, "hidden": v.width, "layers": v.depth,
                   "heads": v.num_heads, "head_dim": v.head_dim, "mlp": v.mlp_dim,
                   "tokens_per_image": v.tokens_per_image, "layer_norm_eps": v.layer_norm_eps},
        "lm": gemma(config.lm, False),
        "expert": gemma(config.expert, config.pi05),
        "action_dim": config.action_dim, "action_horizon": config.action_horizon,
        "max_token_len": config.max_token_len, "pi05": config.pi05,
        "cameras": list(config.cameras), "num_cameras": config.num_cameras,
        "time_embedding": {"dim": config.expert.width, "min_period": config.min_period,
                           "max_period": config.max_period},
    }


def save_checkpoint(model: Pi0Model, path: str | os.PathLike, *, precision: str = "float32",
                    extra_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` as an openpi-converted checkpoint directory (model.safetensors with the
    real key names, the unused expert lm_head included, + config.json with the geometry)."""
    from safetensors.torch import save_file

    cfg, path = model.config, Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, precision)
    tensors = {to_checkpoint_key(n): t.detach().to("cpu", dtype).contiguous()
               for n, t in model.state_dict().items()}
    tensors[UNUSED_KEYS[0]] = torch.zeros(cfg.expert.vocab_size, cfg.expert.width, dtype=dtype)
    save_file(tensors, str(path / "model.safetensors"),
              metadata={"format": "pt", _EMBED_ALIAS: P + "paligemma.lm_head.weight"})
    raw = {"action_dim": cfg.action_dim, "action_horizon": cfg.action_horizon,
           "paligemma_variant": _variant_name(cfg.lm), "action_expert_variant":
           _variant_name(cfg.expert), "precision": precision, "pi05": cfg.pi05,
           "max_token_len": cfg.max_token_len, "discrete_state_input": cfg.discrete_state_input,
           "geometry": geometry_dict(cfg), **(extra_config or {})}
    (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return path


def _variant_name(g) -> str:
    return next((name for name, preset in GEMMA_PRESETS.items() if preset == g), "custom")
