"""The TensorRT backend's errors, and the one place that imports the ``tensorrt`` package."""

from __future__ import annotations


class TensorRTError(RuntimeError):
    """Base class of every TensorRT backend error."""


class TensorRTUnavailable(TensorRTError):
    """The ``tensorrt`` Python package (or CUDA) is missing."""


class StaleEngineError(TensorRTError):
    """A cached engine was built for something else (TensorRT version, GPU, checkpoint...)."""


class EngineNotFoundError(TensorRTError):
    """No engine for this configuration and building is not allowed."""


class EngineBuildError(TensorRTError):
    """The ONNX parser or the builder failed; the message carries TensorRT's own errors."""


def require_tensorrt():
    """Import tensorrt or raise ``TensorRTUnavailable`` saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(
            "the tensorrt backend needs the TensorRT Python package: on Jetson Thor it comes with "
            "JetPack (apt install python3-libnvinfer; in a venv use --system-site-packages); on a "
            "desktop GPU `pip install tensorrt` (downloads from NVIDIA's index, needs network) "
            f"- see docs/TENSORRT.md ({e})") from None
    return trt
