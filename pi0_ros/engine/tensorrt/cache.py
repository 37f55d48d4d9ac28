"""Engines on disk: ``EngineKey`` (everything an engine depends on: checkpoint hash, geometry,
stage, cameras, prompt bucket, steps, batch range, precision, typing, opt level, TensorRT version
and GPU) and ``EngineCache`` (``<root>/<stage_id>-<precision>-b<max>-<digest>.engine`` plus a
``.json`` with the key). A cached engine whose metadata disagrees with the wanted key is refused
with the differing fields named; ``stale`` lists engines of the same stage built for something
else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import torch

from ...model.weights import geometry_dict
from .errors import StaleEngineError
from .stages import EXPORT_FORMAT, stage_id

DEFAULT_CACHE_DIR = Path(os.environ.get("PI0_ROS_ENGINE_CACHE",
                                        "~/.cache/pi0_ros/engines")).expanduser()


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. ``digest`` names the file; the fields are stored next
    to it and compared on load."""

    checkpoint: str  # content hash of the weights (checkpoint_hash / model_hash)
    geometry: str  # hash of the model geometry (pi05, widths, cameras, horizon...)
    stage: str
    num_cameras: int
    prompt_len: int
    num_steps: int
    min_batch: int
    opt_batch: int
    max_batch: int
    precision: str
    strongly_typed: bool
    opt_level: int
    fp32_islands: bool
    tf32: bool
    opset: int
    tensorrt: str  # TensorRT (or runtime) version
    gpu: str
    capability: str
    calibration: str = ""  # fp8: identity of the calibration data
    time_grid: str = ""  # "denoise" (the unrolled loop bakes t in): model.time_grid
    export_format: int = EXPORT_FORMAT

    @property
    def digest(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def file_stem(self) -> str:
        return (f"{stage_id(self.stage, self.num_cameras, self.prompt_len, self.num_steps)}"
                f"-{self.precision}-b{self.max_batch}-{self.digest[:16]}")

    def diff(self, other: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Fields whose stored value differs: name -> (stored, wanted)."""
        mine = dataclasses.asdict(self)
        return {k: (other.get(k), v) for k, v in mine.items() if other.get(k) != v}


def geometry_hash(config) -> str:
    blob = json.dumps(geometry_dict(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_hash(model: torch.nn.Module) -> str:
    """Content hash of every parameter (name, dtype, shape, float32 bytes): for models that did
    not come from a checkpoint directory (tests, random init). Independent of the model's
    current precision, like a checkpoint hash."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]


def checkpoint_hash(path: str | os.PathLike) -> str:
    """SHA-256 over a checkpoint directory's *.safetensors and config.json (or one file), cached
    in ``<dir>/.pi0_ros_hash.json`` keyed by size and mtime (a full-size checkpoint is ~7 GB)."""
    path = Path(path)
    files = (sorted(path.glob("*.safetensors")) + sorted(path.glob("config.json"))
             if path.is_dir() else [path])
    if not files:
        raise FileNotFoundError(f"no *.safetensors under {path}")
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    memo = (path if path.is_dir() else path.parent) / ".pi0_ros_hash.json"
    try:
        cached = json.loads(memo.read_text())
        if cached.get("stamp") == stamp:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    digest = h.hexdigest()[:32]
    try:
        memo.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
    except OSError:  # read-only checkpoint directory: hash again next time
        pass
    return digest


@dataclass
class CachedEngine:
    key: EngineKey
    path: Path
    blob: bytes
    meta: dict[str, Any]
    built: bool = False


class EngineCache:
    """``<root>/<stage_id>-<precision>-b<max>-<digest>.engine`` + ``.json`` metadata."""

    def __init__(self, root: str | os.PathLike = DEFAULT_CACHE_DIR):
        self.root = Path(root).expanduser()

    def path(self, key: EngineKey) -> Path:
        return self.root / f"{key.file_stem}.engine"

    def load(self, key: EngineKey) -> CachedEngine | None:
        """The engine for ``key``, None if absent; ``StaleEngineError`` if its metadata
        disagrees with the key (edited file, or a digest collision)."""
        path = self.path(key)
        meta_path = path.with_suffix(".json")
        if not path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise StaleEngineError(f"{path}: unreadable metadata {meta_path} ({e}); delete "
                                   "both files to rebuild") from None
        diff = key.diff(meta.get("key", {}))
        if diff:
            raise StaleEngineError(f"{path} does not match this configuration: "
                                   f"{format_diff(diff)}; delete it to rebuild")
        return CachedEngine(key, path, path.read_bytes(), meta)

    def stale(self, key: EngineKey) -> list[tuple[Path, dict[str, tuple[Any, Any]]]]:
        """Engines of the same stage configuration built for something else (other TensorRT,
        GPU, checkpoint, precision...): (path, differing fields)."""
        prefix = stage_id(key.stage, key.num_cameras, key.prompt_len, key.num_steps) + "-"
        found = []
        for meta_path in sorted(self.root.glob(prefix + "*.json")):
            try:
                stored = json.loads(meta_path.read_text()).get("key", {})
            except (OSError, ValueError):
                continue
            diff = key.diff(stored)
            if diff:
                found.append((meta_path.with_suffix(".engine"), diff))
        return found

    def store(self, key: EngineKey, blob: bytes, meta: Mapping[str, Any]) -> CachedEngine:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_suffix(".engine.tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)  # a crashed build never leaves a truncated engine behind
        full = {"key": dataclasses.asdict(key), **meta}
        path.with_suffix(".json").write_text(json.dumps(full, indent=1, sort_keys=True))
        return CachedEngine(key, path, blob, full, built=True)


def format_diff(diff: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {a!r} (now {b!r})" for k, (a, b) in diff.items())
