"""Policy-node parameters on an rclpy node: declaration with descriptors and reading.

The table (``PARAMETERS``), the dataclasses and the one mapping function live in the pipeline
core (``pi0_ros/pipeline/config.py``) so the offline replay and the server read the same names
without rclpy; this module only declares them on a node and reads them back.
"""

from __future__ import annotations

from typing import Any

from pi0_ros.pipeline.config import (  # noqa: F401  (re-exported for the node and tests)
    BACKEND_CHOICES,
    DTYPES,
    EMPTY_ARRAY_TYPES,
    MAX_CAMERAS,
    PARAMETERS,
    CameraConfig,
    ModelConfig,
    NodeConfig,
    VizConfig,
    config_from_parameters,
)


def declare_parameters(node: Any) -> None:
    """Declare every parameter of ``PARAMETERS`` on an rclpy node, with descriptors."""
    from rcl_interfaces.msg import ParameterDescriptor
    from rclpy.parameter import Parameter

    for name, (default, description) in PARAMETERS.items():
        descriptor = ParameterDescriptor(name=name, description=description)
        if isinstance(default, list) and not default:
            # Declared typed and uninitialised; get_param reads it as [] until it is set.
            value = getattr(Parameter.Type, EMPTY_ARRAY_TYPES[name])
        else:
            value = default
        node.declare_parameter(name, value, descriptor)


def get_param(node: Any, name: str) -> Any:
    """A declared parameter's value; an unset empty-list parameter reads as []."""
    from rclpy.exceptions import ParameterUninitializedException

    try:
        return node.get_parameter(name).value
    except ParameterUninitializedException:
        return list(PARAMETERS[name][0])
