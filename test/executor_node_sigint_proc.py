"""The executor node process of test_executor_node_sigint.py: the real ``main()`` path (runner,
executor, signal handling) around ExecutorNode with its control loop running and tracking: once
active, a thread feeds the driver a measured state and a fresh chunk every 50 ms (no DDS peer
needed) and prints ``TICKING`` when commands are being published.

    python executor_node_sigint_proc.py --autostart --ros-args -p joint_names:=[a,b] ...
"""

from __future__ import annotations

import threading
import time

import numpy as np

from pi0_ros.ros.executor_node import NODE_NAME, ExecutorNode
from pi0_ros.ros.runner import run_lifecycle_node


class FedExecutor(ExecutorNode):
    def on_activate(self, state):
        result = super().on_activate(state)
        threading.Thread(target=self._feed, daemon=True).start()
        return result

    def _feed(self):
        announced = False
        while self.context.ok():
            drv = self.driver
            if drv is None or not self._active:
                return
            now = self._now()
            names = list(drv.names)
            q = drv.position if drv.initialized else np.zeros(len(names))
            drv.measure(names, q, now)
            ramp = q + 0.02 * np.arange(1, 11)[:, None]
            drv.submit(now, 0.05, names, ramp, now)
            if not announced and self.ticks_published > 20:
                print("TICKING", flush=True)
                announced = True
            time.sleep(0.05)


if __name__ == "__main__":
    raise SystemExit(run_lifecycle_node(lambda: FedExecutor(NODE_NAME), NODE_NAME,
                                        "Ctrl-C test executor"))
