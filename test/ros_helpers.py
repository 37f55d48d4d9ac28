"""ROS test helpers: fresh ROS_DOMAIN_IDs, private rclpy Contexts, event waits, node subprocesses.

Importable without rclpy (it is imported inside the functions that need it), so test modules
can use the pure helpers and let the ``ros`` marker skip the rest.

    from ros_helpers import fresh_domain_id, private_context, spin_until, NodeProcess

    with private_context(domain_id) as ctx:            # own DDS participant(s), own domain
        node = rclpy.create_node("probe", context=ctx)
        spin_until(ctx, node, lambda: got, timeout=WAIT)

    with NodeProcess([sys.executable, "-m", "pi0_ros.ros.node"], domain_id, log) as proc:
        ...                                            # SIGINT, then SIGKILL, on exit
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "test" / "fixtures"

WAIT = 10.0  # s, default upper bound of every wait on DDS discovery / delivery
STOP_TIMEOUT = 10.0  # s, a node process gets this long to exit after SIGINT

# Domain ids whose Fast DDS / Cyclone port numbers stay valid and clear of Linux's ephemeral
# port range: 0-101 and 215-232 (docs.ros.org, "The ROS_DOMAIN_ID").
DOMAIN_IDS = tuple(range(0, 102)) + tuple(range(215, 233))
# 0 is everybody's default and pytest sessions of several developers may run side by side:
# start at a pid-derived offset and walk with a pid-derived stride coprime to the pool size.
_POOL = [d for d in DOMAIN_IDS if d != 0]
_STRIDES = [s for s in range(1, len(_POOL)) if math.gcd(s, len(_POOL)) == 1]
_counter = itertools.count()


def fresh_domain_id() -> int:
    """A ROS_DOMAIN_ID not handed out before in this process (until the pool of 119 wraps)."""
    pid = os.getpid()
    stride = _STRIDES[pid % len(_STRIDES)]
    return _POOL[(pid + stride * next(_counter)) % len(_POOL)]


def ros_env(domain_id: int, **extra: str) -> dict[str, str]:
    """os.environ plus what a node process needs: its domain, loopback discovery, unbuffered
    output and this checkout on PYTHONPATH (so an un-installed tree runs too)."""
    env = dict(os.environ)
    env.update(
        ROS_DOMAIN_ID=str(domain_id),
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
    )
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    env.update(extra)
    return env


@contextmanager
def private_context(domain_id: int, args: Sequence[str] | None = None) -> Iterator[Any]:
    """An initialized ``rclpy.Context`` on ``domain_id``, shut down on exit.

    Nodes made with ``context=ctx`` never touch the global default context, so tests cannot leak
    participants, executors or shutdown state into each other."""
    import rclpy

    ctx = rclpy.Context()
    rclpy.init(args=list(args) if args is not None else [], context=ctx, domain_id=domain_id)
    try:
        yield ctx
    finally:
        rclpy.try_shutdown(context=ctx)


def spin_until(ctx: Any, nodes: Any, predicate: Callable[[], Any], timeout: float = WAIT,
               what: str = "condition") -> Any:
    """Spin ``nodes`` (one or several) in ``ctx`` until ``predicate()`` is truthy; return it.

    Waits on the executor (wakes as soon as a callback is ready), never sleeps blindly.
    AssertionError naming ``what`` on timeout."""
    from rclpy.executors import SingleThreadedExecutor

    executor = SingleThreadedExecutor(context=ctx)
    for node in nodes if isinstance(nodes, (list, tuple)) else [nodes]:
        executor.add_node(node)
    deadline = time.monotonic() + timeout
    try:
        while not (value := predicate()):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            executor.spin_once(timeout_sec=min(left, 0.1))
        return value
    finally:
        executor.shutdown(timeout_sec=1.0)


def wait_for(predicate: Callable[[], Any], timeout: float = WAIT, what: Any = "condition") -> Any:
    """Poll cheap in-process state (set by another thread) until truthy; AssertionError on
    timeout naming ``what`` (a string, or a callable evaluated then, e.g. to show state)."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not (value := predicate()):
        if time.monotonic() > deadline:
            what = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        tick.wait(0.005)
    return value


class NodeProcess:
    """A node (or any command) in a subprocess on ``domain_id``, output captured to ``log``.

    Leaving the ``with`` block (or :meth:`stop`) sends SIGINT, as Ctrl-C / launch would, waits
    ``STOP_TIMEOUT`` and then kills the process group."""

    def __init__(self, cmd: Sequence[str], domain_id: int, log: Path,
                 env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.cmd = [str(c) for c in cmd]
        self.domain_id = domain_id
        self.log = Path(log)
        self._env = ros_env(domain_id, **(env or {}))
        self._cwd = cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> NodeProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.cmd, env=self._env, cwd=self._cwd, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGINT, then SIGKILL after ``timeout``; the exit code (negative: killed by signal)."""
        assert self.proc is not None, "not started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def python_node(module: str, *args: str) -> list[str]:
    """The command that runs ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


class CtrlCProcess:
    """A node process in its own process group (a terminal's foreground job) on a fresh domain;
    ``ctrl_c_twice(gap)`` sends SIGINT to the group twice, ``gap`` seconds apart, as a terminal
    Ctrl-C under ``ros2 launch`` arrives (the terminal's and launch's forwarded copy), once
    ``ready_line`` was printed; returns (exit code, seconds to exit)."""

    def __init__(self, cmd: Sequence[str], ready_line: str, *, start_timeout: float,
                 exit_timeout: float) -> None:
        self.ready_line, self.start_timeout, self.exit_timeout = (ready_line, start_timeout,
                                                                  exit_timeout)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen([str(c) for c in cmd], env=ros_env(fresh_domain_id()),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.ready_line in line:
                self.ready.set()

    def ctrl_c_twice(self, gap: float) -> tuple[int, float]:
        assert self.ready.wait(self.start_timeout), self.output()
        pgid = os.getpgid(self.proc.pid)
        start = time.monotonic()
        os.killpg(pgid, signal.SIGINT)
        time.sleep(gap)
        os.killpg(pgid, signal.SIGINT)
        try:
            code = self.proc.wait(self.exit_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"no exit within {self.exit_timeout} s:\n{self.output()}") \
                from None
        elapsed = time.monotonic() - start
        self.reader.join(5.0)
        return code, elapsed

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5.0)
