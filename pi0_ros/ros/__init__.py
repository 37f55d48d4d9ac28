"""pi0_ros.ros: the only package that imports rclpy or message packages.

``node`` (the policy lifecycle node, ``pi0_policy_node``), ``params`` (its parameters and their
one mapping onto ``NodeConfig``), ``sync`` (message_filters' approximate-time synchronizer
contract), ``conversions`` (messages <-> numpy), ``viz`` (markers, planned joint state,
diagnostics), ``executor_node`` (the action executor). docs/NODE.md describes the policy node.
"""
