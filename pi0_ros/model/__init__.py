"""pi0 / pi0.5 model core: pure torch, no ROS."""

from .config import (GEMMA_PRESETS, OPENPI_CAMERAS, VISION_PRESETS, GemmaConfig, Pi0Config,
                     VisionConfig, tiny_config)
from .pi0 import Pi0Model, PrefixCache, TimeConditioning, random_init_, time_grid
from .rtc import (AlignedPrefix, DelayEstimator, RTCConfig, RTCDenoiser, RTCPrefix,
                  align_prefix, check_backend)
from .weights import (CheckpointError, checkpoint_shapes, geometry_dict, load_checkpoint,
                      save_checkpoint)

__all__ = [
    "AlignedPrefix", "DelayEstimator", "RTCConfig", "RTCDenoiser", "RTCPrefix", "align_prefix",
    "check_backend",
    "GEMMA_PRESETS", "OPENPI_CAMERAS", "VISION_PRESETS", "CheckpointError", "GemmaConfig",
    "Pi0Config", "Pi0Model", "PrefixCache", "TimeConditioning", "VisionConfig",
    "checkpoint_shapes", "geometry_dict", "load_checkpoint", "random_init_", "save_checkpoint",
    "time_grid", "tiny_config",
]
