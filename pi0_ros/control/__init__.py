"""pi0_ros.control: pure streaming executor core (no rclpy).

``chunk`` (ActionChunk, interpretations) -> ``trajectory`` (ChunkTrajectory: spline sampling)
-> ``stitching`` (replace / crossfade / temporal_ensemble references) -> ``limits``
(RateLimiter) -> ``executor`` (StreamingExecutor: submit, tick, watchdog). docs/EXECUTOR.md.
"""

from pi0_ros.control.chunk import INTERPRETATIONS, ActionChunk, ChunkError, chunk_from_arrays
from pi0_ros.control.executor import (
    STRATEGIES,
    ChunkExecutor,
    Command,
    ExecutorConfig,
    StreamingExecutor,
)
from pi0_ros.control.limits import RateLimiter
from pi0_ros.control.trajectory import INTERPOLATIONS, ChunkTrajectory

__all__ = ["INTERPOLATIONS", "INTERPRETATIONS", "STRATEGIES", "ActionChunk", "ChunkError",
           "ChunkExecutor", "ChunkTrajectory", "Command", "ExecutorConfig", "RateLimiter",
           "StreamingExecutor", "chunk_from_arrays"]
