"""Ctrl-C as a terminal under ``ros2 launch`` delivers it (issue 13 item 12): SIGINT to the whole
process group twice within 50 ms ends the policy node with exit code 0 and no traceback, from
any state, mid-inference included, 20 times in a row (the real main(): runner, executor,
signals; a fake policy whose inference takes seconds, so the signals land inside one)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from ros_helpers import CtrlCProcess

pytest.importorskip("pi0_ros_msgs.msg", reason="pi0_ros_msgs is not built into this environment")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNS = 20
PARALLEL = 4  # processes started at once (start-up, mostly imports, dominates a run)
START_TIMEOUT = 90.0  # s: interpreter + imports + DDS on a loaded 2-core runner
EXIT_TIMEOUT = 10.0  # s: a hang detector, not a speed check (docs/NODE.md gives the figure)
INFER_S = 30.0  # s: the fake inference; far longer than the node may take to exit
GAP_S = 0.02  # s between the two SIGINTs (terminal + launch's forwarded copy)
PARAMS = ["-p", "checkpoint:=/fake", "-p", "prompt:=pick", "-p", "joint_states.names:=[a,b]",
          "-p", "actions.joint_names:=[a,b]", "-p", "diagnostics.period:=0.1"]


def Run(wait_for: str, warmup: int) -> CtrlCProcess:  # noqa: N802
    return CtrlCProcess([sys.executable, HERE / "policy_node_sigint_proc.py", str(INFER_S),
                         "--autostart", "--ros-args", *PARAMS, "-p", f"model.warmup:={warmup}"],
                        wait_for, start_timeout=START_TIMEOUT, exit_timeout=EXIT_TIMEOUT)


@pytest.mark.slow
@pytest.mark.parametrize(("where", "warmup", "runs"), [
    ("inference", 1, RUNS),  # active, an inference in flight
    ("warm_up", 2, PARALLEL),  # --autostart's configure, inside the second warm-up inference
])
def test_double_sigint_to_the_process_group_exits_cleanly(where, warmup, runs):
    """The fake's inferences after the first announce themselves: with one warm-up inference
    that is a live one; with two, the second warm-up (configure still running)."""
    elapsed = []
    for first in range(0, runs, PARALLEL):
        batch = [Run("INFERRING", warmup) for _ in range(min(PARALLEL, runs - first))]
        try:
            for run in batch:
                code, seconds = run.ctrl_c_twice(GAP_S)
                text = run.output()
                assert code == 0, f"run {len(elapsed) + 1}: exit {code}:\n{text}"
                for bad in ("Traceback", "KeyboardInterrupt", "terminate called"):
                    assert bad not in text, f"run {len(elapsed) + 1}:\n{text}"
                elapsed.append(seconds)
        finally:
            for run in batch:
                run.kill()
    print(f"{len(elapsed)} double Ctrl-C exits mid-{where}: max {max(elapsed):.2f} s, "
          f"mean {sum(elapsed) / len(elapsed):.2f} s")
