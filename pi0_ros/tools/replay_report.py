"""Comparison, report and plots of pi0-ros-replay (``--compare``, ``report.md``, ``plots/``)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pi0_ros.stats import percentiles

if TYPE_CHECKING:
    from pi0_ros.tools.replay import ChunkRecord, ReplayResult

NS_PER_S = 1_000_000_000


# ---------------------------------------------------------------------------------------------
# comparison


@dataclass
class Comparison:
    ok: bool
    message: str
    max_abs_diff: float = float("nan")


def compare_actions(
    stamps: np.ndarray, chunks: Sequence[np.ndarray], golden_stamps: np.ndarray,
    golden: Sequence[np.ndarray], atol: float, joint_names: Sequence[str] = (),
) -> Comparison:
    """Same number of chunks, same stamps, same shapes and max |diff| <= atol. A failure names
    the worst action by chunk, step and joint (``joint_names``, the action dimensions)."""
    if len(chunks) != len(golden):
        return Comparison(False, f"chunk count differs: {len(chunks)} vs golden {len(golden)}")
    if not np.array_equal(stamps, golden_stamps):
        i = int(np.argmax(stamps != golden_stamps))
        return Comparison(False, f"chunk {i} stamp differs: {stamps[i]} vs golden "
                                 f"{golden_stamps[i]} ns")
    worst, where = 0.0, (0, 0, 0)
    for i, (a, g) in enumerate(zip(chunks, golden)):
        if a.shape != g.shape:
            return Comparison(False, f"chunk {i} shape differs: {a.shape} vs golden {g.shape}")
        diff = np.abs(a.astype(np.float64) - g.astype(np.float64))
        if not np.all(np.isfinite(diff)):
            return Comparison(False, f"chunk {i} has non-finite values")
        if diff.size and diff.max() > worst:
            worst = float(diff.max())
            where = (i, *np.unravel_index(int(diff.argmax()), diff.shape))
    if worst > atol:
        dim = int(where[2])
        joint = (f"joint {joint_names[dim]} (dim {dim})" if dim < len(joint_names)
                 else f"dim {dim}")
        return Comparison(False, f"actions differ: max |diff| {worst:.3g} > atol {atol:g} "
                                 f"(chunk {where[0]}, step {where[1]}, {joint})", worst)
    return Comparison(True, f"{len(chunks)} chunks match (max |diff| {worst:.3g} <= atol "
                            f"{atol:g})", worst)


def actions_digest(chunks: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in chunks:
        h.update(np.ascontiguousarray(a, np.float32).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# report and plots


def seams(chunks: Sequence[ChunkRecord], dt: float) -> np.ndarray:
    """Per chunk switch: |new chunk - previous chunk| at the new chunk's arrival time (both
    linearly interpolated; the previous chunk held at its last action past its end). (N-1, D)."""
    out = []
    for prev, new in zip(chunks, chunks[1:]):
        t = new.arrival_ns
        out.append(np.abs(_chunk_at(new, t, dt) - _chunk_at(prev, t, dt)))
    if not out:
        return np.zeros((0, chunks[0].actions.shape[1] if chunks else 0))
    return np.asarray(out, np.float64)


def _chunk_at(rec: ChunkRecord, t: int, dt: float) -> np.ndarray:
    h = rec.actions.shape[0]
    k = float(np.clip((t - rec.stamp_ns) / NS_PER_S / dt, 0.0, h - 1))
    i = min(int(k), max(h - 2, 0))
    w = k - i if h > 1 else 0.0
    return (1 - w) * rec.actions[i].astype(np.float64) + w * rec.actions[min(i + 1, h - 1)]


# Counters that are not drops or rejections: listed apart in the report.
INFORMATIONAL = {
    "mixed_camera_sizes": "synchronized sets whose cameras differ in size (fine: each image is "
                          "resized with padding to the model's square input independently)",
    "clock_jumps_back": "times the clock went back (a looping bag, a simulator reset); the input "
                        "history was reset",
}
# Executor rejection reasons a newcomer meets first, explained in the report and the summary.
EXECUTOR_REASONS = {
    "all_past": "every action of the chunk was already in the past when it reached the executor: "
                "inference latency exceeded the chunk horizon",
    "too_short": "the chunk ended too soon after the seam to be joined smoothly: inference "
                 "latency took up almost the whole chunk horizon",
    "stale": "the chunk's observation was not newer than the last accepted chunk's",
    "seam_jump": "the chunk started further from the current plan than max_seam_jump",
    "feedback_timeout": "no joint state for longer than feedback_timeout",
}
_MD_SPECIAL = "\\`*_[]<>|"  # the characters that change inline markdown


def markdown_text(text: str) -> str:
    """``text`` for a markdown line: control characters (newlines included) as visible escapes
    (a newline shows as backslash-n), markdown syntax characters backslash-escaped."""
    out = []
    for c in text:
        if c in ("\n", "\r", "\t"):
            out.append({"\n": "\\\\n", "\r": "\\\\r", "\t": "\\\\t"}[c])
        elif ord(c) < 32 or ord(c) == 127:
            out.append(f"\\\\x{ord(c):02x}")
        elif c in _MD_SPECIAL:
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def model_prompt(prompt: str) -> str:
    """The prompt text the model is given (openpi's clean_prompt: strip, '_' and newlines to
    spaces; pi0.5 wraps it as 'Task: ..., State: ...;' around the discretized state)."""
    from pi0_ros.processing import clean_prompt

    return clean_prompt(prompt)


def demo_note(checkpoint: str | Path) -> str:
    """The ``demo.note`` of a checkpoint's config.json ('' for other checkpoints): the demo's
    weights are random."""
    try:
        cfg = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return ""
    demo = cfg.get("demo") if isinstance(cfg, dict) else None
    return str(demo.get("note", "random weights")) if isinstance(demo, dict) else ""


RANDOM_WEIGHTS = ("the weights are random (a demo checkpoint): the actions are noise around "
                  "the middle of the joint ranges and do not follow the recorded state or the "
                  "cameras (not a bug; use a trained checkpoint for a task)")


def executor_rejections(result: ReplayResult) -> dict[str, int]:
    """{reason: count} of the chunks the executor rejected."""
    return {k.split(".", 1)[1]: v for k, v in sorted(result.executor_events.items())
            if k.startswith("rejected.") and v}


def executor_summary(result: ReplayResult, action_dt: float | None = None) -> str:
    """One line on the executor's rejections ('' when none), explaining each reason once (with
    the chunk horizon in seconds when ``action_dt`` is given)."""
    rejected = executor_rejections(result)
    if not rejected:
        return ""
    horizon = _horizon_s(result, action_dt)
    parts = []
    for reason, n in rejected.items():
        why = EXECUTOR_REASONS.get(reason, "")
        if reason in ("all_past", "too_short") and horizon is not None:
            why += f" ({horizon:.2f} s)"
        parts.append(f"{reason} x{n}" + (f" -- {why}" if why else ""))
    return (f"executor rejected {sum(rejected.values())} of {len(result.chunks)} chunks: "
            + "; ".join(parts))


def _horizon_s(result: ReplayResult, action_dt: float | None) -> float | None:
    if not result.chunks or action_dt is None:
        return None
    return (result.chunks[0].actions.shape[0] - 1) * action_dt


def write_report(path: Path, result: ReplayResult, config: Any, *, bag: Path, output_bag: Path,
                 plots: Sequence[Path], seed: int, digest: str,
                 comparison: Comparison | None) -> None:
    names = config.action_joint_names
    duration = (result.end_ns - result.start_ns) / NS_PER_S if result.end_ns else 0.0
    lat = percentiles(result.latencies, scale=1e3)
    note = demo_note(config.model.checkpoint) if config.model.checkpoint else ""
    lines = ["# pi0_ros replay report", ""]
    if note:
        lines += [f"> **Note**: {RANDOM_WEIGHTS}. The checkpoint says: "
                  f"\"{markdown_text(note)}\".", ""]
    lines += [
        f"- input bag: `{bag}`",
        f"- output bag: `{output_bag}`",
        f"- checkpoint: `{config.model.checkpoint}` ({config.model.num_steps} denoising steps)",
        *_prompt_lines(result),
        f"- bag time replayed: {duration:.2f} s; wall time {result.wall_s:.1f} s",
        f"- noise seed: {seed}; actions sha256: `{digest}`",
        f"- executor: {result.executor_name or 'none'}",
        "",
        "## Inference",
        "",
        "| chunks | observations | rate cap | effective rate |",
        "|---|---|---|---|",
        f"| {len(result.chunks)} | {result.observations} | "
        f"{config.max_rate or 'none'} Hz | "
        f"{len(result.chunks) / duration if duration else 0:.2f} Hz |",
        "",
    ]
    if lat:
        lines += [
            "Latency of `Policy.infer` (wall clock, ms; offline replay runs inference "
            "synchronously, so this is pure model + processing time):",
            "",
            "| p50 | p90 | p95 | p99 | max | mean |",
            "|---|---|---|---|---|---|",
            "| " + " | ".join(f"{lat[k]:.1f}" for k in ("p50", "p90", "p95", "p99", "max",
                                                      "mean")) + " |",
            "",
        ]
    counts = dict(sorted(result.counts.items()))
    info = {k: counts.pop(k) for k in list(counts) if k in INFORMATIONAL}
    counts["sync_unmatched"] = result.sync_dropped
    lines += ["## Dropped and rejected inputs", "", "| counter | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    lines += ["", "`rejected.*`: inputs the live node would reject (same checks and reasons). "
              "`rate_limited`: synchronized observations skipped by the `max_rate` cap (bag "
              "time). `sync_unmatched`: messages that left a synchronizer queue without being "
              "part of a set (expected for inputs faster than the slowest camera). The live "
              "node's latest-only slot drops (`dropped_observations`) do not happen offline.",
              ""]
    if info:
        lines += ["## Informational (not drops)", "", "| counter | count | meaning |",
                  "|---|---|---|"]
        lines += [f"| {k} | {v} | {INFORMATIONAL[k]} |" for k, v in info.items()]
        lines.append("")
    seam = seams(result.chunks, config.action_dt)
    lines += ["## Seams between consecutive chunks", ""]
    if len(seam):
        lines += [
            "|new chunk - previous chunk| at the switch time (robot units), per joint:", "",
            "| joint | mean | p95 | max |", "|---|---|---|---|",
        ]
        for j, name in enumerate(names):
            col = seam[:, j]
            lines.append(f"| {name} | {col.mean():.4f} | {np.percentile(col, 95):.4f} | "
                         f"{col.max():.4f} |")
        lines.append("")
    else:
        lines += ["fewer than two chunks", ""]
    if result.executor_events:
        lines += ["## Executor", "", "| event | count |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(result.executor_events.items())]
        lines += ["", f"{len(result.commands)} commands.", ""]
        if result.executor_events.get("feedback_timeouts"):
            lines += ["The replay runs the executor past the bag's last joint state, to the end "
                      "of the last chunk: one `feedback_timeouts` (and a hold) there is expected, "
                      "as on a robot whose /joint_states stop.", ""]
        summary = executor_summary(result, config.action_dt)
        if summary:
            lines += [summary, ""]
    if comparison is not None:
        lines += ["## Comparison", "", f"**{'PASS' if comparison.ok else 'FAIL'}**: "
                  f"{comparison.message}", ""]
    if plots:
        lines += ["## Plots", ""]
        if note:
            lines += [f"Note: {RANDOM_WEIGHTS}.", ""]
        lines += [f"![{p.stem}]({p.relative_to(path.parent).as_posix()})" for p in plots]
        lines.append("")
    path.write_text("\n".join(lines))


def _prompt_lines(result: ReplayResult) -> list[str]:
    """The prompt as the model sees it (and as given, when that differs), escaped; the bag's
    prompt messages when there were several."""
    shown = model_prompt(result.prompt)
    lines = [f"- prompt (as the model sees it): \"{markdown_text(shown)}\""]
    if shown != result.prompt:
        lines.append(f"- prompt as given: \"{markdown_text(result.prompt)}\"")
    if len(result.prompts) > 1:
        t0 = result.start_ns
        for t, text in result.prompts[:PROMPTS_LISTED]:
            lines.append(f"  - t={(t - t0) / NS_PER_S:.2f} s: "
                         f"\"{markdown_text(model_prompt(text))}\"")
        if len(result.prompts) > PROMPTS_LISTED:
            lines.append(f"  - ... {len(result.prompts) - PROMPTS_LISTED} more")
    return lines


PROMPTS_LISTED = 10  # prompt changes listed in the report


def default_unit(name: str) -> str:
    """Axis unit of a joint when the caller gives none: radians, except a gripper / finger
    joint, whose unit depends on the robot (metres for a prismatic finger, often 0..1)."""
    low = name.lower()
    return "gripper units" if ("gripper" in low or "finger" in low) else "rad"


def write_plots(out_dir: Path, result: ReplayResult, config: Any,
                units: Mapping[str, str] | None = None) -> list[Path]:
    """One PNG per action joint: recorded state, predicted chunks (coloured by observation time,
    with a colourbar), executed command. ``units``: joint name -> axis unit (default
    :func:`default_unit`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = result.start_ns
    names = config.action_joint_names
    units = dict(units or {})
    state_index = {n: i for i, n in enumerate(config.state_joint_names)}
    st = (np.asarray(result.state_times, np.float64) - t0) / NS_PER_S
    states = np.asarray(result.states) if result.states else np.zeros((0, 0))
    ct = (np.asarray(result.command_times, np.float64) - t0) / NS_PER_S
    cmds = np.asarray(result.commands) if result.commands else np.zeros((0, 0))
    obs_t = np.asarray([(r.stamp_ns - t0) / NS_PER_S for r in result.chunks], np.float64)
    norm = Normalize(vmin=float(obs_t.min()) if len(obs_t) else 0.0,
                     vmax=float(obs_t.max()) if len(obs_t) > 1 and np.ptp(obs_t) else 1.0)
    cmap = plt.cm.viridis
    random_weights = bool(config.model.checkpoint and demo_note(config.model.checkpoint))
    paths = []
    for j, name in enumerate(names):
        unit = units.get(name) or default_unit(name)
        fig, ax = plt.subplots(figsize=(10, 4.0), dpi=100)
        if name in state_index and len(states):
            ax.plot(st, states[:, state_index[name]], color="black", lw=1.6,
                    label="recorded state")
        for k, rec in enumerate(result.chunks):
            h = rec.actions.shape[0]
            tt = obs_t[k] + np.arange(h) * config.action_dt
            ax.plot(tt, rec.actions[:, j], color=cmap(norm(obs_t[k])), lw=0.8, alpha=0.6,
                    label="predicted chunks" if k == 0 else None)
        if len(cmds):
            ax.plot(ct, cmds[:, j], color="tab:red", lw=1.2, ls="--",
                    label="executed command")
        if result.chunks:
            bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.01)
            bar.set_label("chunk: observation time [s]")
        title = f"{name}: recorded state vs predicted chunks vs executed command"
        if random_weights:
            title += "\n(demo checkpoint, random weights: the actions do not follow the state)"
        ax.set_title(title)
        ax.set_xlabel("bag time [s]")
        ax.set_ylabel(f"position [{unit}]")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{j:02d}_{_safe(name)}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


class RepeatFilter(logging.Filter):
    """Lets the first record of each (logger, message template, first argument) through and
    counts the repeats (``suppressed``): one 'chunk rejected: all_past' line per reason instead
    of one per chunk; the end-of-run summary gives the counts."""

    def __init__(self) -> None:
        super().__init__()
        self.suppressed: Counter[tuple[str, str]] = Counter()
        self._seen: set[tuple[str, str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        key = (record.name, str(record.msg), str(args[0]) if args else "")
        if key in self._seen:
            self.suppressed[(record.name, key[2] or key[1])] += 1
            return False
        self._seen.add(key)
        return True


def quiet_repeated_rejections(logger: str = "pi0_ros.control.executor") -> RepeatFilter:
    """Install a :class:`RepeatFilter` on ``logger`` (the executor core logs every rejected
    chunk); returns it."""
    filt = RepeatFilter()
    logging.getLogger(logger).addFilter(filt)
    return filt


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


