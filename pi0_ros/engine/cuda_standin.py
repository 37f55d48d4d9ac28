"""A CPU stand-in for the part of ``torch.cuda`` the engine uses, with the checks a GPU won't give.

The CUDA-graph backend and the CUDA branches of ``base.py`` (streams, events, pinned staging,
graph capture and replay) take their runtime as an argument (``runtime=torch.cuda`` by default).
``CudaStandin`` implements the same calls on CPU so those paths run in CI:

* **Graphs record and replay.** Inside ``graph(g, pool=, stream=)`` every aten op is recorded
  (a ``TorchDispatchMode``), not applied: mutations (``copy_`` into a static buffer) are deferred
  and functional outputs are allocated and filled with NaN, as a CUDA capture leaves them
  uninitialized. ``g.replay()`` re-runs the recorded ops on the same tensors and writes each
  result into the tensor captured for it: Python control flow and every address are frozen at
  capture, exactly what a CUDA graph does. Replay therefore equals eager bit for bit on CPU when
  the stage is graph-safe, and differs when it is not (a value read at capture time, a Python
  branch on data, an input passed by a fresh tensor instead of a static buffer).
* **Host syncs raise inside a capture** (``.item()``, ``nonzero``, ``.cpu()``, ``.tolist()``...),
  like ``cudaErrorStreamCaptureUnsupported``; :func:`no_host_sync` is the same check as a
  standalone context for eager stage calls.
* **A happens-before race detector.** Work runs immediately, in program order, but every op is
  stamped with the vector clock of the timeline it was issued on (the host or a stream).
  Events carry clocks, ``wait_event`` / ``synchronize`` / ``query`` merge them, and a launch
  happens after everything the host did before it. Each op reads and writes tensor storages, and
  a graph replay also writes two shared resources a real GPU has: the **cuBLAS workspace of the
  stream it was captured on** (PyTorch keys the workspace by (handle, stream) at capture time, so
  graphs captured on one stream share its address) and its **memory pool**. Two accesses to the
  same storage or resource, at least one a write, with no happens-before order between them,
  raise :class:`RaceError` naming both. The detector is exhaustive for the trace it sees: a
  missing ``wait_event`` fails every run, not one run in a thousand.

What it does not model: kernel timing (events read ``perf_counter``), the default stream as a
separate timeline (it is folded into the host, so a missing ``synchronize`` after default-stream
initialization is not caught), cuDNN / NCCL, and device memory accounting.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

# aten ops whose result depends on device values the host must wait for (or that read them back).
HOST_SYNC_OPS = frozenset({
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
    aten.equal.default, aten.is_nonzero.default, aten._unique2.default,
    aten.unique_consecutive.default, aten.repeat_interleave.Tensor,
})
# Python-level tensor methods that copy to the host or read a value (seen by a TorchFunctionMode:
# on CPU, ``.cpu()`` of a CPU tensor never reaches the dispatcher).
HOST_SYNC_METHODS = frozenset({"cpu", "item", "tolist", "numpy", "__bool__", "__int__",
                               "__float__", "__index__", "nonzero"})
# Ops that run on cuBLAS and so use the per-(handle, stream) workspace.
GEMM_OPS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default,
                      aten.baddbmm.default, aten._scaled_mm.default})


class RaceError(AssertionError):
    """Two accesses to one buffer / resource, one a write, with no happens-before order."""


class HostSyncError(RuntimeError):
    """A host synchronization inside a captured (or checked) region."""


# -- host-sync check ------------------------------------------------------------------------------
class _SyncFunctionMode(TorchFunctionMode):
    def __init__(self, where: str):
        super().__init__()
        self.where = where

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_SYNC_METHODS:
            raise HostSyncError(f"host sync: Tensor.{name}() inside {self.where}")
        return func(*args, **(kwargs or {}))


class _SyncDispatchMode(TorchDispatchMode):
    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_SYNC_OPS:
            raise HostSyncError(f"host sync: aten.{func.__name__} inside {self.where}")
        if not _is_view(func):
            self.ops += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync(where: str = "a captured stage") -> Iterator[_SyncDispatchMode]:
    """Raise :class:`HostSyncError` on any host sync (Python method or aten op) in the block.

    Yields the dispatch mode; its ``ops`` counts the non-view aten ops run (a kernel-count proxy).
    """
    dispatch = _SyncDispatchMode(where)
    with _SyncFunctionMode(where), dispatch:
        yield dispatch


# -- helpers -------------------------------------------------------------------------------------
_VIEW_CACHE: dict[Any, bool] = {}
_MUT_CACHE: dict[Any, tuple[int, ...]] = {}


def _is_view(func) -> bool:
    """True for ops whose outputs alias an input without writing it (view, detach, t, ...)."""
    v = _VIEW_CACHE.get(func)
    if v is None:
        rets = func._schema.returns
        v = bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write
                               for r in rets)
        _VIEW_CACHE[func] = v
    return v


def _mutated(func) -> tuple[int, ...]:
    """Positions (in the schema's argument list) of the arguments an op writes."""
    m = _MUT_CACHE.get(func)
    if m is None:
        m = tuple(i for i, a in enumerate(func._schema.arguments)
                  if a.alias_info is not None and a.alias_info.is_write)
        _MUT_CACHE[func] = m
    return m


def _written_args(func, args, kwargs) -> list[torch.Tensor]:
    out = []
    schema_args = func._schema.arguments
    for i in _mutated(func):
        name = schema_args[i].name
        value = args[i] if i < len(args) else kwargs.get(name)
        flat, _ = tree_flatten(value)
        out += [t for t in flat if isinstance(t, torch.Tensor)]
    return out


def _tensors(tree) -> list[torch.Tensor]:
    flat, _ = tree_flatten(tree)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _key(t: torch.Tensor) -> tuple[str, int] | None:
    st = t.untyped_storage()
    if st.nbytes() == 0:
        return None
    return ("mem", st.data_ptr())


# -- timelines, events, streams ------------------------------------------------------------------
_ids = itertools.count(1)


class _Timeline:
    def __init__(self, name: str):
        self.id = next(_ids)
        self.name = name
        self.clock: dict[int, int] = {self.id: 0}

    def merge(self, clock: dict[int, int] | None) -> None:
        for k, v in (clock or {}).items():
            if self.clock.get(k, 0) < v:
                self.clock[k] = v

    def tick(self) -> int:
        self.clock[self.id] += 1
        return self.clock[self.id]

    def __repr__(self) -> str:
        return self.name


class Stream(_Timeline):
    """A CUDA stream stand-in: a timeline of the race detector."""

    def __init__(self, rt: CudaStandin, name: str | None = None):
        super().__init__(name or f"stream{next(rt._stream_names)}")
        self._rt = rt

    def wait_event(self, event: Event) -> None:
        self.merge(event._clock)

    def wait_stream(self, stream: Stream) -> None:
        self.merge(stream.clock)

    def synchronize(self) -> None:
        self._rt._host_sync(self.clock)

    def query(self) -> bool:
        self.synchronize()
        return True

    def record_event(self, event: Event | None = None) -> Event:
        event = event or Event(self._rt)
        event.record(self)
        return event


class Event:
    """A CUDA event stand-in: a vector-clock snapshot and a host timestamp."""

    def __init__(self, rt: CudaStandin, enable_timing: bool = False, **_: Any):
        self._rt = rt
        self._clock: dict[int, int] | None = None
        self._t: float | None = None
        self.enable_timing = enable_timing

    def record(self, stream: Stream | None = None) -> None:
        stream = stream or self._rt.current_stream()
        self._clock = dict(self._rt._launch_clock(stream))
        self._t = time.perf_counter()

    def synchronize(self) -> None:
        self._rt._host_sync(self._clock)

    def query(self) -> bool:
        self.synchronize()  # a True query orders the host after the work, as on CUDA
        return True

    def elapsed_time(self, end: Event) -> float:
        host = self._rt.host.clock
        for ev in (self, end):
            if ev._clock is None or ev._t is None:
                raise RuntimeError("elapsed_time on an event that was never recorded")
            if any(host.get(k, 0) < v for k, v in ev._clock.items()):
                raise RuntimeError("elapsed_time on an event the host has not waited for "
                                   "(cudaErrorNotReady on a GPU)")
        return (end._t - self._t) * 1e3


# -- graphs ---------------------------------------------------------------------------------------
@dataclass
class _Op:
    func: Any
    args: tuple
    kwargs: dict
    outs: list[torch.Tensor] | None  # None: a mutation (re-applied), else outputs to refill


@dataclass
class CUDAGraph:
    """A recorded op list; ``replay()`` re-runs it into the captured tensors."""

    _rt: CudaStandin | None = None
    ops: list[_Op] = field(default_factory=list)
    stream: Stream | None = None
    pool: Any = None
    reads: dict[Any, Any] = field(default_factory=dict)
    writes: dict[Any, Any] = field(default_factory=dict)
    gemm: bool = False
    captured: bool = False

    def replay(self) -> None:
        if not self.captured:
            raise RuntimeError("replay() of a graph that was never captured")
        rt = self._rt
        stream = rt.current_stream()
        writes = dict(self.writes)
        writes[("pool", id(self.pool))] = None
        if self.gemm:
            # The workspace address baked in at capture: the capture stream's.
            writes[("cublas_workspace", self.stream.name)] = None
        rt._access(stream, self.reads, writes, f"graph replay (captured on {self.stream})")
        with rt._raw(), torch.no_grad():  # a replay is kernels only: no autograd (RTC's VJP)
            for op in self.ops:
                result = op.func(*op.args, **op.kwargs)
                if op.outs is not None:
                    for dst, src in zip(op.outs, _tensors(result), strict=True):
                        dst.copy_(src)
        rt.replays += 1

    def reset(self) -> None:
        self.ops, self.captured = [], False

    def _record(self, func, args, kwargs):
        if _is_view(func):
            return func(*args, **kwargs)
        written = _written_args(func, args, kwargs)
        if written:
            self.ops.append(_Op(func, args, kwargs, None))
            # A mutating op returns its written argument(s) (copy_, add_, out= variants).
            return written[0] if len(func._schema.returns) == 1 else tuple(written)
        result = func(*args, **kwargs)  # on stale data: only the outputs' layout matters
        outs = _tensors(result)
        for t in outs:
            if t.is_floating_point():
                t.fill_(float("nan"))  # uninitialized, as after a CUDA capture
        self.ops.append(_Op(func, args, kwargs, outs))
        if func in GEMM_OPS:
            self.gemm = True
        return result

    def _finish(self) -> None:
        internal = {_key(t) for op in self.ops if op.outs for t in op.outs}
        for op in self.ops:
            for t in _tensors((op.args, op.kwargs)):
                k = _key(t)
                if k is not None and k not in internal:
                    self.reads[k] = t
            if op.outs is None:
                for t in _written_args(op.func, op.args, op.kwargs):
                    k = _key(t)
                    if k is not None and k not in internal:
                        self.writes[k] = t
        self.captured = True


@dataclass
class _History:
    ref: Any
    write: tuple[int, int, str] | None = None  # (timeline id, epoch, what)
    reads: dict[int, tuple[int, str]] = field(default_factory=dict)


class _Mode(TorchDispatchMode):
    def __init__(self, rt: CudaStandin):
        super().__init__()
        self.rt = rt

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rt = self.rt
        if rt._raw_depth:
            return func(*args, **kwargs)
        if rt._capturing is not None:
            if func in HOST_SYNC_OPS:
                raise HostSyncError(f"host sync: aten.{func.__name__} during CUDA graph capture")
            return rt._capturing._record(func, args, kwargs)
        timeline = rt._stack[-1] if rt._stack else rt.host
        if func in HOST_SYNC_OPS and timeline is not rt.host:
            rt._host_sync(rt._launch_clock(timeline))  # .item() waits for its stream
        result = func(*args, **kwargs)
        if _is_view(func):
            return result
        reads = {k: t for t in _tensors((args, kwargs)) if (k := _key(t)) is not None}
        writes = {k: t for t in _written_args(func, args, kwargs) + _tensors(result)
                  if (k := _key(t)) is not None}
        if func in GEMM_OPS and timeline is not rt.host:
            writes[("cublas_workspace", timeline.name)] = None
        rt._access(timeline, reads, writes, f"aten.{func.__name__}")
        return result


class _SyncMethodsInCapture(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_SYNC_METHODS:
            raise HostSyncError(f"host sync: Tensor.{name}() during CUDA graph capture")
        return func(*args, **(kwargs or {}))


class CudaStandin:
    """``torch.cuda``'s engine-facing API on CPU: ``Stream``, ``Event``, ``CUDAGraph``,
    ``graph``, ``graph_pool_handle``, ``stream``, ``current_stream``, ``synchronize``,
    ``set_device``, ``empty_cache``, plus ``empty_pinned`` (host staging).

    Use ``with rt.tracking():`` around a whole test to also check host-side accesses (reading a
    pinned output before its event, refilling staging an upload still reads); without it only
    stream-side work is checked.
    """

    def __init__(self) -> None:
        self.host = _Timeline("host")
        self._stream_names = itertools.count()
        self._default = Stream(self, "default_stream")
        self._stack: list[Stream] = []
        self._seen: set[Stream] = set()
        self._capturing: CUDAGraph | None = None
        self._raw_depth = 0
        self._mode_depth = 0
        self._mode: _Mode | None = None
        self._history: dict[Any, _History] = {}
        self.replays = 0
        self.captures = 0
        self.races_checked = 0

    # -- torch.cuda API ------------------------------------------------------------------------
    def Stream(self, device: Any = None, priority: int = 0) -> Stream:  # noqa: N802
        return Stream(self)

    def Event(self, enable_timing: bool = False, **kwargs: Any) -> Event:  # noqa: N802
        return Event(self, enable_timing, **kwargs)

    def CUDAGraph(self) -> CUDAGraph:  # noqa: N802
        return CUDAGraph(self)

    def graph_pool_handle(self) -> object:
        return object()

    def current_stream(self, device: Any = None) -> Stream:
        return self._stack[-1] if self._stack else self._default

    def set_device(self, device: Any) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def synchronize(self, device: Any = None) -> None:
        clock: dict[int, int] = {}
        for tl in [self._default, *self._streams_seen()]:
            for k, v in tl.clock.items():
                clock[k] = max(clock.get(k, 0), v)
        self._host_sync(clock)

    def empty_pinned(self, shape, dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    @contextlib.contextmanager
    def stream(self, stream: Stream | None):
        if stream is None:
            yield
            return
        self._stack.append(stream)
        self._seen.add(stream)
        try:
            with self._active():
                yield
        finally:
            self._stack.pop()

    @contextlib.contextmanager
    def graph(self, cuda_graph: CUDAGraph, pool: Any = None, stream: Stream | None = None,
              capture_error_mode: str = "global"):
        if self._capturing is not None:
            raise RuntimeError("nested CUDA graph capture")
        stream = stream or self.Stream()
        if stream is self._default:
            raise RuntimeError("cannot capture on the default stream")
        cuda_graph.stream, cuda_graph.pool = stream, pool
        self._seen.add(stream)
        self._stack.append(stream)
        self._capturing = cuda_graph
        try:
            with self._active(), _SyncMethodsInCapture():
                yield
        finally:
            self._capturing = None
            self._stack.pop()
        cuda_graph._finish()
        self.captures += 1

    # -- tracking ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def tracking(self):
        """Check host-side accesses too (ops outside any stream context run on the host)."""
        with self._active():
            yield self

    def _streams_seen(self) -> list[Stream]:
        return list(self._seen)

    @contextlib.contextmanager
    def _active(self):
        if self._mode_depth == 0:
            self._mode = _Mode(self)
            self._mode.__enter__()
        self._mode_depth += 1
        try:
            yield
        finally:
            self._mode_depth -= 1
            if self._mode_depth == 0:
                self._mode.__exit__(None, None, None)
                self._mode = None

    @contextlib.contextmanager
    def _raw(self):
        self._raw_depth += 1
        try:
            yield
        finally:
            self._raw_depth -= 1

    def _launch_clock(self, stream: Stream) -> dict[int, int]:
        if stream is not self.host:
            stream.merge(self.host.clock)  # a launch happens after the host's earlier work
        return stream.clock

    def _host_sync(self, clock: dict[int, int] | None) -> None:
        self.host.merge(clock)
        # Once the host is ordered after every stream, no past access can race a future one.
        if all(self.host.clock.get(s.id, 0) >= s.clock[s.id] for s in self._seen):
            self._history.clear()

    def _access(self, timeline: _Timeline, reads: dict, writes: dict, what: str) -> None:
        clock = self._launch_clock(timeline) if timeline is not self.host else timeline.clock
        epoch = timeline.tick()
        me = timeline.id
        desc = f"{what} on {timeline}"

        def ordered(tl_id: int, ep: int) -> bool:
            return tl_id == me or clock.get(tl_id, 0) >= ep

        for key, ref in reads.items():
            h = self._history.get(key)
            if h is None:
                h = self._history[key] = _History(ref)
            if h.write and not ordered(h.write[0], h.write[1]):
                raise RaceError(f"read-after-write race on {_name(key, ref)}: {desc} is not "
                                f"ordered after {h.write[2]}")
            if key not in writes:
                h.reads[me] = (epoch, desc)
        for key, ref in writes.items():
            h = self._history.get(key)
            if h is None:
                h = self._history[key] = _History(ref)
            if h.write and not ordered(h.write[0], h.write[1]):
                raise RaceError(f"write-after-write race on {_name(key, ref)}: {desc} is not "
                                f"ordered after {h.write[2]}")
            for tl_id, (ep, rdesc) in h.reads.items():
                if not ordered(tl_id, ep):
                    raise RaceError(f"write-after-read race on {_name(key, ref)}: {desc} is "
                                    f"not ordered after {rdesc}")
            h.write, h.reads = (me, epoch, desc), {}
        self.races_checked += 1


def _name(key, ref) -> str:
    if key[0] == "mem" and isinstance(ref, torch.Tensor):
        return f"a {tuple(ref.shape)} {str(ref.dtype).removeprefix('torch.')} buffer"
    if key[0] == "cublas_workspace":
        return f"the cuBLAS workspace of {key[1]}"
    if key[0] == "pool":
        return "a graph memory pool"
    return str(key)

