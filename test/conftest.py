"""Shared test set-up: DDS traffic stays on loopback; fixtures live in test/fixtures."""

from __future__ import annotations

import os
from pathlib import Path

# ROS_LOCALHOST_ONLY is ignored in Kilted; this keeps discovery on loopback for every rclpy test.
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")

FIXTURES = Path(__file__).parent / "fixtures"
