"""pi0-ros-serve and RemotePolicy: openpi's websocket protocol on the tiny pi0.5 checkpoint.

* protocol: the msgpack-numpy codec and its refusals (no server);
* an in-process server (API key, --seed): actions equal ``Policy.infer`` on the same observation
  and noise, bad input of every kind answered without stopping the server, concurrent clients
  batched with per-client order, the health check, the API key, a load run;
* RemotePolicy: back-off and reconnection, link status;
* the ``pi0-ros-serve`` console script with PyPI ``openpi-client`` 0.1.2 (its own virtual
  environment, numpy < 2): ``WebsocketClientPolicy`` + ``ActionChunkBroker`` get exactly
  ``Policy.infer``'s actions; SIGTERM stops the server cleanly.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import torch
import pytest
import websockets
from websockets.sync.client import connect

from pi0_ros.policy import Policy
from pi0_ros.serve import (BadRequest, PolicyServer, RemotePolicy, RemoteUnavailable,
                           ServeConfig, packb, request_noise, unpackb)
from pi0_ros.serve.remote import RemoteError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
PRE = FIXTURES / "openpi_preprocess"
TINY = FIXTURES / "openpi_tiny_pi05"
API_KEY = "test-key"
SEED = 11
BATCH_ATOL = 1e-4  # a row computed in a batch of several vs alone (float32 reduction order)
WAIT_S = 120.0  # bound on every wait for the server (generous: 2 shared CPU cores)
CLIENT_VENV = ROOT / "build" / "serve_test" / "openpi_client_venv"
OPENPI_CLIENT = "openpi-client==0.1.2"


def _policy(**kw) -> Policy:
    return Policy.from_checkpoint(TINY, tokenizer=PRE / "tokenizer.model",
                                  norm_stats=PRE / "norm_stats.json", **kw)


def _obs(i: int) -> dict:
    """A LIBERO-keyed observation (openpi's client keys), different for each i."""
    rng = np.random.default_rng(100 + i)
    return {
        "observation/image": rng.integers(0, 256, (120, 160, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (98, 98, 3), dtype=np.uint8),
        "observation/state": rng.uniform(-1, 1, 8).astype(np.float32),
        "prompt": f"put object {i} in the basket",
    }


@pytest.fixture(scope="module")
def local():
    """The reference: Policy.infer in this process."""
    pol = _policy()
    yield pol
    pol.close()


@pytest.fixture(scope="module")
def server():
    srv = PolicyServer(lambda: _policy(max_batch=4),
                       ServeConfig(port=0, max_batch=4, seed=SEED, api_key=API_KEY))
    srv.start(timeout=WAIT_S)
    yield srv
    srv.stop()


def _expected(local: Policy, i: int, index: int) -> np.ndarray:
    return local.infer(_obs(i), noise=request_noise(SEED, index, *local.noise_shape))["actions"]


def _connect(srv: PolicyServer, **kw):
    ws = connect(srv.url, compression=None, max_size=None,
                 additional_headers={"Authorization": f"Api-Key {API_KEY}"}, **kw).__enter__()
    meta = unpackb(ws.recv(timeout=WAIT_S))
    return ws, meta


def _ask(ws, payload) -> object:
    ws.send(payload)
    reply = ws.recv(timeout=WAIT_S)
    return reply if isinstance(reply, str) else unpackb(reply)


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# ---------------------------------------------------------------------------------- protocol


def test_codec_round_trip_in_openpi_convention():
    obs = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.uint8(7), "s": "text",
           "nested": {"m": np.zeros((0, 4), np.int64)}, "flag": np.array(True)}
    frame = packb(obs)
    raw = msgpack.unpackb(frame, raw=False)  # openpi's layout: bin keys, dtype str, shape list
    assert raw["a"] == {b"__ndarray__": True, b"data": obs["a"].tobytes(), b"dtype": "<f4",
                        b"shape": [2, 3]}
    assert raw["b"] == {b"__npgeneric__": True, b"data": 7, b"dtype": "|u1"}
    back = unpackb(frame)
    np.testing.assert_array_equal(back["a"], obs["a"])
    assert back["a"].dtype == np.float32 and back["b"] == np.uint8(7)
    assert back["nested"]["m"].shape == (0, 4) and back["flag"].dtype == bool
    with pytest.raises(TypeError, match="complex"):
        packb({"x": np.zeros(2, np.complex64)})


@pytest.mark.parametrize("payload, match", [
    (b"\xc1\xff garbage", "not a msgpack message"),
    (msgpack.packb({"s": {b"__ndarray__": True, b"data": b"abc", b"dtype": "<f4",
                          b"shape": [8]}}), r"s: <f4 \[8\] needs 32 bytes, found 3"),
    (msgpack.packb({"s": {b"__ndarray__": True, b"data": b"", b"dtype": "|O",
                          b"shape": [0]}}), "s: dtype |O not supported"),
    (msgpack.packb({"s": {b"__ndarray__": True, b"data": b"", b"dtype": "nope",
                          b"shape": [0]}}), "s: dtype 'nope' is not a numpy dtype"),
    (msgpack.packb({"s": {b"__ndarray__": True, b"data": b"", b"dtype": "<f4",
                          b"shape": [-1]}}), "s: array shape must be a list of non-negative"),
    ("a text frame", "expected a binary msgpack frame"),
])
def test_codec_refuses_malformed_frames_naming_the_field(payload, match):
    with pytest.raises(BadRequest, match=match):
        unpackb(payload, "request")


def test_request_noise_is_a_function_of_seed_and_index():
    a = request_noise(3, 0, 50, 32)
    assert a.dtype == np.float32 and a.shape == (50, 32)
    np.testing.assert_array_equal(a, request_noise(3, 0, 50, 32))
    assert not np.array_equal(a, request_noise(3, 1, 50, 32))
    assert not np.array_equal(a, request_noise(4, 0, 50, 32))


def test_serve_config_validation():
    with pytest.raises(ValueError, match="max_batch must be a positive int, got 0"):
        ServeConfig(max_batch=0)
    with pytest.raises(ValueError, match="port must be in 0..65535"):
        ServeConfig(port=70000)
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        ServeConfig(warmup=0)
    assert ServeConfig().host == "127.0.0.1"  # localhost unless asked otherwise


# ---------------------------------------------------------------------------------- server


def test_metadata_and_exact_actions(server, local):
    ws, meta = _connect(server)
    with ws:
        assert meta["server"] == "pi0_ros" and meta["action_horizon"] == 50
        assert (meta["action_dim"], meta["model_action_dim"]) == (7, 32)
        assert meta["input_keys"]["state"] == "observation/state"
        assert meta["camera_slots"] == ["base_0_rgb", "left_wrist_0_rgb"]
        for index in range(2):  # request n of the connection uses request_noise(SEED, n)
            out = _ask(ws, packb(_obs(0)))
            assert set(out) == {"actions", "policy_timing", "server_timing"}
            assert out["actions"].dtype == np.float32 and out["actions"].shape == (50, 7)
            np.testing.assert_array_equal(out["actions"], _expected(local, 0, index))
        # A request's own noise field wins over the seed.
        noise = np.random.default_rng(5).standard_normal((50, 32)).astype(np.float32)
        out = _ask(ws, packb({**_obs(1), "noise": noise}))
        np.testing.assert_array_equal(out["actions"],
                                      local.infer(_obs(1), noise=noise)["actions"])


def test_bad_input_is_answered_and_never_stops_the_server(server, local):
    obs = _obs(2)
    bad = [
        ({k: v for k, v in obs.items() if k != "observation/state"},
         "state 'observation/state': missing"),
        (_raw({**obs, "observation/state": obs["observation/state"].astype(np.complex64)}),
         "observation/state: dtype <c8 not supported"),
        (_raw({**obs, "observation/state": np.array(["a", "b"])}),
         "observation/state: dtype <U1 not supported"),
        ({**obs, "observation/state": np.zeros(5, np.float32)},
         "state 'observation/state': expected 8 values, found 5"),
        ({**obs, "observation/image": np.zeros((4, 4, 3), np.float32)},
         r"image 'observation/image': expected uint8 \[H, W, 3\]"),
        ({**obs, "observation/image": np.zeros((4, 4), np.uint8)},
         r"image 'observation/image': expected uint8 \[H, W, 3\].*found uint8 \[4, 4\]"),
        ({**obs, "prompt": 3}, "prompt 'prompt': expected a string"),
        ({**obs, "noise": np.zeros((50, 7), np.float32)},
         r"noise: expected float32 \[50, 32\], found float32 \[50, 7\]"),
        ([1, 2, 3], "request: expected a msgpack map of observation fields, found list"),
    ]
    ws, _ = _connect(server)
    with ws:
        for payload, match in bad:
            reply = _ask(ws, payload if isinstance(payload, bytes) else packb(payload))
            assert isinstance(reply, str) and re.search(match, reply), (match, reply)
            assert reply.startswith("pi0-ros-serve: bad request: ")
        for junk in (b"\x00\x01garbage\xff", "text, not msgpack"):
            reply = _ask(ws, junk)
            assert isinstance(reply, str) and "bad request" in reply
        # Same connection, a good request: answered, with the first index of the connection
        # (refused requests do not advance the noise index).
        out = _ask(ws, packb(obs))
        np.testing.assert_array_equal(out["actions"], _expected(local, 2, 0))

    # A frame over max_message_bytes (64 MiB) closes that connection only (1009).
    ws, _ = _connect(server)
    with ws:
        ws.send(b"\x00" * (100 * 2**20))
        with pytest.raises(websockets.ConnectionClosed) as info:
            ws.recv(timeout=WAIT_S)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009

    # A client that disconnects while its request is being served.
    before = server.stats["responses"]
    ws, _ = _connect(server)
    ws.send(packb(obs))
    ws.close()
    # The server still serves a new client, correctly.
    ws, _ = _connect(server)
    with ws:
        out = _ask(ws, packb(obs))
        np.testing.assert_array_equal(out["actions"], _expected(local, 2, 0))
    assert server.stats["responses"] >= before + 1
    assert _health(server) == (200, "OK\n")


def _raw(obs: dict) -> bytes:
    """Pack like openpi's packer would without its dtype check (any dtype goes on the wire)."""
    def default(a):
        return {b"__ndarray__": True, b"data": a.tobytes(), b"dtype": a.dtype.str,
                b"shape": list(a.shape)}
    return msgpack.packb(obs, default=default)


def _health(srv: PolicyServer) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=WAIT_S)
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_health_check_and_api_key(server):
    assert _health(server) == (200, "OK\n")  # no key needed for the health check
    for headers in (None, {"Authorization": "Api-Key wrong"}, {"Authorization": API_KEY}):
        with pytest.raises(websockets.InvalidStatus) as info:
            connect(server.url, additional_headers=headers, open_timeout=WAIT_S)
        assert info.value.response.status_code == 401
    ws, meta = _connect(server)
    ws.close()
    assert meta["server"] == "pi0_ros"


def test_concurrent_clients_are_batched_in_order(server, local):
    """Client 0's request holds the inference thread; clients 1-3 queue behind it and run as
    one batch of 3; every client gets its own rows, in its own order."""
    gate, entered = threading.Event(), threading.Event()
    policy = server.policy
    real = policy.run_model

    def held(batch, noise):
        if not entered.is_set():
            entered.set()
            assert gate.wait(WAIT_S)
        return real(batch, noise)

    policy.run_model = held
    remotes = [RemotePolicy(server.url, api_key=API_KEY, timeout_s=WAIT_S) for _ in range(4)]
    answers: dict[int, list] = {i: [] for i in range(4)}

    def client(i: int) -> None:
        for _ in range(2):
            answers[i].append(remotes[i].infer(_obs(i)))

    try:
        batches = server.stats["batch_sizes"].copy()
        threads = [threading.Thread(target=client, args=(0,))]
        threads[0].start()
        assert entered.wait(WAIT_S)
        threads += [threading.Thread(target=client, args=(i,)) for i in (1, 2, 3)]
        for t in threads[1:]:
            t.start()
        _wait_for(lambda: server.stats["queued"] == 3, "3 queued requests")
        gate.set()
        for t in threads:
            t.join(WAIT_S)
        assert not any(t.is_alive() for t in threads)
    finally:
        policy.run_model = real
        for r in remotes:
            r.close()
    assert answers[0][0]["policy_timing"]["server_wall_batch_size"] == 1
    for i in (1, 2, 3):
        assert answers[i][0]["policy_timing"]["server_wall_batch_size"] == 3
    grew = {k: v - batches.get(k, 0) for k, v in server.stats["batch_sizes"].items()}
    assert grew.get(3, 0) >= 1
    for i in range(4):
        assert len(answers[i]) == 2
        for index, out in enumerate(answers[i]):
            np.testing.assert_allclose(out["actions"], _expected(local, i, index), rtol=0,
                                       atol=BATCH_ATOL)


def test_load_n_clients_m_requests_nothing_lost(server, local):
    from pi0_ros.tools.bench_serve import run_load, summarize

    clients, requests = 4, 3
    load = run_load(server.url, clients, requests, api_key=API_KEY, timeout_s=WAIT_S)
    report = summarize(load, clients, requests, server.stats)
    assert report["errors"] == [] and report["lost"] == 0 and report["answered"] == 12
    assert report["p50_ms"] <= report["p99_ms"] <= report["max_ms"]
    assert sum(report["server"]["batch_sizes"].values()) == report["server"]["batches"]
    assert all(len(r) == requests for r in load["results"])
    # Every client got its own observation's chunks (the bench sends the server's keys).
    meta = server.metadata
    from pi0_ros.tools.bench_serve import client_observation

    for i in range(clients):
        obs = client_observation(meta, i)
        for index, actions in enumerate(load["results"][i]):
            expected = local.infer(obs, noise=request_noise(SEED, index, 50, 32))["actions"]
            np.testing.assert_allclose(actions, expected, rtol=0, atol=BATCH_ATOL)


# ---------------------------------------------------------------------------------- RemotePolicy


def test_remote_policy_matches_local_and_renames_slot_keys(server, local):
    with RemotePolicy(server.url, api_key=API_KEY) as remote:
        assert remote.model_name == "openpi_tiny_pi05"
        assert remote.camera_slots == ("base_0_rgb", "left_wrist_0_rgb")
        assert remote.noise_shape == (50, 32) and remote.settings.action_dim == 7
        obs = _obs(3)
        noise = request_noise(99, 0, 50, 32)
        # The node's observation: keyed by slot, "state", "prompt"; images prepared on arrival.
        node_obs = {"base_0_rgb": remote.prepare_image(obs["observation/image"]),
                    "left_wrist_0_rgb": remote.prepare_image(obs["observation/wrist_image"]),
                    "state": obs["observation/state"], "prompt": obs["prompt"]}
        assert node_obs["base_0_rgb"].shape == (98, 98, 3)  # resized before sending
        out = remote.infer(node_obs, noise=noise)
        assert out["actions"].dtype == np.float32 and out["actions"].flags.writeable
        np.testing.assert_array_equal(out["actions"], local.infer(obs, noise=noise)["actions"])
        t = out["policy_timing"]
        assert t["infer_ms"] >= t["round_trip_ms"] > 0 and "server_model_ms" in t
        with pytest.raises(RemoteError, match="state 'observation/state': missing"):
            remote.infer({"prompt": "x"})
        assert remote.link_status()["state"] == "connected"  # an error frame keeps the link


def test_remote_policy_backs_off_and_reconnects(server):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"ws://127.0.0.1:{s.getsockname()[1]}"
    now = [100.0]
    remote = RemotePolicy(dead, connect=False, backoff_s=(0.5, 1.5), connect_timeout_s=5,
                          clock=lambda: now[0])
    with pytest.raises(RemoteUnavailable, match="cannot connect"):
        remote.infer(_obs(0))
    status = remote.link_status()
    assert status["state"] == "backoff" and status["failures"] == 1
    assert status["retry_in_s"] == pytest.approx(0.5)
    with pytest.raises(RemoteUnavailable, match="next attempt in 0.5 s"):
        remote.infer(_obs(0))  # backing off: no attempt
    assert remote.link_status()["failures"] == 1
    for expected_delay in (1.0, 1.5, 1.5):  # doubling, capped
        now[0] += 10
        with pytest.raises(RemoteUnavailable, match="cannot connect"):
            remote.infer(_obs(0))
        assert remote.link_status()["retry_in_s"] == pytest.approx(expected_delay)
    remote.close()
    assert remote.link_status()["state"] == "closed"

    # A live link that drops: the call fails, the next one reconnects at once.
    remote = RemotePolicy(server.url, api_key=API_KEY)
    try:
        remote._ws.close()
        with pytest.raises(RemoteUnavailable, match="connection lost"):
            remote.infer(_obs(0))
        assert remote.link_status()["state"] == "disconnected"
        assert remote.infer(_obs(0))["actions"].shape == (50, 7)
        status = remote.link_status()
        assert (status["state"], status["connects"], status["disconnects"]) == (
            "connected", 2, 1)
    finally:
        remote.close()
    with pytest.raises(RemoteUnavailable, match="401"):
        RemotePolicy(server.url, api_key="wrong")


# ---------------------------------------------------------------------------------- real client

CLIENT_SCRIPT = r"""
import json, sys
import numpy as np
from openpi_client import action_chunk_broker, websocket_client_policy

port, api_key, obs_path, out_path = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
obs = dict(np.load(obs_path))
obs["prompt"] = str(obs["prompt"])
client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=int(port),
                                                       api_key=api_key)
meta = client.get_server_metadata()
horizon = meta["action_horizon"]
broker = action_chunk_broker.ActionChunkBroker(client, action_horizon=horizon)
steps = [broker.infer(obs) for _ in range(2 * horizon)]  # two chunks: requests 0 and 1
direct = client.infer(obs)  # request 2
try:
    client.infer({k: v for k, v in obs.items() if k != "observation/state"})
    error = ""
except RuntimeError as exc:
    error = str(exc)
np.savez(out_path, broker=np.stack([s["actions"] for s in steps]), direct=direct["actions"])
json.dump({"meta": {k: meta[k] for k in ("server", "action_horizon", "action_dim")},
           "keys": sorted(direct), "dtype": str(direct["actions"].dtype),
           "step_dtype": str(steps[0]["actions"].dtype),
           "step_shape": list(steps[0]["actions"].shape),
           "numpy": np.__version__, "error": error}, open(out_path + ".json", "w"))
"""


def _client_python() -> Path:
    """PyPI openpi-client 0.1.2 in its own venv (cached under build/); skip if not installable."""
    python = CLIENT_VENV / "bin" / "python"
    probe = [str(python), "-c", "import openpi_client, tree, typing_extensions"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    base = shutil.which("python3.11") or sys.executable  # openpi-client wants numpy < 2
    steps = [[base, "-m", "venv", "--clear", str(CLIENT_VENV)],
             [str(python), "-m", "pip", "install", "-q", OPENPI_CLIENT, "typing_extensions"]]
    for cmd in steps:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            pytest.skip(f"cannot install {OPENPI_CLIENT} in {CLIENT_VENV}: "
                        f"{' '.join(cmd[:4])} failed: {run.stderr.strip()[-400:]}")
    if subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip(f"{OPENPI_CLIENT} installed but not importable in {CLIENT_VENV}")
    return python


@pytest.fixture(scope="module")
def serve_process(tmp_path_factory):
    """``pi0-ros-serve`` as a user runs it, on a free loopback port."""
    exe = Path(sys.executable).with_name("pi0-ros-serve")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else
           ["-m", "pi0_ros.tools.serve"]),
           "--checkpoint", str(TINY), "--tokenizer", str(PRE / "tokenizer.model"),
           "--norm-stats", str(PRE / "norm_stats.json"), "--port", "0", "--seed", str(SEED),
           "--max-batch", "2", "--device", "cpu", "--log-level", "WARNING",
           # the reference runs in this process: same CPU thread count, same float sums
           "--torch-threads", str(torch.get_num_threads())]
    env = {**os.environ, "PI0_ROS_API_KEY": API_KEY}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    line = proc.stdout.readline()  # blocks until "serving ws://..." (or EOF on failure)
    match = re.search(r"serving ws://127\.0\.0\.1:(\d+)", line)
    if match is None:
        proc.kill()
        raise AssertionError(f"pi0-ros-serve did not start: {line!r} {proc.stderr.read()}")
    yield proc, int(match.group(1))
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_openpi_client_gets_policy_infer_actions(serve_process, local, tmp_path):
    python = _client_python()
    proc, port = serve_process
    obs = _obs(4)
    obs_path, out_path = tmp_path / "obs.npz", tmp_path / "out.npz"
    np.savez(obs_path, **obs)
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    run = subprocess.run([str(python), str(script), str(port), API_KEY, str(obs_path),
                          str(out_path)], capture_output=True, text=True, timeout=WAIT_S * 2)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(Path(str(out_path) + ".json").read_text())
    assert info["numpy"].startswith("1.")  # openpi-client's own numpy < 2
    assert info["meta"] == {"server": "pi0_ros", "action_horizon": 50, "action_dim": 7}
    assert info["keys"] == ["actions", "policy_timing", "server_timing"]
    assert (info["dtype"], info["step_dtype"], info["step_shape"]) == ("float32", "float32", [7])
    assert "state 'observation/state': missing" in info["error"]
    got = np.load(out_path)
    noise = [request_noise(SEED, n, *local.noise_shape) for n in range(3)]
    chunks = [local.infer(obs, noise=n)["actions"] for n in noise]
    np.testing.assert_array_equal(got["broker"][:50], chunks[0])  # ActionChunkBroker steps
    np.testing.assert_array_equal(got["broker"][50:], chunks[1])
    np.testing.assert_array_equal(got["direct"], chunks[2])
    assert proc.poll() is None  # the refused request did not stop the server


@pytest.mark.slow
def test_sigterm_stops_the_server_cleanly(serve_process):
    proc, port = serve_process
    ws = connect(f"ws://127.0.0.1:{port}", additional_headers={
        "Authorization": f"Api-Key {API_KEY}"}, open_timeout=WAIT_S).__enter__()
    unpackb(ws.recv(timeout=WAIT_S))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, err[-2000:]
    assert "pi0-ros-serve: stopped" in out
    with pytest.raises(websockets.ConnectionClosed) as info:
        ws.recv(timeout=WAIT_S)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1001  # going away
    assert "Traceback" not in err
