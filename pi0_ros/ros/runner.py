"""``main()`` of the lifecycle nodes: parse ``--autostart``, spin, end cleanly on any signal.

    run_lifecycle_node(PolicyNode, "pi0_policy_node", "pi0 / pi0.5 policy node", argv)

One single-threaded executor per process (ros2/demos ``lifecycle_py`` style): callbacks only
convert and hand off (inference and the control loop have threads of their own), and transitions
then never race a wait-set rebuild. ``--autostart`` configures and activates the node itself, for
setups without ``ros2 lifecycle`` or launch; a failed configure leaves it ``unconfigured`` and
serving its lifecycle services. SIGINT / SIGTERM (``KeyboardInterrupt`` /
``ExternalShutdownException``) end it from any state with exit code 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.utilities import remove_ros_args


def run_lifecycle_node(make_node: Callable[[], Any], prog: str, description: str,
                       argv: Sequence[str] | None = None) -> int:
    """Create the node after ``rclpy.init``, spin it until shutdown, release it. The node must
    offer ``stop()`` (stop its threads, free its resources) besides the LifecycleNode API."""
    args = list(sys.argv if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--autostart", action="store_true", help="configure and activate")
    options = parser.parse_args(remove_ros_args(args)[1:])
    rclpy.init(args=args)
    node = make_node()
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        if options.autostart and node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            node.trigger_activate()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        # The signal handler shuts the context down at once; a callback that was already
        # running then fails on an invalid publisher. That is shutdown, not a crash.
        if node.context.ok():
            raise
    finally:
        node.stop()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
