"""The checkpoint options every CLI that loads a checkpoint shares (pi0-ros-infer, pi0-ros-bench,
pi0-ros-export), defined once so they cannot drift: ``--geometry FILE.json`` (for a checkpoint
whose config.json does not describe its geometry, e.g. a LeRobot folder of a non-standard size)
and ``--embedding`` (which token embedding, for a file that stores two different ones in a
layout that does not say; see ``pi0_ros.model.weights._choose_embedding``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EMBEDDINGS = ("embed_tokens", "lm_head")
GEOMETRY_HELP = ("geometry override FILE.json for a checkpoint whose config.json does not "
                 "describe it (a fixture.json, an openpi config.json with 'geometry', or the "
                 "geometry dict itself)")
EMBEDDING_HELP = ("token embedding to use when the checkpoint stores two different ones and its "
                  "layout does not say which (LeRobot folders: embed_tokens, automatically)")


def geometry_file(value: str) -> Path:
    """argparse type: an existing JSON file."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"geometry file {path} not found")
    try:
        json.loads(path.read_text())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{path}: not valid JSON ({e})") from None
    return path


def preset_or_geometry_file(presets: Sequence[str]) -> Callable[[str], str | Path]:
    """argparse type for pi0-ros-bench: a preset name (random weights) or a geometry FILE.json."""
    def parse(value: str) -> str | Path:
        if value in presets:
            return value
        if value.endswith(".json") or Path(value).expanduser().exists():
            return geometry_file(value)
        raise argparse.ArgumentTypeError(f"expected one of {list(presets)} or a FILE.json, got "
                                         f"{value!r}")
    return parse


def add_checkpoint_options(parser: argparse.ArgumentParser, *, geometry: bool = True) -> None:
    """Add ``--geometry FILE.json`` (unless the CLI defines its own) and ``--embedding``."""
    if geometry:
        parser.add_argument("--geometry", type=geometry_file, default=None, metavar="FILE.json",
                            help=GEOMETRY_HELP)
    parser.add_argument("--embedding", choices=EMBEDDINGS, default=None, help=EMBEDDING_HELP)


def resolve_geometry(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     default: str) -> None:
    """For a CLI whose ``--geometry`` is a preset (random weights) or a FILE.json (with
    ``--checkpoint``): fill the default preset, refuse the combinations that mean nothing."""
    if args.checkpoint is None:
        if isinstance(args.geometry, Path):
            parser.error("--geometry FILE.json is an override for --checkpoint DIR; random "
                         "weights take a preset name")
        if args.geometry is None:
            args.geometry = default
    elif isinstance(args.geometry, str):
        parser.error(f"--checkpoint takes its geometry from the checkpoint; --geometry "
                     f"{args.geometry!r} is a random-weight preset (pass a FILE.json override)")


def checkpoint_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``load_checkpoint`` keywords of the shared options."""
    geometry = getattr(args, "geometry", None)
    return {"geometry": geometry if isinstance(geometry, Path) else None,
            "embedding": getattr(args, "embedding", None)}


def load_for_cli(prog: str, args: argparse.Namespace, **kwargs: Any):
    """``load_checkpoint(args.checkpoint, ...)``; a checkpoint that cannot be loaded ends the
    program with its message (no traceback)."""
    from pi0_ros.model import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(args.checkpoint, **checkpoint_kwargs(args), **kwargs)
    except (CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"{prog}: error: {e}") from None
