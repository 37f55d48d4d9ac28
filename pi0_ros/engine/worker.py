"""The inference thread: one thread owns all CUDA work; observations come in through a
latest-only slot, results leave through a callback.

API (for the ROS node; nothing here imports rclpy)::

    worker = InferenceWorker(target, on_result, on_error=None, *,
                             setup=None, teardown=None, pipeline=False, name="pi0-inference")
    worker.start()            # spawns the thread, runs setup() ON it (prepare / capture), returns
                              # when serving; re-raises setup's exception (no thread left behind)
    replaced = worker.submit(item)   # never blocks; newest wins: True if it replaced a pending
                                     # item (that one is dropped and counted in stats["dropped"])
    gen = worker.discard_pending()   # drop the pending item; results of everything submitted
                                     # before this call are never delivered (generation counter)
    worker.stop()             # discard like above, finish the in-flight item (not delivered),
                              # run teardown() on the thread, join it. Idempotent.
    worker.restart()          # stop() + start() (setup runs again)
    value = worker.call(fn)   # run fn() on the worker thread between items (e.g. re-prepare)
    worker.stats              # dict snapshot of the counters (see ``stats``)

``target`` is a callable ``target(item) -> result``, or an object with ``infer(item)`` (an
engine ``Backend``; items are then ``ModelInputs``). With ``pipeline=True`` the target must also
offer ``begin_prefix(item) -> ticket``, ``begin_denoise(ticket)``, ``ready(ticket)``,
``collect(ticket) -> result`` (``StaticBackend`` prepared with ``EngineSpec(pipeline=True)``):
vision + prefix of item N+1 are launched while item N is still denoising.

Callbacks run on the worker thread:

* ``on_result(WorkerResult)``: ``.result`` (what the target returned), ``.item``, ``.seq``
  (1-based submission number), ``.generation``, ``.timing`` (ms): ``queue`` (submit -> picked
  up), the target's own stage times when its result has a ``timing`` mapping (``upload``,
  ``vision``, ``prefix``, ``denoise``, ``download``, ``total``), ``run`` (picked up -> result) and
  ``latency`` (submit -> delivery).
* ``on_error(exc, WorkerError)``: an exception from the target (or from ``on_result``); counted in
  ``stats["errors"]`` / ``stats["callback_errors"]``; the thread keeps serving.

Delivery is atomic with respect to ``discard_pending()`` / ``stop()``: once either returns, no
result of an earlier generation is delivered. To guarantee that, ``on_result`` runs under a
delivery lock those two calls also take, so keep it short (convert + publish) and never wait in it
for the thread that calls ``discard_pending()`` / ``stop()``. Calling them from inside a callback
is allowed (``stop()`` from the worker thread does not join itself).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

_POLL_S = 2e-4  # pipelined mode: how often to look for a new item while the GPU works


@dataclass(frozen=True)
class WorkerResult:
    result: Any
    item: Any
    seq: int
    generation: int
    timing: Mapping[str, float]


@dataclass(frozen=True)
class WorkerError:
    item: Any
    seq: int
    generation: int
    where: str  # "infer", "on_result", "setup", "teardown"


@dataclass
class _Entry:
    item: Any
    seq: int
    generation: int
    t_submit: float
    t_start: float = 0.0
    ticket: Any = None


@dataclass
class _Counters:
    submitted: int = 0
    dropped: int = 0  # replaced in the slot by a newer item before being picked up
    discarded: int = 0  # pending or finished items of an old generation, not delivered
    started: int = 0
    delivered: int = 0
    errors: int = 0
    callback_errors: int = 0
    last_error: str = ""
    timing_sum: dict[str, float] = field(default_factory=dict)


class InferenceWorker:
    def __init__(self, target: Any, on_result: Callable[[WorkerResult], Any],
                 on_error: Callable[[BaseException, WorkerError], Any] | None = None, *,
                 setup: Callable[[], Any] | None = None,
                 teardown: Callable[[], Any] | None = None,
                 pipeline: bool = False, name: str = "pi0-inference",
                 poll_s: float = _POLL_S):
        self._infer = target.infer if hasattr(target, "infer") else target
        if not callable(self._infer):
            raise TypeError(f"target must be callable or have infer(), got {type(target)}")
        if pipeline and not all(hasattr(target, m) for m in
                                ("begin_prefix", "begin_denoise", "ready", "collect")):
            raise TypeError("pipeline=True needs a target with begin_prefix / begin_denoise / "
                            "ready / collect (a StaticBackend prepared with pipeline=True)")
        self._target = target
        self._on_result, self._on_error = on_result, on_error
        self._setup, self._teardown = setup, teardown
        self.pipeline, self.name, self.poll_s = pipeline, name, poll_s
        self._cond = threading.Condition()  # guards the slot, the flags and the counters
        self._deliver = threading.RLock()  # see the module docstring
        self._pending: _Entry | None = None
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._stopping = False
        self._generation = 0
        self._seq = 0
        self._n = _Counters()
        self._thread: threading.Thread | None = None

    # -- control (any thread) ---------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def generation(self) -> int:
        return self._generation

    def start(self, timeout: float | None = None) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        with self._cond:
            self._stopping = False
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._main, args=(ready, failure), name=self.name,
                                        daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"{self.name}: setup did not finish within {timeout} s")
        if failure:
            self._thread.join()
            self._thread = None
            raise RuntimeError(f"{self.name}: setup failed: {failure[0]!r}") from failure[0]

    def submit(self, item: Any) -> bool:
        """Put ``item`` in the latest-only slot; True if it replaced (dropped) a pending one."""
        now = time.perf_counter()
        with self._cond:
            self._seq += 1
            self._n.submitted += 1
            replaced = self._pending is not None
            if replaced:
                self._n.dropped += 1
            self._pending = _Entry(item, self._seq, self._generation, now)
            self._cond.notify()
        return replaced

    def discard_pending(self) -> int:
        """Drop the pending item and invalidate everything in flight; returns the new
        generation. After this returns no earlier result is delivered."""
        with self._deliver:
            with self._cond:
                self._generation += 1
                if self._pending is not None:
                    self._pending = None
                    self._n.discarded += 1
                return self._generation

    def stop(self, timeout: float | None = 30.0) -> None:
        """Discard, let the in-flight item finish (undelivered), tear down, join."""
        self.discard_pending()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"{self.name} did not stop within {timeout} s (an inference "
                               "is stuck)")
        self._thread = None

    def restart(self, timeout: float | None = None) -> None:
        self.stop()
        self.start(timeout)

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``fn()`` on the worker thread (between items) and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        if not self.running:
            raise RuntimeError(f"{self.name} is not running")
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify()
        return future.result(timeout)

    @property
    def stats(self) -> dict[str, Any]:
        with self._cond:
            n = self._n
            done = max(n.delivered, 1)
            return {
                "running": self.running, "generation": self._generation,
                "pending": self._pending is not None, "submitted": n.submitted,
                "dropped": n.dropped, "discarded": n.discarded, "started": n.started,
                "delivered": n.delivered, "errors": n.errors,
                "callback_errors": n.callback_errors, "last_error": n.last_error,
                "mean_ms": {k: v / done for k, v in n.timing_sum.items()},
            }

    # -- the thread ------------------------------------------------------------------------------
    def _main(self, ready: threading.Event, failure: list[BaseException]) -> None:
        try:
            if self._setup is not None:
                self._setup()
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            failure.append(exc)
            self._report(exc, WorkerError(None, 0, self._generation, "setup"), count=False)
            ready.set()
            return
        ready.set()
        in_flight: _Entry | None = None
        try:
            in_flight = self._serve_pipelined() if self.pipeline else self._serve()
        finally:
            self._drain(in_flight)
            if self._teardown is not None:
                try:
                    self._teardown()
                except Exception as exc:
                    self._report(exc, WorkerError(None, 0, self._generation, "teardown"))
            self._fail_calls()

    def _next(self, in_flight: _Entry | None = None) -> tuple[bool, _Entry | None]:
        """Wait for work: -> (stop, entry). Runs queued ``call``s while waiting. With an item
        in flight (pipelining) also returns (False, None) as soon as it is ready."""
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return True, None
                    if self._calls and in_flight is not None:
                        return False, None  # finish the in-flight item before a call()
                    if self._calls or self._pending is not None:
                        break
                    if in_flight is not None:
                        if self._target.ready(in_flight.ticket):
                            return False, None
                        self._cond.wait(self.poll_s)
                    else:
                        self._cond.wait()
                calls, self._calls = self._calls, []
                entry = None
                if not calls:  # control calls first; the pending item stays in the slot
                    entry, self._pending = self._pending, None
            if calls:
                for fn, future in calls:
                    self._run_call(fn, future)
                continue
            if entry.generation != self._generation:
                with self._cond:
                    self._n.discarded += 1
                continue
            entry.t_start = time.perf_counter()
            with self._cond:
                self._n.started += 1
            return False, entry

    def _serve(self) -> None:
        while True:
            stop, entry = self._next()
            if stop:
                return None
            try:
                result = self._infer(entry.item)
            except Exception as exc:
                self._report(exc, WorkerError(entry.item, entry.seq, entry.generation, "infer"))
                continue
            self._deliver_result(entry, result)

    def _serve_pipelined(self) -> _Entry | None:
        target, in_flight = self._target, None
        while True:
            stop, entry = self._next(in_flight)
            if stop:
                return in_flight
            if entry is not None:
                try:
                    # Vision + prefix of the new item overlap the in-flight denoising.
                    entry.ticket = target.begin_prefix(entry.item)
                except Exception as exc:
                    self._report(exc, WorkerError(entry.item, entry.seq, entry.generation,
                                                  "infer"))
                    entry = None
            if in_flight is not None:
                self._finish(in_flight)
                in_flight = None
            if entry is not None:
                try:
                    target.begin_denoise(entry.ticket)
                    in_flight = entry
                except Exception as exc:
                    self._report(exc, WorkerError(entry.item, entry.seq, entry.generation,
                                                  "infer"))

    def _finish(self, entry: _Entry) -> None:
        try:
            result = self._target.collect(entry.ticket)
        except Exception as exc:
            self._report(exc, WorkerError(entry.item, entry.seq, entry.generation, "infer"))
            return
        self._deliver_result(entry, result)

    def _drain(self, in_flight: _Entry | None) -> None:
        """At stop: wait for the in-flight item (its buffers must not be freed under the GPU)."""
        if in_flight is None:
            return
        try:
            self._target.collect(in_flight.ticket)
        except Exception as exc:
            self._report(exc, WorkerError(in_flight.item, in_flight.seq, in_flight.generation,
                                          "infer"))
        with self._cond:
            self._n.discarded += 1

    def _deliver_result(self, entry: _Entry, result: Any) -> None:
        t_done = time.perf_counter()
        timing = {"queue": (entry.t_start - entry.t_submit) * 1e3}
        stages = getattr(result, "timing", None)
        if isinstance(stages, Mapping):
            timing.update({k: float(v) for k, v in stages.items()})
        timing["run"] = (t_done - entry.t_start) * 1e3
        with self._deliver:
            if entry.generation != self._generation:
                with self._cond:
                    self._n.discarded += 1
                return
            timing["latency"] = (time.perf_counter() - entry.t_submit) * 1e3
            with self._cond:
                self._n.delivered += 1
                for k, v in timing.items():
                    self._n.timing_sum[k] = self._n.timing_sum.get(k, 0.0) + v
            try:
                self._on_result(WorkerResult(result, entry.item, entry.seq, entry.generation,
                                             timing))
            except Exception as exc:
                with self._cond:
                    self._n.callback_errors += 1
                self._report(exc, WorkerError(entry.item, entry.seq, entry.generation,
                                              "on_result"), count=False)

    def _report(self, exc: BaseException, info: WorkerError, count: bool = True) -> None:
        with self._cond:
            if count:
                self._n.errors += 1
            self._n.last_error = f"{info.where}: {type(exc).__name__}: {exc}"
        log.error("%s: %s failed (seq %d): %r", self.name, info.where, info.seq, exc,
                  exc_info=exc if info.where != "infer" else None)
        if self._on_error is not None:
            try:
                self._on_error(exc, info)
            except Exception:
                log.exception("%s: on_error raised", self.name)

    def _run_call(self, fn: Callable[[], Any], future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            future.set_exception(exc)

    def _fail_calls(self) -> None:
        with self._cond:
            calls, self._calls = self._calls, []
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError(f"{self.name} stopped"))
