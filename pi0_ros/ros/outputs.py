"""The policy's output messages, built once for the live node and the offline replay.

``chunk_messages`` turns an accepted pipeline chunk into the node's four outputs (ActionChunk,
JointTrajectory, planned JointState, rviz markers); ``diagnostics`` wraps the pipeline's summary
in a DiagnosticArray. The node publishes them; the replay writes them into its output bag.
"""

from __future__ import annotations

from typing import Any

from pi0_ros.pipeline import Chunk, NodeConfig
from pi0_ros.ros import conversions as conv
from pi0_ros.ros import viz

OUTPUT_TOPICS = {  # key -> node-relative topic
    "chunk": "~/action_chunk",
    "trajectory": "~/trajectory",
    "planned": "~/planned_joint_states",
    "markers": "~/markers",
}
LEVELS = {0: b"\x00", 1: b"\x01", 2: b"\x02"}  # pipeline level -> DiagnosticStatus level


def chunk_messages(config: NodeConfig, chunk: Chunk, *, now_ns: int, model_name: str,
                   rate_hz: float, chunk_type: Any = None) -> dict[str, Any]:
    """{"chunk", "trajectory", "planned", "markers"} messages of an accepted chunk.

    ``chunk_type``: the ActionChunk builder (None: ``conversions.chunk_to_msg``, which needs
    pi0_ros_msgs built; the replay passes its rosbags builder when it is not)."""
    actions, names, stamp = chunk.actions, config.action_joint_names, chunk.obs.stamp_ns
    build = chunk_type or conv.chunk_to_msg
    msg = build(actions, stamp_ns=stamp, dt=config.action_dt, joint_names=names,
                inference_latency=chunk.latency, sequence=chunk.sequence, model_name=model_name,
                input_stamps=chunk.obs.input_stamps, rtc_delay=chunk.rtc_delay)
    return {
        "chunk": msg,
        "trajectory": conv.chunk_to_trajectory(actions, stamp_ns=stamp, dt=config.action_dt,
                                               joint_names=names),
        "planned": viz.planned_joint_state(actions, names, config.viz.lookahead,
                                           stamp_ns=now_ns),
        "markers": viz.chunk_markers(
            actions, path_indices=config.viz.path_indices, frame_id=config.viz.frame_id,
            stamp_ns=now_ns, text=viz.status_text(chunk.latency, rate_hz, chunk.sequence)),
    }


def diagnostics(name: str, hardware_id: str, level: int, message: str,
                values: dict[str, object], stamp_ns: int) -> Any:
    return viz.diagnostics_message(name=name, hardware_id=hardware_id, level=LEVELS[level],
                                   message=message, values=values, stamp_ns=stamp_ns)
