"""pi0_ros.pipeline: one pipeline from sensor messages to a checked action chunk (no rclpy).

    from pi0_ros.pipeline import PolicyPipeline, config_from_values, load_policy

``config.py``: the settings table and ``NodeConfig``; ``core.py``: ``PolicyPipeline`` (gate,
sync, assembly, inference, checks, counters, diagnostics); ``stats.py``: latency / rate
windows. The live node, the offline replay and the server drive this code; see
docs/ARCHITECTURE.md.
"""

from .config import (PARAMETERS, CameraConfig, ModelConfig, NodeConfig, VizConfig,
                     config_from_parameters, config_from_values)
from .core import (ERROR, OK, REASONS, WARN, Chunk, Frame, Observation, PolicyLike,
                   PolicyPipeline, Rejection, noise_for, policy_observation, resolve_slots)
from .factory import load_policy

__all__ = [
    "ERROR", "OK", "PARAMETERS", "REASONS", "WARN", "CameraConfig", "Chunk", "Frame",
    "ModelConfig", "NodeConfig", "Observation", "PolicyLike", "PolicyPipeline", "Rejection",
    "VizConfig", "config_from_parameters", "config_from_values", "load_policy", "noise_for",
    "policy_observation", "resolve_slots",
]
