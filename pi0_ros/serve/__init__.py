"""openpi interop: a websocket policy server (``pi0-ros-serve``) and a remote client.

    from pi0_ros.serve import PolicyServer, ServeConfig, RemotePolicy
    server = PolicyServer(lambda: Policy.from_checkpoint("ckpt"), ServeConfig(port=8000))
    server.serve_forever()                      # or: with server: ... (background thread)
    remote = RemotePolicy("ws://gpu-box:8000")  # Policy's infer / settings / close surface
    remote.infer(obs)["actions"]                # (H, D) float32

Protocol notes and security: docs/SERVE.md.  No rclpy here.
"""

from .protocol import BadRequest, packb, request_noise, unpackb
from .remote import RemoteError, RemotePolicy, RemoteSettings, RemoteUnavailable
from .server import DEFAULT_PORT, HEALTH_PATH, PolicyServer, ServeConfig

__all__ = [
    "DEFAULT_PORT", "HEALTH_PATH", "BadRequest", "PolicyServer", "RemoteError", "RemotePolicy",
    "RemoteSettings", "RemoteUnavailable", "ServeConfig", "packb", "request_noise", "unpackb",
]
