"""openpi's websocket policy protocol: the msgpack-numpy codec, request fields, reproducible noise.

The wire format (``openpi-client`` 0.1.2, ``openpi_client.msgpack_numpy`` /
``websocket_client_policy``; openpi ``serving/websocket_policy_server.py``):

* one websocket per client, no compression; the server first sends a msgpack map of metadata;
* each request is a binary frame holding a msgpack map (the observation); each answer is a binary
  frame holding a msgpack map (``actions`` (H, D) float32, ``policy_timing``, ``server_timing``);
* a numpy array travels as the map ``{b"__ndarray__": True, b"data": <raw bytes>, b"dtype":
  <numpy dtype str, e.g. "<f4">, b"shape": [..]}``, a numpy scalar as ``{b"__npgeneric__": True,
  b"data": <python value>, b"dtype": <str>}`` (keys are msgpack *bin*, i.e. Python bytes);
* a server-side failure is a *text* frame (the client raises ``RuntimeError`` with its text);
* ``GET /healthz`` on the same port answers ``200 OK``.

Decoding here is strict where openpi's is permissive: dtype kinds other than bool / int / uint /
float are refused (openpi's packer refuses object / void / complex too), the byte count must match
dtype x shape, and every error names the observation field it came from (``BadRequest``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

ND_KEY, GENERIC_KEY = b"__ndarray__", b"__npgeneric__"
ARRAY_KINDS = "biuf"  # bool, int, uint, float: what observations and actions are made of
NOISE_KEY = "noise"  # optional request field: (H, A) float32 initial x_1 of the flow sampler
MAX_DEPTH = 16  # nesting of maps / lists accepted in a request


class BadRequest(ValueError):
    """A request the server refuses; the message names the field, the expected and the found."""


# -- encoding ------------------------------------------------------------------------------------
def _encode_default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind not in ARRAY_KINDS:
        raise TypeError(f"cannot send numpy dtype {obj.dtype} (supported kinds: bool, int, "
                        "uint, float)")
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        return {ND_KEY: True, b"data": arr.tobytes(), b"dtype": arr.dtype.str,
                b"shape": list(arr.shape)}
    if isinstance(obj, np.generic):
        return {GENERIC_KEY: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send a {type(obj).__name__} over the openpi protocol")


def packb(obj: Any) -> bytes:
    """Python / numpy value -> one msgpack frame in openpi's msgpack-numpy convention."""
    return msgpack.packb(obj, default=_encode_default, use_bin_type=True)


# -- decoding ------------------------------------------------------------------------------------
def unpackb(data: bytes | bytearray | memoryview, what: str = "message") -> Any:
    """One msgpack frame -> Python / numpy values (arrays are read-only views of ``data``).

    Raises ``BadRequest`` naming the field for anything malformed (garbage bytes, an array whose
    byte count does not match its dtype and shape, an unsupported dtype, too deep nesting).
    """
    if isinstance(data, str):
        raise BadRequest(f"{what}: expected a binary msgpack frame, found a text frame")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types (ExtraData, FormatError, ValueError)
        raise BadRequest(f"{what}: not a msgpack message ({type(exc).__name__}: {exc})") from None
    return _decode(raw, what, 0)


def _decode(obj: Any, path: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise BadRequest(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(obj, dict):
        if obj.get(ND_KEY) is True:
            return _decode_array(obj, path)
        if obj.get(GENERIC_KEY) is True:
            return _decode_generic(obj, path)
        return {_key(k): _decode(v, _join(path, k), depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(obj)]
    return obj


def _key(k: Any) -> Any:
    # openpi-client packs str keys as msgpack str; tolerate bin keys from other packers.
    if isinstance(k, bytes):
        try:
            return k.decode("utf-8")
        except UnicodeDecodeError:
            return k
    return k


def _join(path: str, key: Any) -> str:
    name = _key(key)
    return name if path in ("request", "message") else f"{path}.{name}"


def _dtype(value: Any, path: str) -> np.dtype:
    try:
        dtype = np.dtype(value if isinstance(value, str) else bytes(value).decode())
    except Exception:
        raise BadRequest(f"{path}: dtype {value!r} is not a numpy dtype string") from None
    if dtype.kind not in ARRAY_KINDS or dtype.hasobject:
        raise BadRequest(f"{path}: dtype {dtype.str} not supported (expected bool, int, uint or "
                         "float)")
    return dtype


def _decode_array(obj: dict, path: str) -> np.ndarray:
    dtype = _dtype(obj.get(b"dtype"), path)
    shape, data = obj.get(b"shape"), obj.get(b"data")
    if (not isinstance(shape, list) or len(shape) > 32
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                       for d in shape)):
        raise BadRequest(f"{path}: array shape must be a list of non-negative ints, "
                         f"found {shape!r}")
    if not isinstance(data, bytes):
        raise BadRequest(f"{path}: array data must be bytes, found {type(data).__name__}")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise BadRequest(f"{path}: {dtype.str} {shape} needs {expected} bytes, found "
                         f"{len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _decode_generic(obj: dict, path: str) -> np.generic:
    dtype = _dtype(obj.get(b"dtype"), path)
    try:
        return dtype.type(obj.get(b"data"))
    except Exception:
        raise BadRequest(f"{path}: scalar {obj.get(b'data')!r} is not a {dtype.str}") from None


# -- request fields ------------------------------------------------------------------------------
def check_observation(obs: Any) -> dict:
    """A decoded request must be a map with string keys (the observation dict)."""
    if not isinstance(obs, Mapping):
        raise BadRequest(f"request: expected a msgpack map of observation fields, found "
                         f"{type(obs).__name__}")
    bad = [k for k in obs if not isinstance(k, str)]
    if bad:
        raise BadRequest(f"request: observation keys must be strings, found {bad[:3]!r}")
    return dict(obs)


def check_noise(value: Any, horizon: int, dim: int) -> np.ndarray:
    """The ``noise`` request field: float32 (H, A) (or (1, H, A)), finite."""
    expected = f"float32 [{horizon}, {dim}]"
    if not isinstance(value, np.ndarray):
        raise BadRequest(f"{NOISE_KEY}: expected {expected}, found {type(value).__name__}")
    arr = value[0] if value.ndim == 3 and value.shape[0] == 1 else value
    if arr.dtype != np.float32 or arr.shape != (horizon, dim):
        raise BadRequest(f"{NOISE_KEY}: expected {expected}, found {value.dtype} "
                         f"{list(value.shape)}")
    if not np.all(np.isfinite(arr)):
        raise BadRequest(f"{NOISE_KEY}: non-finite values")
    return arr


def request_noise(seed: int, index: int, horizon: int, dim: int) -> np.ndarray:
    """The noise ``pi0-ros-serve --seed SEED`` uses for request ``index`` (0-based, counted per
    connection) that brings no ``noise`` field: float32 (H, A) standard normal from numpy's
    ``default_rng([seed, index])``.  Depends only on the connection's own request count, so a
    client sees the same chunks whatever else the server batches with its requests (up to the
    batch's float rounding), and ``Policy.infer(obs, noise=request_noise(...))`` reproduces them.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    return rng.standard_normal((horizon, dim), dtype=np.float32)
