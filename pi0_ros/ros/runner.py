"""``main()`` of the lifecycle nodes: parse ``--autostart``, spin, end cleanly on any signal.

    run_lifecycle_node(PolicyNode, "pi0_policy_node", "pi0 / pi0.5 policy node", argv,
                       make_executor=make_executor)

One executor per process (single-threaded by default, ros2/demos ``lifecycle_py`` style; the
policy node passes a multi-threaded one so its lifecycle services and /diagnostics answer while
configure loads the model). ``--autostart`` configures and activates the node itself, for setups
without ``ros2 lifecycle`` or launch; a failed configure leaves it ``unconfigured`` and serving its
lifecycle services.

Signals: SIGINT / SIGTERM end the node from any state with exit code 0. rclpy's handler shuts
the context down (the spin loop ends) and then calls the Python handler installed here, which
only records the signal: no ``KeyboardInterrupt`` is ever raised, so a second Ctrl-C (a terminal
Ctrl-C reaches a node under ``ros2 launch`` twice: from the terminal and forwarded by launch)
cannot interrupt the teardown half-way. The teardown gives the node's threads ``STOP_TIMEOUT``
seconds (``node.stop(timeout=...)``); when one is still busy after that (an inference in flight)
the process flushes its output and leaves with ``os._exit(0)`` instead of finalizing the
interpreter under a running CUDA / torch thread.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import rclpy
from rclpy.exceptions import InvalidHandle
from rclpy.executors import (ConditionReachedException, ExternalShutdownException,
                             ShutdownException, SingleThreadedExecutor, TimeoutException)
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.utilities import remove_ros_args

SPIN_TIMEOUT = 0.1  # s, longest wait of the main thread before it re-checks for shutdown
STOP_TIMEOUT = 1.0  # s the node's threads get to finish on exit (then the process leaves anyway)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SideThreadExecutor(SingleThreadedExecutor):
    """A single-threaded executor whose callbacks of the ``side`` callback groups run on a small
    thread pool instead of the spinning thread.

    Everything else (subscriptions, the /clock of sim time, timers) keeps the single-threaded
    executor's order on the spinning thread: a MultiThreadedExecutor may run a message before
    the /clock message received ahead of it (its pool races for the mutually exclusive group),
    which turns bag stamps into ``future_stamp``. The policy node puts its lifecycle services
    and /diagnostics timer in side groups: a configure that loads and warms up a model for
    seconds (minutes on a big one) blocks one pool thread while get_state, /diagnostics, the
    parameter services and the inputs keep being served.
    """

    def __init__(self, side: Sequence[Any], threads: int = 2, *, context: Any = None) -> None:
        super().__init__(context=context)
        self._side = list(side)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, "pi0_ros_side")
        self._running: set[concurrent.futures.Future] = set()

    def _spin_once_impl(self, timeout_sec: Any = None,
                        wait_condition: Callable[[], bool] = lambda: False) -> None:
        try:
            handler, entity, _node = self.wait_for_ready_callbacks(
                timeout_sec, None, wait_condition)
        except (ShutdownException, TimeoutException, ConditionReachedException):
            return
        except InvalidHandle:
            # An entity destroyed by a side thread (cleanup) while this thread built the wait
            # set (ros2/rclpy#1206): the next wait set no longer has it.
            return
        group = getattr(entity, "callback_group", None)
        if any(group is g for g in self._side):
            future = self._pool.submit(self._run_side, handler)
            self._running.add(future)
            future.add_done_callback(self._running.discard)
            return
        handler()
        exception = handler.exception()
        if exception is not None:
            raise exception
        handler.result()

    @staticmethod
    def _run_side(handler: Any) -> None:
        handler()
        exception = handler.exception()
        if exception is not None:  # a service / timer callback raised: report, keep serving
            print(f"side callback raised {type(exception).__name__}: {exception}",
                  file=sys.stderr)

    def busy(self) -> bool:
        """True while a side callback (a transition) still runs."""
        return any(not f.done() for f in list(self._running))

    def shutdown(self, timeout_sec: float | None = None) -> bool:
        done = super().shutdown(timeout_sec)
        self._pool.shutdown(wait=False, cancel_futures=True)
        return done


def run_lifecycle_node(make_node: Callable[[], Any], prog: str, description: str,
                       argv: Sequence[str] | None = None, *,
                       make_executor: Callable[[Any], Any] | None = None) -> int:
    """Create the node after ``rclpy.init``, spin it until shutdown, release it. The node must
    offer ``stop()`` (stop its threads, free its resources; optionally ``stop(timeout=s)``
    returning False when a thread did not stop in time) besides the LifecycleNode API."""
    args = list(sys.argv if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--autostart", action="store_true", help="configure and activate")
    options = parser.parse_args(remove_ros_args(args)[1:])
    received: list[int] = []
    for sig in SIGNALS:  # before rclpy.init: rclpy's handler chains to these
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    rclpy.init(args=args)
    node = make_node()
    executor = make_executor(node) if make_executor is not None else SingleThreadedExecutor()
    executor.add_node(node)
    stopped = False
    if options.autostart:
        # On a thread of its own, so the executor serves (and a signal ends the process)
        # while configure loads and warms up the model.
        threading.Thread(target=_autostart, args=(node,), name="autostart", daemon=True).start()
    try:
        # spin_once with a timeout (rcl_wait's steady clock, never sim time) instead of
        # spin(): the loop re-checks the context at least every SPIN_TIMEOUT even if a signal's
        # wake-up is lost and every timer sits on a stopped /clock (issue 14).
        while node.context.ok() and not received:
            executor.spin_once(timeout_sec=SPIN_TIMEOUT)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        # The signal handler shuts the context down at once; a callback that was already
        # running then fails on an invalid publisher. That is shutdown, not a crash.
        if node.context.ok() and not received:
            raise
    finally:
        for sig in SIGNALS:  # from here on a signal changes nothing: the teardown is under way
            signal.signal(sig, signal.SIG_IGN)
        stopped = _stop(node)
        stopped = stopped and not getattr(executor, "busy", lambda: False)()
        executor.shutdown(timeout_sec=STOP_TIMEOUT)
        node.destroy_node()
        rclpy.try_shutdown()
    if not stopped:  # a thread is still busy (an inference): do not finalize under it
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _autostart(node: Any) -> None:
    try:
        if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            node.trigger_activate()
    except Exception as exc:  # shutting down under it (a signal): main() reports nothing more
        if node.context.ok():
            print(f"[{node.get_name()}] autostart: {type(exc).__name__}: {exc}",
                  file=sys.stderr)


def _stop(node: Any) -> bool:
    """``node.stop`` with STOP_TIMEOUT where it takes one; False if a thread did not stop."""
    try:
        if "timeout" in inspect.signature(node.stop).parameters:
            return node.stop(timeout=STOP_TIMEOUT) is not False
        node.stop()
    except Exception as exc:  # the process ends anyway: say why the teardown was incomplete
        print(f"[{node.get_name()}] stopping: {type(exc).__name__}: {exc}", file=sys.stderr)
        return False
    return True
