"""pi0_ros.ros."""
