"""The policy node process of test_policy_node_sigint.py: the real ``main()`` path (runner,
executor, signal handling) around PolicyNode with a fake policy whose inference takes
``INFER_S`` seconds and announces itself on stdout, so the test can interrupt it mid-inference.

    python policy_node_sigint_proc.py INFER_S --autostart --ros-args -p ...
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np

from pi0_ros.pipeline.core import Observation
from pi0_ros.ros.node import NODE_NAME, PolicyNode
from pi0_ros.ros.runner import run_lifecycle_node

try:  # the production executor (absent before issue 13: then the runner's default)
    from pi0_ros.ros.node import make_executor
    EXTRA = {"make_executor": make_executor}
except ImportError:
    EXTRA = {}

INFER_S = float(sys.argv.pop(1))
ACTION_DIM = 2


class SlowPolicy:
    """Warm-up answers at once; every later inference sleeps INFER_S (a busy GPU / CPU)."""

    model_name = "slow_fake"
    camera_slots = ("base_0_rgb",)
    noise_shape = None
    state_dim = None
    rtc = None

    def prompt_fit(self, prompt, state):
        return None

    def __init__(self) -> None:
        self.calls = 0

    def prepare_image(self, rgb, name):
        return rgb

    def infer(self, obs, noise=None):
        self.calls += 1
        if self.calls > 1:
            print("INFERRING", flush=True)
            time.sleep(INFER_S)
        return {"actions": np.zeros((4, ACTION_DIM), np.float32)}

    def status(self):
        return {}

    def close(self):
        pass


class FedNode(PolicyNode):
    """Once active, keeps the inference thread busy with observations (no DDS inputs needed)."""

    def on_activate(self, state):
        result = super().on_activate(state)
        threading.Thread(target=self._feed, daemon=True).start()
        print("ACTIVE", flush=True)
        return result

    def _feed(self):
        while True:
            worker, pipe = self._worker, self.pipeline
            if worker is None or pipe is None:
                return
            obs = Observation(time.time_ns(), {"base_0_rgb": np.zeros((2, 2, 3), np.uint8)},
                              np.zeros(ACTION_DIM, np.float32), pipe.prompt, None,
                              time.monotonic(), pipe.epoch)
            worker.submit(obs)
            time.sleep(0.01)


if __name__ == "__main__":
    raise SystemExit(run_lifecycle_node(
        lambda: FedNode(NODE_NAME, policy_factory=lambda config, slots: SlowPolicy()),
        NODE_NAME, "Ctrl-C test node", **EXTRA))
