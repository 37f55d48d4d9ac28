"""pi0_ros.tools."""
