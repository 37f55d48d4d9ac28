"""pi0_ros.engine."""
