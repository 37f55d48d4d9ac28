"""InferenceWorker semantics: latest wins, drop counting, generations, errors, stop/restart."""

from __future__ import annotations

import threading

import pytest
import torch

from pi0_ros.engine.base import EngineSpec, dummy_inputs
from pi0_ros.engine.eager import EagerBackend
from pi0_ros.engine.worker import InferenceWorker, WorkerError, WorkerResult
from pi0_ros.model import Pi0Model, tiny_config

WAIT = 10.0  # seconds; every wait is on an event, this only bounds a hang


class Gate:
    """A target that blocks on an event per item so tests control the interleaving."""

    def __init__(self):
        self.started = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.seen: list = []

    def __call__(self, item):
        self.seen.append(item)
        self.started.release()
        assert self.release.acquire(timeout=WAIT)
        if isinstance(item, Exception):
            raise item
        return item * 10


class Sink:
    def __init__(self):
        self.results: list[WorkerResult] = []
        self.errors: list[tuple[BaseException, WorkerError]] = []
        self.event = threading.Semaphore(0)

    def on_result(self, r: WorkerResult) -> None:
        self.results.append(r)
        self.event.release()

    def on_error(self, exc, info) -> None:
        self.errors.append((exc, info))
        self.event.release()

    def wait(self, n: int = 1) -> None:
        for _ in range(n):
            assert self.event.acquire(timeout=WAIT)


def _worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("test-worker")]


@pytest.fixture
def gate_worker():
    gate, sink = Gate(), Sink()
    w = InferenceWorker(gate, sink.on_result, sink.on_error, name="test-worker")
    w.start()
    yield gate, sink, w
    gate.release.release(100)
    w.stop()
    assert not _worker_threads()


def test_latest_wins_and_drops_are_counted(gate_worker):
    gate, sink, w = gate_worker
    assert w.submit(1) is False
    assert gate.started.acquire(timeout=WAIT)  # 1 is running
    assert w.submit(2) is False
    assert w.submit(3) is True  # replaces 2
    assert w.submit(4) is True  # replaces 3
    gate.release.release()  # finish 1
    assert gate.started.acquire(timeout=WAIT)  # 4 picked up, 2 and 3 never ran
    gate.release.release()
    sink.wait(2)
    assert [r.result for r in sink.results] == [10, 40]
    assert [r.seq for r in sink.results] == [1, 4]
    assert gate.seen == [1, 4]
    stats = w.stats
    assert stats["submitted"] == 4 and stats["dropped"] == 2 and stats["delivered"] == 2
    t = sink.results[1].timing
    assert {"queue", "run", "latency"} <= set(t) and t["latency"] >= t["run"] >= 0


def test_exception_is_reported_and_the_thread_keeps_serving(gate_worker):
    gate, sink, w = gate_worker
    w.submit(ValueError("boom"))
    gate.release.release()
    sink.wait()
    exc, info = sink.errors[0]
    assert isinstance(exc, ValueError) and info.where == "infer" and info.seq == 1
    w.submit(5)
    gate.release.release()
    sink.wait()
    assert sink.results[-1].result == 50
    assert w.stats["errors"] == 1 and "boom" in w.stats["last_error"] and w.running


def test_callback_exception_counted(gate_worker):
    gate, sink, w = gate_worker
    w._on_result = lambda r: (_ for _ in ()).throw(RuntimeError("callback"))
    w.submit(1)
    gate.release.release()
    sink.wait()  # on_error called for the failing callback
    assert sink.errors[0][1].where == "on_result"
    assert w.stats["callback_errors"] == 1 and w.running


def test_discard_pending_drops_in_flight_and_pending_results(gate_worker):
    gate, sink, w = gate_worker
    w.submit(1)
    assert gate.started.acquire(timeout=WAIT)
    w.submit(2)  # pending
    gen = w.discard_pending()
    assert gen == w.generation == 1
    gate.release.release()  # 1 finishes after the discard: never delivered
    w.submit(3)
    assert gate.started.acquire(timeout=WAIT)
    gate.release.release()
    sink.wait()
    assert [r.result for r in sink.results] == [30]
    assert sink.results[0].generation == 1
    assert gate.seen == [1, 3]  # 2 was dropped with the discard
    assert w.stats["discarded"] == 2


def test_stop_restart_no_leaked_threads():
    sink = Sink()
    before = set(threading.enumerate())
    w = InferenceWorker(lambda x: x + 1, sink.on_result, sink.on_error, name="test-worker")
    for round_ in range(3):
        w.start()
        assert len(_worker_threads()) == 1
        w.submit(round_)
        sink.wait()
        w.stop()
        assert not _worker_threads() and not w.running
    w.stop()  # idempotent
    w.restart()
    assert w.running
    w.stop()
    assert set(threading.enumerate()) <= before | set()
    assert [r.result for r in sink.results] == [1, 2, 3]


def test_stop_discards_the_in_flight_result():
    gate, sink = Gate(), Sink()
    w = InferenceWorker(gate, sink.on_result, sink.on_error, name="test-worker")
    w.start()
    w.submit(1)
    assert gate.started.acquire(timeout=WAIT)
    stopper = threading.Thread(target=w.stop)
    stopper.start()
    gate.release.release()
    stopper.join(WAIT)
    assert not stopper.is_alive() and not _worker_threads()
    assert sink.results == [] and w.stats["discarded"] == 1


def test_setup_teardown_and_call_run_on_the_worker_thread():
    seen = {}
    sink = Sink()

    def setup():
        seen["setup"] = threading.current_thread().name

    def teardown():
        seen["teardown"] = threading.current_thread().name

    w = InferenceWorker(lambda x: x, sink.on_result, setup=setup, teardown=teardown,
                        name="test-worker")
    w.start()
    assert w.call(lambda: threading.current_thread().name) == "test-worker"
    with pytest.raises(ZeroDivisionError):
        w.call(lambda: 1 / 0)
    w.stop()
    assert seen == {"setup": "test-worker", "teardown": "test-worker"}


def test_setup_failure_raises_in_start_without_a_thread():
    errors = []

    def setup():
        raise OSError("no GPU")

    w = InferenceWorker(lambda x: x, lambda r: None, lambda e, i: errors.append(i.where),
                        setup=setup, name="test-worker")
    with pytest.raises(RuntimeError, match="setup failed"):
        w.start()
    assert not _worker_threads() and errors == ["setup"]


def test_stop_from_inside_the_callback():
    sink = Sink()
    holder = {}

    def on_result(r):
        holder["w"].stop()
        sink.on_result(r)

    w = InferenceWorker(lambda x: x, on_result, name="test-worker")
    holder["w"] = w
    w.start()
    w.submit(1)
    sink.wait()
    w.stop()  # joins the (now finishing) thread
    assert not _worker_threads()


@pytest.mark.parametrize("pipeline", [False, True], ids=["serial", "pipelined"])
def test_backend_target(pipeline):
    """An engine backend as the target (prepared on the worker thread by setup)."""
    torch.manual_seed(0)
    model = Pi0Model(tiny_config(pi05=True, num_cameras=2)).eval()
    cfg = model.config
    backend = EagerBackend(model, warmup=0)
    sink = Sink()
    w = InferenceWorker(backend, sink.on_result, sink.on_error, pipeline=pipeline,
                        setup=lambda: backend.prepare(EngineSpec(num_cameras=2, num_steps=2,
                                                                 max_batch=1,
                                                                 pipeline=pipeline)),
                        teardown=backend.release, name="test-worker")
    w.start()
    xs = [dummy_inputs(cfg, 1, 2, 5 + i, seed=i) for i in range(3)]
    for x in xs:
        w.submit(x)
        sink.wait()
    w.stop()
    assert not backend.prepared and not _worker_threads() and not sink.errors
    for r, x in zip(sink.results, xs):
        ref = model.sample_actions(x.images, x.image_masks, x.tokens, x.token_mask, x.state,
                                   x.noise, num_steps=2)
        torch.testing.assert_close(r.result.actions, ref, atol=2e-5, rtol=0)
        assert {"queue", "vision", "prefix", "denoise", "total", "latency"} <= set(r.timing)


def test_pipelined_worker_needs_the_two_phase_target():
    with pytest.raises(TypeError, match="pipeline"):
        InferenceWorker(lambda x: x, lambda r: None, pipeline=True)


def test_call_waits_for_the_in_flight_pipelined_item():
    """call() (e.g. a re-prepare) never runs while a pipelined item is in flight."""
    torch.manual_seed(0)
    model = Pi0Model(tiny_config(pi05=True, num_cameras=2)).eval()
    backend = EagerBackend(model, warmup=0)
    sink = Sink()
    spec = EngineSpec(num_cameras=2, num_steps=1, max_batch=1, pipeline=True)
    w = InferenceWorker(backend, sink.on_result, sink.on_error, pipeline=True,
                        setup=lambda: backend.prepare(spec), name="test-worker")
    w.start()
    w.submit(dummy_inputs(model.config, 1, 2, 5))
    assert w.call(lambda: backend._busy.count(True)) == 0
    sink.wait()
    w.call(lambda: backend.prepare(spec))
    w.submit(dummy_inputs(model.config, 1, 2, 6))
    sink.wait()
    w.stop()
    assert len(sink.results) == 2 and not sink.errors
