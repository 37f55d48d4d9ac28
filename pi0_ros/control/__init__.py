"""pi0_ros.control."""
