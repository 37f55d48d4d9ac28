"""The runtime seam: how engines are built, loaded, run and inspected.

``TrtRuntime`` is the protocol: ``build(onnx, settings) -> bytes``, ``load(bytes) -> TrtEngine``
(``run(inputs, outputs)`` on bound torch tensors), ``inspect(bytes)`` (the engine inspector's
JSON). ``TensorRTRuntime`` drives the TensorRT Python API (TensorRT 10: named I/O tensors,
``execute_async_v3`` on the current CUDA stream); ``OnnxRuntimeRuntime`` "builds" by keeping the
ONNX bytes and runs them with onnxruntime on CPU (float32 only), so the backend, the cache and the
build flow are testable without TensorRT.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol
from collections.abc import Callable, Mapping

import torch

from ..registry import resolve_device
from .errors import EngineBuildError, StaleEngineError, TensorRTError, require_tensorrt
from .layers import fp32_island
from .settings import BuilderSettings, DeviceInfo, cuda_device_info

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


class TrtEngine(Protocol):
    """A deserialized engine with its execution context."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def run(self, inputs: Mapping[str, torch.Tensor],
            outputs: Mapping[str, torch.Tensor]) -> None:
        """Read ``inputs`` and write ``outputs`` (contiguous, engine dtypes), enqueued on the
        current CUDA stream (synchronous on CPU)."""


class TrtRuntime(Protocol):
    version: str

    def device_info(self) -> DeviceInfo: ...

    def build(self, onnx_path: Path, settings: BuilderSettings,
              progress: Progress | None = None) -> bytes: ...

    def load(self, blob: bytes) -> TrtEngine: ...

    def inspect(self, blob: bytes) -> Mapping[str, Any] | None: ...


def _trt_torch_dtypes(trt) -> dict[Any, torch.dtype]:
    pairs = [("float32", torch.float32), ("float16", torch.float16),
             ("bfloat16", torch.bfloat16), ("int64", torch.int64), ("int32", torch.int32),
             ("int8", torch.int8), ("bool", torch.bool), ("uint8", torch.uint8),
             ("fp8", torch.float8_e4m3fn)]
    return {getattr(trt, n): t for n, t in pairs if hasattr(trt, n)}


class TensorRTRuntime:
    """``TrtRuntime`` over the TensorRT Python API (TensorRT 10: named I/O tensors,
    ``execute_async_v3``). Unverified in the session that wrote it (no TensorRT there)."""

    def __init__(self, device: torch.device | str | None = None, verbose: bool = False):
        self.trt = trt = require_tensorrt()
        self.version = str(trt.__version__)
        self.device = resolve_device(device if device is not None else "cuda")
        self._device_info = cuda_device_info(self.device)
        self.logger = _make_logger(trt, verbose)
        self._runtime = trt.Runtime(self.logger)
        self._dtypes = _trt_torch_dtypes(trt)

    def device_info(self) -> DeviceInfo:
        return self._device_info

    def build(self, onnx_path: Path, settings: BuilderSettings,
              progress: Progress | None = None) -> bytes:
        trt = self.trt
        self.logger.errors.clear()
        builder = trt.Builder(self.logger)
        flags = 0
        for name in settings.network_flags:
            flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}: "
                                   + "; ".join(errors or self.logger.errors))
        config = builder.create_builder_config()
        config.builder_optimization_level = settings.opt_level
        for name in settings.builder_flags:
            config.set_flag(getattr(trt.BuilderFlag, name))
        for name in settings.clear_flags:
            config.clear_flag(getattr(trt.BuilderFlag, name))
        if settings.workspace_bytes is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # inspector dtypes
        if settings.profiles:
            profile = builder.create_optimization_profile()
            for p in settings.profiles:
                profile.set_shape(p.name, p.min, p.opt, p.max)
            config.add_optimization_profile(profile)
        if settings.fp32_islands:
            pinned = pin_fp32_islands(trt, network)
            log.info("pinned %d layers to float32", pinned)
        if progress is not None and hasattr(trt, "IProgressMonitor"):
            config.progress_monitor = _make_progress_monitor(trt, progress)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise EngineBuildError(f"TensorRT failed to build {onnx_path}: "
                                   + ("; ".join(self.logger.errors) or "no error message"))
        return bytes(blob)

    def load(self, blob: bytes) -> _TensorRTEngine:
        engine = self._runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise StaleEngineError("TensorRT could not deserialize the engine (built by another "
                                   "TensorRT version or for another GPU?): "
                                   + "; ".join(self.logger.errors))
        return _TensorRTEngine(self.trt, engine, self._dtypes)

    def inspect(self, blob: bytes) -> Mapping[str, Any] | None:
        """Inspector JSON at the profile's max shapes (with dynamic shapes and no context the
        inspector reports "N/A due to dynamic shapes" instead of datatypes)."""
        trt = self.trt
        engine = self._runtime.deserialize_cuda_engine(blob)
        if engine is None:
            return None
        context = engine.create_execution_context()
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT and -1 in tuple(
                    engine.get_tensor_shape(name)):
                context.set_input_shape(name, tuple(engine.get_tensor_profile_shape(name, 0)[2]))
        inspector = engine.create_engine_inspector()
        inspector.execution_context = context
        return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def pin_fp32_islands(trt, network) -> int:
    """Set precision / output types of every ``fp32_island`` layer with float outputs."""
    floats = {trt.float32, trt.float16} | ({trt.bfloat16} if hasattr(trt, "bfloat16") else set())
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not fp32_island(layer.name):
            continue
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outs or any(o.dtype not in floats for o in outs):
            continue  # shape / index arithmetic: leave alone
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


class _TensorRTEngine:
    def __init__(self, trt, engine, dtypes):
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = tuple(n for n in names if engine.get_tensor_mode(n) == mode)
        self.outputs = tuple(n for n in names if engine.get_tensor_mode(n) != mode)
        self.dtypes = {n: dtypes.get(engine.get_tensor_dtype(n)) for n in names}

    def run(self, inputs: Mapping[str, torch.Tensor],
            outputs: Mapping[str, torch.Tensor]) -> None:
        ctx = self.context
        for name in self.inputs:
            t = _checked(name, inputs, self.dtypes[name])
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        for name in self.outputs:
            t = _checked(name, outputs, self.dtypes[name])
            want = tuple(ctx.get_tensor_shape(name))
            if want != tuple(t.shape):
                raise TensorRTError(f"engine output {name} has shape {want}, buffer "
                                    f"{tuple(t.shape)}")
            ctx.set_tensor_address(name, t.data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise TensorRTError("execute_async_v3 failed")


def _checked(name, tensors, dtype):
    if name not in tensors:
        raise TensorRTError(f"engine tensor {name!r} has no buffer (have {sorted(tensors)})")
    t = tensors[name]
    if dtype is not None and t.dtype != dtype:
        raise TensorRTError(f"engine tensor {name!r} is {dtype}, buffer is {t.dtype}")
    if not t.is_contiguous():
        raise TensorRTError(f"buffer for {name!r} is not contiguous")
    return t


def _make_logger(trt, verbose: bool):
    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = int(severity)  # INTERNAL_ERROR 0 < ERROR 1 < WARNING 2 < INFO 3 < VERBOSE 4
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif level <= int(trt.ILogger.Severity.WARNING):
                log.warning("TensorRT: %s", msg)
            elif verbose:
                log.info("TensorRT: %s", msg)

    return _Logger()


def _make_progress_monitor(trt, progress: Progress):
    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.t0 = time.perf_counter()

        def phase_start(self, phase_name, parent_phase, num_steps):
            indent = "  " if parent_phase else ""
            progress(f"    {indent}{phase_name} ({num_steps} steps) "
                     f"[{time.perf_counter() - self.t0:.0f} s]")

        def step_complete(self, phase_name, step):
            return True  # keep building

        def phase_finish(self, phase_name):
            pass

    return _Monitor()


class OnnxRuntimeRuntime:
    """``TrtRuntime`` stand-in that "builds" by keeping the ONNX bytes and runs them with
    onnxruntime on CPU (float32 only). Used to test the backend, the cache and the build flow
    without TensorRT, and as a float32 reference for the exported stages."""

    def __init__(self, threads: int = 0):
        import onnxruntime

        self.version = f"onnxruntime-{onnxruntime.__version__}"
        self.threads = threads
        self.builds: list[tuple[Path, BuilderSettings]] = []

    def device_info(self) -> DeviceInfo:
        return DeviceInfo("cpu (onnxruntime)", (0, 0))

    def build(self, onnx_path: Path, settings: BuilderSettings,
              progress: Progress | None = None) -> bytes:
        import onnx

        if settings.onnx_dtype != "float32":
            raise EngineBuildError("OnnxRuntimeRuntime runs float32 graphs only")
        self.builds.append((Path(onnx_path), settings))
        if progress:
            progress(f"    onnxruntime: loading {onnx_path}")
        return onnx.load(str(onnx_path)).SerializeToString()

    def load(self, blob: bytes) -> _OrtEngine:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        return _OrtEngine(ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"]))

    def inspect(self, blob: bytes) -> Mapping[str, Any] | None:
        return None


class _OrtEngine:
    def __init__(self, session):
        self.session = session
        self.inputs = tuple(i.name for i in session.get_inputs())
        self.outputs = tuple(o.name for o in session.get_outputs())

    def run(self, inputs: Mapping[str, torch.Tensor],
            outputs: Mapping[str, torch.Tensor]) -> None:
        feeds = {n: _checked(n, inputs, None).detach().cpu().numpy() for n in self.inputs}
        for name, value in zip(self.outputs, self.session.run(list(self.outputs), feeds)):
            out = _checked(name, outputs, None)
            if tuple(out.shape) != value.shape:
                raise TensorRTError(f"engine output {name} has shape {value.shape}, buffer "
                                    f"{tuple(out.shape)}")
            out.copy_(torch.from_numpy(value))
