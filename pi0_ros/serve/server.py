"""An openpi-protocol websocket server on ``pi0_ros.policy.Policy``, with batching.

Threads::

    asyncio loop (websockets)   one handler per connection: recv -> decode + preprocess (pool)
                                -> queue -> await result -> send; requests of one connection are
                                handled one after the other, so answers keep their order
    decode pool                 msgpack decode, field checks, Policy.preprocess (no device work)
    inference thread            the engine's InferenceWorker: builds the Policy, prepares the
                                engine for max_batch, warms up, then runs one batch at a time

The loop hands the worker a batch only when it is idle (so the worker's latest-only slot never
drops anything): every request queued while a batch runs joins the next one, up to ``max_batch``
rows.  Engine backends pad a batch to their prepared batch size and slice the rows back
(``StaticBackend``); the eager path runs the rows as they are.  Results are split back per
request.  A malformed request gets a text frame naming the field and the connection stays open;
a frame over ``max_message_bytes`` closes that connection (1009); nothing a client sends stops the
server.  SIGINT / SIGTERM close the connections (1001), let the running batch finish, stop the
worker and return.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hmac
import http
import itertools
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import websockets
from websockets.asyncio.server import Request, Response, ServerConnection, serve

from ..engine.worker import InferenceWorker
from .protocol import (NOISE_KEY, BadRequest, check_noise, check_observation, packb,
                       request_noise, unpackb)

log = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"
DEFAULT_PORT = 8000  # openpi serve_policy's port
DEFAULT_MAX_MESSAGE = 64 * 2**20  # bytes; three 1080p RGB frames are ~19 MB
ERROR_PREFIX = "pi0-ros-serve"


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Server settings.  ``host`` 127.0.0.1: only this machine can connect (0.0.0.0 or an
    address to serve a network; then set ``api_key``).  ``seed``: requests without a ``noise``
    field get ``protocol.request_noise(seed, n)`` for the n-th request of their connection
    (None: fresh random noise, openpi's behaviour).  ``api_key``: required in the handshake's
    ``Authorization: Api-Key <key>`` header (what openpi-client sends).  ``warmup``: inferences
    on synthetic inputs at max batch, then at batch 1, before the port opens (the first one
    prepares the engine for max_batch rows on the inference thread)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_batch: int = 4
    seed: int | None = None
    api_key: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE
    decode_threads: int = 2
    warmup: int = 1
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_message_bytes", "decode_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ServeConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"ServeConfig.port must be in 0..65535, got {self.port!r}")
        if not isinstance(self.warmup, int) or self.warmup < 1:
            raise ValueError(f"ServeConfig.warmup must be an int >= 1 (the first max-batch pass "
                             f"prepares the engine), got {self.warmup!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("ServeConfig.api_key must be non-empty when given")


@dataclasses.dataclass(eq=False)
class _Request:
    inputs: dict[str, torch.Tensor]  # Policy.preprocess output, batch dim 1
    noise: np.ndarray | None  # (H, A) float32
    future: asyncio.Future
    t_received: float
    preprocess_ms: float
    t_queued: float = 0.0
    t_dispatched: float = 0.0


class PolicyServer:
    """Serves ``policy_factory()`` (a ``pi0_ros.policy.Policy``, built on the inference thread)
    over openpi's websocket protocol.  ``serve_forever()`` blocks until SIGINT / SIGTERM;
    ``start()`` / ``stop()`` run it on a background thread (tests, benchmarks)."""

    def __init__(self, policy_factory: Callable[[], Any], config: ServeConfig | None = None):
        self.config = config or ServeConfig()
        self._factory = policy_factory
        self.policy: Any = None
        self.port: int | None = None
        self.metadata: dict[str, Any] = {}
        self._worker: InferenceWorker | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._queue: collections.deque[_Request] = collections.deque()
        self._busy = False
        self._conn_ids = itertools.count(1)
        self._counts = collections.Counter()
        self._batch_sizes: collections.Counter = collections.Counter()

    # -- lifecycle --------------------------------------------------------------------------------
    def serve_forever(self, on_ready: Callable[[PolicyServer], Any] | None = None) -> None:
        """Load, warm up, listen; return after SIGINT / SIGTERM (clean shutdown)."""
        self._load()
        try:
            asyncio.run(self._main(on_ready, install_signals=True))
        finally:
            self._unload()

    def start(self, timeout: float = 300.0) -> PolicyServer:
        """Load and serve on a background thread; returns once the port is open."""
        self._load()
        ready, failure = threading.Event(), []

        def run() -> None:
            try:
                asyncio.run(self._main(lambda _: ready.set(), install_signals=False))
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
                ready.set()

        self._thread = threading.Thread(target=run, name="pi0-serve-loop", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or failure:
            self.stop()
            raise RuntimeError(f"server did not start: {failure[0] if failure else 'timeout'}")
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Close every connection, finish the running batch, stop the inference thread."""
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass  # the loop just ended
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            self._thread = None
        self._unload()

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host = self.config.host if self.config.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"ws://{host}:{self.port}"

    @property
    def stats(self) -> dict[str, Any]:
        """Counters: connections, requests, responses, bad_requests, errors, batches, queued,
        batch_sizes ({rows: count})."""
        out: dict[str, Any] = {k: self._counts.get(k, 0) for k in
                               ("connections", "requests", "responses", "bad_requests",
                                "errors", "batches", "disconnects")}
        out["queued"] = len(self._queue)
        out["batch_sizes"] = dict(sorted(self._batch_sizes.items()))
        return out

    def _load(self) -> None:
        if self._worker is not None:
            raise RuntimeError("server already started")
        self._pool = concurrent.futures.ThreadPoolExecutor(self.config.decode_threads,
                                                           thread_name_prefix="pi0-serve-decode")
        self._worker = InferenceWorker(self._run_batch, self._on_result, self._on_error,
                                       setup=self._setup, teardown=self._teardown,
                                       name="pi0-serve-inference")
        try:
            self._worker.start()
        except BaseException:
            self._worker = None
            self._pool.shutdown(wait=False)
            raise
        self.metadata = self._metadata()

    def _unload(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # -- the inference thread ---------------------------------------------------------------------
    def _setup(self) -> None:
        """Worker thread: build the policy, warm up; the first call, at max batch, prepares the
        engine for max_batch rows on this thread (graph backends refuse larger batches later)."""
        self.policy = self._factory()
        entry = self._prepare(packb(self._warmup_observation()), 0, time.perf_counter())
        for rows in sorted({1, self.config.max_batch}, reverse=True):
            for _ in range(self.config.warmup):
                self._run_batch([entry] * rows)

    def _teardown(self) -> None:
        policy, self.policy = self.policy, None
        if policy is not None:
            policy.close()

    def _warmup_observation(self) -> dict[str, Any]:
        policy, s = self.policy, self.policy.settings
        keys = policy.input_keys
        obs: dict[str, Any] = {key: np.zeros((s.image_size, s.image_size, 3), np.uint8)
                               for key in policy.cameras.sources}
        obs[keys.state] = np.zeros(s.state_dim or s.model_action_dim, np.float32)
        obs[keys.prompt] = s.default_prompt or "warm up"
        return obs

    def _run_batch(self, requests: list[_Request]) -> tuple[np.ndarray, dict[str, float]]:
        """Worker thread: rows -> one model call -> robot actions (B, H, D) float32."""
        policy = self.policy
        t0 = time.perf_counter()
        rows = {k: torch.cat([r.inputs[k] for r in requests]) for k in requests[0].inputs}
        noise = None
        if any(r.noise is not None for r in requests):
            shape = policy.noise_shape
            noise = torch.from_numpy(np.stack([
                r.noise if r.noise is not None
                else np.random.default_rng().standard_normal(shape, dtype=np.float32)
                for r in requests]))
        t1 = time.perf_counter()
        # Policy.infer = preprocess -> run_model -> postprocess: a batch of one here runs
        # exactly what Policy.infer runs (engine backends pad larger batches and slice back).
        actions = policy.run_model(rows, noise)  # (B, H, A) normalized, host
        t2 = time.perf_counter()
        out = policy.postprocess(actions)  # (B, H, D) float32
        t3 = time.perf_counter()
        timing = {"batch_ms": (t1 - t0) * 1e3, "model_ms": (t2 - t1) * 1e3,
                  "postprocess_ms": (t3 - t2) * 1e3}
        return out, timing

    def _on_result(self, delivered: Any) -> None:
        """Worker thread: hand the rows back to the loop."""
        self._to_loop(self._complete, delivered.item, *delivered.result)

    def _on_error(self, exc: BaseException, info: Any) -> None:
        if getattr(info, "where", "") == "infer" and isinstance(info.item, list):
            self._to_loop(self._fail, info.item, exc)

    def _to_loop(self, fn: Callable, *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    # -- the loop side ----------------------------------------------------------------------------
    async def _main(self, on_ready: Callable | None, install_signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = stop = asyncio.Event()
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, stop.set)
        cfg = self.config
        async with serve(self._handler, cfg.host, cfg.port, compression=None,
                         max_size=cfg.max_message_bytes, process_request=self._process_request,
                         logger=logging.getLogger(f"{__name__}.websockets")) as server:
            self.port = server.sockets[0].getsockname()[1]
            log.info("pi0-ros-serve listening on %s (max batch %d, health %s%s)", self.url,
                     cfg.max_batch, self.url.replace("ws://", "http://"), HEALTH_PATH)
            if on_ready is not None:
                on_ready(self)
            await stop.wait()
            log.info("shutting down: closing %d connection(s)", len(server.connections))
            self._fail_queued("server is shutting down")
            server.close(close_connections=True)
            await server.wait_closed()
        self._loop = None

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """HTTP before the websocket upgrade: health check, then the API key."""
        if request.path == HEALTH_PATH:
            worker = self._worker
            if worker is not None and worker.running:
                return connection.respond(http.HTTPStatus.OK, "OK\n")
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "not serving\n")
        key = self.config.api_key
        if key is not None:
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Api-Key {key}".encode()):
                log.warning("refused %s: missing or wrong API key", connection.remote_address)
                return connection.respond(http.HTTPStatus.UNAUTHORIZED,
                                          "missing or wrong API key (Authorization: Api-Key)\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        conn = next(self._conn_ids)
        self._counts["connections"] += 1
        log.info("connection %d from %s", conn, ws.remote_address)
        loop = asyncio.get_running_loop()
        index = 0  # accepted requests of this connection (the noise index with --seed)
        try:
            await ws.send(packb(self.metadata))
            async for message in ws:
                t0 = time.perf_counter()
                self._counts["requests"] += 1
                try:
                    request = await loop.run_in_executor(self._pool, self._prepare, message,
                                                         index, t0)
                except (BadRequest, ValueError, TypeError, KeyError) as exc:
                    self._counts["bad_requests"] += 1
                    await ws.send(f"{ERROR_PREFIX}: bad request: {_message(exc)}")
                    continue
                except Exception as exc:  # a bug: report it, keep serving
                    self._counts["errors"] += 1
                    log.exception("connection %d: request failed", conn)
                    await ws.send(f"{ERROR_PREFIX}: internal error: {type(exc).__name__}: {exc}")
                    continue
                index += 1
                request.future = loop.create_future()
                request.t_queued = time.perf_counter()
                self._queue.append(request)
                self._dispatch()
                try:
                    actions, timing = await request.future
                except Exception as exc:
                    self._counts["errors"] += 1
                    await ws.send(f"{ERROR_PREFIX}: inference failed: {type(exc).__name__}: "
                                  f"{exc}")
                    continue
                timing["server_ms"] = (time.perf_counter() - t0) * 1e3
                await ws.send(packb(_response(actions, timing)))
                self._counts["responses"] += 1
        except websockets.ConnectionClosed as exc:
            self._counts["disconnects"] += 1
            log.info("connection %d closed: %s", conn, exc)
        finally:
            log.info("connection %d done after %d request(s)", conn, index)

    def _prepare(self, message: Any, index: int, t0: float) -> _Request:
        """Decode pool: frame -> checked observation -> model inputs (+ noise)."""
        obs = check_observation(unpackb(message, "request"))
        horizon, dim = self.policy.noise_shape
        noise = obs.pop(NOISE_KEY, None)
        if noise is not None:
            noise = check_noise(noise, horizon, dim)
        elif self.config.seed is not None:
            noise = request_noise(self.config.seed, index, horizon, dim)
        inputs = self.policy.preprocess(obs)
        return _Request(inputs, noise, None, t0, (time.perf_counter() - t0) * 1e3)

    def _dispatch(self) -> None:
        """Loop thread: when the inference thread is idle, hand it the next batch."""
        if self._busy or not self._queue or self._worker is None:
            return
        batch = []
        while self._queue and len(batch) < self.config.max_batch:
            request = self._queue.popleft()
            if not request.future.done():
                request.t_dispatched = time.perf_counter()
                batch.append(request)
        if not batch:
            return
        self._busy = True
        self._counts["batches"] += 1
        self._batch_sizes[len(batch)] += 1
        if self._worker.submit(batch):  # cannot happen: only submitted when idle
            log.error("a pending batch was replaced in the worker slot")

    def _complete(self, batch: list[_Request], actions: np.ndarray,
                  timing: dict[str, float]) -> None:
        for row, request in enumerate(batch):
            if request.future.done():
                continue
            request.future.set_result((actions[row], {
                **timing, "preprocess_ms": request.preprocess_ms,
                "queue_ms": (request.t_dispatched - request.t_queued) * 1e3,
                "batch_size": len(batch)}))
        self._busy = False
        self._dispatch()

    def _fail(self, batch: list[_Request], exc: BaseException) -> None:
        for request in batch:
            if not request.future.done():
                request.future.set_exception(exc)
        self._busy = False
        self._dispatch()

    def _fail_queued(self, reason: str) -> None:
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                request.future.set_exception(RuntimeError(reason))

    # -- metadata ---------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        """Sent on connect: what a client needs to build requests and read answers."""
        policy, cfg = self.policy, self.config
        s = policy.settings
        keys = policy.input_keys
        meta = {
            "server": "pi0_ros",
            "model": policy.model_name,
            "pi05": bool(s.pi05),
            "action_horizon": s.action_horizon,
            "action_dim": s.action_dim,
            "model_action_dim": s.model_action_dim,
            "state_dim": s.state_dim,
            "image_size": s.image_size,
            "num_steps": s.num_steps,
            "camera_slots": list(policy.camera_slots),
            "input_keys": {"cameras": dict(policy.cameras.sources), "state": keys.state,
                           "prompt": keys.prompt},
            "default_prompt": s.default_prompt,
            "noise_key": NOISE_KEY,
            "seed": cfg.seed,
            "max_batch": cfg.max_batch,
        }
        meta.update(cfg.metadata)
        return meta


def _response(actions: np.ndarray, timing: dict[str, float]) -> dict[str, Any]:
    """openpi's answer: actions (H, D) float32 + timing maps (no other arrays: openpi-client's
    ActionChunkBroker slices every array along its first axis)."""
    policy_timing = {
        "infer_ms": timing["preprocess_ms"] + timing["batch_ms"] + timing["model_ms"]
        + timing["postprocess_ms"],
        "preprocess_ms": timing["preprocess_ms"],
        "model_ms": timing["model_ms"],
        "postprocess_ms": timing["postprocess_ms"],
    }
    server_timing = {"infer_ms": timing["server_ms"], "queue_ms": timing["queue_ms"],
                     "batch_size": int(timing["batch_size"])}
    return {"actions": np.ascontiguousarray(actions, dtype=np.float32),
            "policy_timing": policy_timing, "server_timing": server_timing}


def _message(exc: BaseException) -> str:
    # KeyError's str() adds quotes around the message; the others read as written.
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
