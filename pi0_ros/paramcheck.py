"""Parameter checks shared by the policy pipeline's settings and both lifecycle nodes: undeclared
names refused (with the closest declared one), run-time changes accepted only for the parameters
that are safe to change live, and text made safe for a log line. No torch, no rclpy: the
executor node and the pipeline core import it alike."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

# rclpy's own parameters every node has (not ours to declare or refuse).
ROS_PARAMETERS = ("use_sim_time", "start_type_description_service")


def undeclared(names: Iterable[str], declared: Iterable[str]) -> list[str]:
    """The names (sorted) neither ``declared`` nor rclpy's own (``qos_overrides.*`` too)."""
    known = set(declared) | set(ROS_PARAMETERS)
    return sorted(n for n in set(names) - known if not n.startswith("qos_overrides."))


def unknown_parameters_message(unknown: Sequence[str], known: Iterable[str]) -> str:
    """``undeclared parameter(s): 'sync.slope' (did you mean 'sync.slop'?)``."""
    known = list(known)
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        parts.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return "undeclared parameter(s): " + ", ".join(parts)


def printable(text: str, limit: int = 200) -> str:
    """``text`` for a log line: control characters escaped, at most ``limit`` characters."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return out + (f"... ({len(text)} chars)" if len(text) > limit else "")


def live_change_refusal(params: Sequence[Any], live: Sequence[str], configured: bool,
                        check: Callable[[Any], None]) -> str | None:
    """Why a ``set_parameters`` request is refused, or None: while configured only ``live``
    parameters may change (the others are read at configure); ``check(param)`` raises
    ValueError for a bad live value."""
    for p in params:
        if p.name not in live:
            if configured and p.name not in ROS_PARAMETERS:
                return (f"{p.name} is read at configure only (live: {', '.join(live)}); "
                        "deactivate, cleanup, set it and configure again")
            continue
        try:
            check(p)
        except ValueError as exc:
            return str(exc)
    return None
