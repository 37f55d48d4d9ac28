"""pi0_ros.control: pure streaming executor core (no rclpy).

``chunk`` (ActionChunk, interpretations) -> ``trajectory`` (ChunkTrajectory: spline sampling)
-> ``stitching`` (replace / crossfade / temporal_ensemble references) -> ``limits``
(RateLimiter) -> ``executor`` (StreamingExecutor: submit, tick, watchdog) -> ``driver``
(ExecutorDriver: joint-state mapping, chunk conversion, closed loop, counters, diagnostics --
shared by the executor node and the offline replay). docs/EXECUTOR.md.
"""

from pi0_ros.control.chunk import INTERPRETATIONS, ActionChunk, ChunkError, chunk_from_arrays
from pi0_ros.control.executor import (
    STRATEGIES,
    ChunkExecutor,
    Command,
    ExecutorConfig,
    StreamingExecutor,
)
from pi0_ros.control.driver import Diagnostics, ExecutorDriver
from pi0_ros.control.limits import RateLimiter
from pi0_ros.control.trajectory import INTERPOLATIONS, ChunkTrajectory

__all__ = ["INTERPOLATIONS", "INTERPRETATIONS", "STRATEGIES", "ActionChunk", "ChunkError",
           "ChunkExecutor", "ChunkTrajectory", "Command", "Diagnostics", "ExecutorConfig",
           "ExecutorDriver", "RateLimiter",
           "StreamingExecutor", "chunk_from_arrays"]
