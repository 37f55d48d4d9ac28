"""What the policy node shows people: rviz markers, the planned joint state, /diagnostics.

Pure builders from numpy and plain numbers to messages, plus the two small statistics the
diagnostics report (a latency window and a rate meter); the node owns when they are published.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point
from sensor_msgs.msg import JointState
from visualization_msgs.msg import Marker, MarkerArray

from pi0_ros.stats import LatencyWindow, RateMeter  # noqa: F401  (re-exported)
from pi0_ros.ros.conversions import ns_to_stamp

PATH_NS = "pi0_path"
TEXT_NS = "pi0_status"
PATH_WIDTH = 0.005  # m
TEXT_HEIGHT = 0.04  # m
TEXT_LIFT = 0.1  # m above the first path point


def planned_joint_state(
    actions: np.ndarray, joint_names: Sequence[str], lookahead: int, *, stamp_ns: int
) -> JointState:
    """The chunk's action at index ``lookahead`` (clamped to the horizon) as a JointState."""
    k = min(max(int(lookahead), 0), actions.shape[0] - 1)
    msg = JointState()
    msg.header.stamp = ns_to_stamp(stamp_ns)
    msg.name = list(joint_names)
    msg.position = np.asarray(actions[k], dtype=np.float64).tolist()
    return msg


def chunk_markers(
    actions: np.ndarray,
    *,
    path_indices: Sequence[int],
    frame_id: str,
    stamp_ns: int,
    text: str,
) -> MarkerArray:
    """A LINE_STRIP through ``actions[:, path_indices]`` (read as x, y, z) and a status text.

    Without ``path_indices`` only the text is drawn, at the frame origin.
    """
    stamp = ns_to_stamp(stamp_ns)
    markers = []
    origin = Point()
    if len(path_indices) == 3:
        xyz = np.asarray(actions, dtype=np.float64)[:, list(path_indices)]
        path = Marker()
        path.header.frame_id = frame_id
        path.header.stamp = stamp
        path.ns, path.id = PATH_NS, 0
        path.type, path.action = Marker.LINE_STRIP, Marker.ADD
        path.pose.orientation.w = 1.0
        path.scale.x = PATH_WIDTH
        path.color.r, path.color.g, path.color.b, path.color.a = 0.1, 0.6, 1.0, 1.0
        path.points = [Point(x=x, y=y, z=z) for x, y, z in xyz.tolist()]
        markers.append(path)
        origin = Point(x=float(xyz[0, 0]), y=float(xyz[0, 1]), z=float(xyz[0, 2]))
    label = Marker()
    label.header.frame_id = frame_id
    label.header.stamp = stamp
    label.ns, label.id = TEXT_NS, 0
    label.type, label.action = Marker.TEXT_VIEW_FACING, Marker.ADD
    label.pose.position = Point(x=origin.x, y=origin.y, z=origin.z + TEXT_LIFT)
    label.pose.orientation.w = 1.0
    label.scale.z = TEXT_HEIGHT
    label.color.r = label.color.g = label.color.b = label.color.a = 1.0
    label.text = text
    markers.append(label)
    return MarkerArray(markers=markers)


def diagnostics_message(
    *,
    name: str,
    hardware_id: str,
    level: bytes,
    message: str,
    values: Mapping[str, object],
    stamp_ns: int,
) -> DiagnosticArray:
    """One DiagnosticStatus in a DiagnosticArray; ``values`` become KeyValue strings."""
    status = DiagnosticStatus(level=level, name=name, message=message, hardware_id=hardware_id)
    status.values = [KeyValue(key=str(k), value=_fmt(v)) for k, v in values.items()]
    array = DiagnosticArray(status=[status])
    array.header.stamp = ns_to_stamp(stamp_ns)
    return array


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def status_text(latency: float | None, rate: float, sequence: int) -> str:
    lat = "-" if latency is None else f"{latency * 1e3:.0f} ms"
    return f"pi0 #{sequence}  latency {lat}  {rate:.1f} Hz"
