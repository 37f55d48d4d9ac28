"""pi0_ros: pi0 / pi0.5 vision-language-action policies on ROS 2.

Layering (arrows point down only): ``ros`` -> ``policy`` / ``control`` -> ``engine`` -> ``model``.
Only ``pi0_ros.ros`` imports rclpy or message packages.
"""

__version__ = "0.1.0"
