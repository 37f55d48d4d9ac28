"""RemotePolicy: ``Policy``'s ``infer`` surface over openpi's websocket protocol.

Sends each observation to an openpi-protocol server (``pi0-ros-serve``, or openpi's own
``serve_policy``) and returns ``{"actions": float32 (H, D), "policy_timing": {...}}`` like
``pi0_ros.policy.Policy.infer``, so the node can use either.  One connection, one request at a
time (a lock pairs each request with its answer).  A dropped link is reopened on the next call;
failed attempts back off exponentially (``backoff_s`` = (first, max) delay), and while backing off
``infer`` raises ``RemoteUnavailable`` at once instead of blocking the caller.  ``link_status()``
reports the link for diagnostics.  No rclpy here.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import websockets
from websockets.sync.client import ClientConnection, connect

from .protocol import NOISE_KEY, BadRequest, packb, unpackb

log = logging.getLogger(__name__)


class RemoteUnavailable(ConnectionError):
    """The server cannot be reached now (connection refused / lost / timed out, or backing off)."""


class RemoteError(RuntimeError):
    """The server answered with an error (openpi sends it as a text frame) or a bad answer."""


@dataclasses.dataclass(frozen=True)
class RemoteSettings:
    """What the server's metadata says (pi0-ros-serve sends all of it; other servers may send
    none: then the fields are None).  ``image_size`` is always None: images travel as uint8 and
    the server resizes them, so the node sends camera frames as they come."""

    action_horizon: int | None = None
    action_dim: int | None = None
    model_action_dim: int | None = None
    state_dim: int | None = None
    num_steps: int | None = None
    pi05: bool | None = None
    default_prompt: str | None = None
    image_size: None = None

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> RemoteSettings:
        names = [f.name for f in dataclasses.fields(cls) if f.name != "image_size"]
        return cls(**{k: meta.get(k) for k in names})


def _uri(host: str, port: int | None) -> str:
    uri = host if host.startswith(("ws://", "wss://")) else f"ws://{host}"
    return f"{uri}:{port}" if port is not None else uri


class RemotePolicy:
    """``RemotePolicy("ws://gpu-box:8000", api_key=None, ...)``; ``infer(obs, noise=None)``.

    ``timeout_s``: how long to wait for an answer (then the link is dropped: a late answer would
    pair with the next request).  ``connect_timeout_s``: handshake + metadata.  ``backoff_s``:
    (first, max) delay between failed connection attempts, doubling.  ``rename``:
    ``{observation key: key sent}``; None takes it from pi0-ros-serve's metadata (camera slot ->
    the server's camera key, ``state`` / ``prompt`` -> its state / prompt keys), so slot-keyed
    observations (the node's) reach a server with any input keys; ``{}`` sends keys unchanged.
    ``resize_images``: ``prepare_image`` resizes to the server's input size (from its
    metadata) before sending.  ``connect``: open the link now and raise ``RemoteUnavailable``
    if that fails (else on first use).  ``clock``: monotonic seconds (tests).
    """

    def __init__(self, uri: str, *, port: int | None = None, api_key: str | None = None,
                 timeout_s: float = 10.0, connect_timeout_s: float = 5.0,
                 backoff_s: tuple[float, float] = (0.2, 5.0),
                 rename: Mapping[str, str] | None = None, resize_images: bool = True,
                 connect: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError(f"timeout_s / connect_timeout_s must be > 0, got {timeout_s} / "
                             f"{connect_timeout_s}")
        first, most = backoff_s
        if not 0 < first <= most:
            raise ValueError(f"backoff_s must be (first, max) with 0 < first <= max, got "
                             f"{backoff_s}")
        self.uri = _uri(uri, port)
        self.api_key = api_key
        self.timeout_s, self.connect_timeout_s = float(timeout_s), float(connect_timeout_s)
        self.backoff_s = (float(first), float(most))
        self._rename_arg = None if rename is None else dict(rename)
        self.resize_images = bool(resize_images)
        self._clock = clock
        self._lock = threading.Lock()
        self._ws: ClientConnection | None = None
        self._closed = False
        self.metadata: dict[str, Any] = {}
        self.settings = RemoteSettings()
        self._rename: dict[str, str] = dict(rename or {})
        self._delay = self.backoff_s[0]
        self._next_attempt = 0.0
        self._n = {"connects": 0, "disconnects": 0, "failures": 0, "requests": 0, "errors": 0}
        self._last_error = ""
        self._last_rtt_ms: float | None = None
        if connect:
            with self._lock:
                self._ensure_connected()

    # -- Policy surface ---------------------------------------------------------------------------
    @property
    def camera_slots(self) -> tuple[str, ...]:
        """The server model's camera slots (from pi0-ros-serve's metadata; () if unknown)."""
        return tuple(self.metadata.get("camera_slots") or ())

    @property
    def model_name(self) -> str:
        return str(self.metadata.get("model") or "")

    @property
    def noise_shape(self) -> tuple[int, int] | None:
        """(H, A) of the initial noise when the server takes a ``noise`` field (pi0-ros-serve's
        metadata says so); None for other servers (they draw their own noise)."""
        meta = self.metadata
        if meta.get("noise_key") != NOISE_KEY:
            return None
        return (int(meta["action_horizon"]), int(meta["model_action_dim"]))

    def prepare_image(self, rgb: np.ndarray, name: str = "image") -> np.ndarray:
        """A camera image as it is sent: resized with pad to the server model's input size when
        the metadata gives it (uint8 (S, S, 3): fewer bytes on the wire, and the server's own
        resize of an S x S image is the identity, so the values equal local preprocessing),
        else the uint8 image unchanged (the server resizes)."""
        from ..processing import check_image, resize_with_pad

        image = check_image(name, rgb)
        size = self.metadata.get("image_size") if self.resize_images else None
        return resize_with_pad(image, int(size), int(size)) if size else image

    def infer(self, obs: Mapping[str, Any], noise: Any = None) -> dict[str, Any]:
        """One observation -> ``{"actions": float32 (H, D), "policy_timing": {...}}``.

        ``noise``: optional (H, A) float32 initial noise, sent as the ``noise`` field (honoured
        by pi0-ros-serve).  Timing (ms): ``infer_ms`` (this whole call), ``round_trip_ms`` (send
        -> answer), the server's ``policy_timing`` as ``server_*`` and its ``server_timing`` as
        ``server_wall_*`` (pi0-ros-serve: ``server_wall_queue_ms``, ``server_wall_batch_size``).
        Raises ``RemoteUnavailable`` (link down / backing off / timed out) or ``RemoteError``
        (the server's error text, or an answer without float32 (H, D) ``actions``).
        """
        t0 = time.perf_counter()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"RemotePolicy({self.uri}) is closed")
            ws = self._ensure_connected()
            payload = packb(self._request(obs, noise))
            t1 = time.perf_counter()
            try:
                ws.send(payload)
                reply = ws.recv(timeout=self.timeout_s)
            except TimeoutError:
                self._drop(f"no answer within {self.timeout_s} s")
                raise RemoteUnavailable(f"{self.uri}: no answer within {self.timeout_s} s; "
                                        "link dropped") from None
            except (websockets.ConnectionClosed, OSError) as exc:
                self._drop(f"{type(exc).__name__}: {exc}")
                raise RemoteUnavailable(f"{self.uri}: connection lost ({exc})") from None
            t2 = time.perf_counter()
            self._n["requests"] += 1
            self._last_rtt_ms = (t2 - t1) * 1e3
        if isinstance(reply, str):
            self._n["errors"] += 1
            raise RemoteError(f"server {self.uri} refused the request:\n{reply}")
        try:
            result = unpackb(reply, "response")
        except BadRequest as exc:
            self._n["errors"] += 1
            raise RemoteError(f"server {self.uri}: {exc}") from None
        actions = _check_actions(result)
        timing = {"infer_ms": (time.perf_counter() - t0) * 1e3, "round_trip_ms": (t2 - t1) * 1e3,
                  "pack_ms": (t1 - t0) * 1e3}
        for group, prefix in (("policy_timing", "server_"), ("server_timing", "server_wall_")):
            values = result.get(group)
            if isinstance(values, Mapping):
                timing.update({prefix + str(k): float(v) for k, v in values.items()
                               if isinstance(v, (int, float, np.number))})
        return {"actions": actions, "policy_timing": timing}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ws, self._ws = self._ws, None
        if ws is not None:
            ws.close()

    def __enter__(self) -> RemotePolicy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def link_status(self) -> dict[str, Any]:
        """For /diagnostics: ``state`` (connected / backoff / closed), ``uri``, counters,
        ``last_error``, ``last_round_trip_ms``, ``retry_in_s``, ``server``."""
        now = self._clock()
        if self._closed:
            state = "closed"
        elif self._ws is not None:
            state = "connected"
        else:
            state = "backoff" if now < self._next_attempt else "disconnected"
        return {"state": state, "connected": state == "connected", "uri": self.uri, **self._n,
                "last_error": self._last_error, "last_round_trip_ms": self._last_rtt_ms,
                "retry_in_s": max(self._next_attempt - now, 0.0) if state == "backoff" else 0.0,
                "server": str(self.metadata.get("server", "")), "model": self.model_name}

    rtc = None  # real-time chunking needs the model's backward: not over the protocol

    @property
    def state_dim(self) -> int | None:
        return self.settings.state_dim

    def prompt_fit(self, prompt: str, state: np.ndarray) -> None:
        """Unknown here: the server's tokenizer checks (and refuses) a prompt it would cut."""
        return None

    def status(self) -> dict[str, Any]:
        """``pi0_ros.pipeline.PolicyLike.status``: the link, for the node's /diagnostics."""
        return self.link_status()

    # -- internals (under the lock) ---------------------------------------------------------------
    def _ensure_connected(self) -> ClientConnection:
        if self._ws is not None:
            return self._ws
        now = self._clock()
        if now < self._next_attempt:
            raise RemoteUnavailable(f"{self.uri}: link down ({self._last_error}); next attempt "
                                    f"in {self._next_attempt - now:.1f} s")
        headers = {"Authorization": f"Api-Key {self.api_key}"} if self.api_key else None
        try:
            ws = connect(self.uri, compression=None, max_size=None, additional_headers=headers,
                         open_timeout=self.connect_timeout_s)
            ws.__enter__()  # owned until close() (websockets >= 17.1 warns about a bare connect)
            try:
                first = ws.recv(timeout=self.connect_timeout_s)
                meta = unpackb(first, "metadata") if not isinstance(first, str) else first
                if not isinstance(meta, Mapping):
                    raise RemoteError(f"expected a metadata map, found {str(meta)[:200]!r}")
            except BaseException:
                ws.close()
                raise
        except Exception as exc:
            self._n["failures"] += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            self._next_attempt = self._clock() + self._delay
            log.warning("%s: cannot connect (%s); next attempt in %.1f s", self.uri,
                        self._last_error, self._delay)
            self._delay = min(self._delay * 2, self.backoff_s[1])
            raise RemoteUnavailable(f"{self.uri}: cannot connect ({self._last_error})") from exc
        self._ws = ws
        self._n["connects"] += 1
        self._delay = self.backoff_s[0]
        self.metadata = dict(meta)
        self.settings = RemoteSettings.from_metadata(self.metadata)
        self._rename = self._rename_arg if self._rename_arg is not None else _auto_rename(meta)
        log.info("%s: connected (server %s, model %s)", self.uri, meta.get("server", "?"),
                 meta.get("model", "?"))
        return ws

    def _drop(self, reason: str) -> None:
        ws, self._ws = self._ws, None
        self._n["disconnects"] += 1
        self._last_error = reason
        self._next_attempt = self._clock()  # the first reconnection is not delayed
        if ws is not None:
            try:
                ws.close()
            except Exception:  # already broken
                pass
        log.warning("%s: link dropped (%s)", self.uri, reason)

    def _request(self, obs: Mapping[str, Any], noise: Any) -> dict[str, Any]:
        if not isinstance(obs, Mapping):
            raise TypeError(f"observation must be a dict, found {type(obs).__name__}")
        out: dict[str, Any] = {}
        for key, value in obs.items():
            if hasattr(value, "data") and type(value).__name__ == "PreparedImage":
                raise TypeError(f"{key!r}: a PreparedImage cannot be sent; send the uint8 "
                                "image (the server resizes)")
            out[self._rename.get(key, key)] = value
        if noise is not None:
            arr = np.asarray(noise, dtype=np.float32)
            out[NOISE_KEY] = arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr
        return out


def _auto_rename(meta: Mapping[str, Any]) -> dict[str, str]:
    """pi0-ros-serve's metadata -> {slot: camera key, "state": state key, "prompt": key}."""
    keys = meta.get("input_keys")
    if not isinstance(keys, Mapping):
        return {}
    rename = {slot: key for key, slot in dict(keys.get("cameras") or {}).items()}
    for name in ("state", "prompt"):
        if isinstance(keys.get(name), str):
            rename[name] = keys[name]
    return {k: v for k, v in rename.items() if k != v}


def _check_actions(result: Any) -> np.ndarray:
    if not isinstance(result, Mapping) or "actions" not in result:
        found = sorted(map(str, result)) if isinstance(result, Mapping) else type(result)
        raise RemoteError(f"answer: expected a map with 'actions', found {found}")
    actions = result["actions"]
    if (not isinstance(actions, np.ndarray) or actions.ndim != 2
            or actions.dtype.kind != "f"):
        found = (f"{actions.dtype} {list(actions.shape)}" if isinstance(actions, np.ndarray)
                 else type(actions).__name__)
        raise RemoteError(f"answer: 'actions' expected float (H, D), found {found}")
    return np.array(actions, dtype=np.float32)  # a writable copy (the frame's bytes are not)
