"""pi0_policy_node: a lifecycle node that runs a pi0 / pi0.5 policy on synchronized observations.

The node is lifecycle + subscriptions + publishers + worker plumbing around the pipeline core
(``pi0_ros.pipeline.PolicyPipeline``), which the offline replay drives too::

    cameras (Image / CompressedImage) + JointState   [subscription callbacks]
      -> pipeline.on_input: stamp gate, cameras converted + prepared on arrival, synchronizer
      -> pipeline.assemble: silent / stale / state checks, rate cap, noise  -> worker.submit
      -> pipeline.infer(obs) on the inference thread (latest-only slot, engine/worker.py)
      -> pipeline.accept(chunk) -> ros/outputs.chunk_messages -> publish   [result callback]

Lifecycle (ros2/demos ``lifecycle_py/talker.py``): parameters are declared in ``__init__``;
``on_configure`` maps them onto a frozen NodeConfig and starts the inference thread, which loads
the policy and warms it up (a CUDA graph is captured by the thread that replays it), then creates
the publishers and the input subscriptions (gated: inputs are dropped on arrival until
``on_activate``); ``on_activate`` opens the pipeline's gate with a fresh synchronizer;
``on_deactivate`` closes it and makes the worker discard the pending and in-flight observations;
``on_cleanup`` stops the thread, whose teardown frees the model. A transition never lets an
exception escape: it logs the reason and returns FAILURE. docs/NODE.md is the user's description.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Sequence
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.lifecycle.node import LifecycleNodeMixin
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory
from visualization_msgs.msg import MarkerArray

from pi0_ros.paramcheck import live_change_refusal
from pi0_ros.pipeline import WARN, Chunk, NodeConfig, PolicyPipeline, load_policy
from pi0_ros.pipeline.config import (LIVE_PARAMETERS, check_prompt, printable,
                                     undeclared, unknown_parameters_message)
from pi0_ros.ros import conversions as conv
from pi0_ros.ros import outputs
from pi0_ros.ros.params import PARAMETERS, config_from_parameters, declare_parameters, get_param
from pi0_ros.ros.sync import make_synchronizer

try:  # ros-std-srvs (bootstrap's ROS list); without it `enabled` is the parameter alone
    from std_srvs.srv import SetBool
except ImportError:  # pragma: no cover - depends on the install
    SetBool = None

NODE_NAME = "pi0_policy_node"
EXECUTOR_THREADS = 2  # side threads: a transition (configure: load, warm-up) and /diagnostics
SUCCESS = TransitionCallbackReturn.SUCCESS
FAILURE = TransitionCallbackReturn.FAILURE

PolicyFactory = Callable[[NodeConfig, Sequence[str]], Any]
WorkerFactory = Callable[..., Any]


class PolicyNode(LifecycleNode):
    """The policy lifecycle node. ``policy_factory`` / ``worker_factory`` are injectable for tests.

    ``policy_factory(config, camera_slots)`` returns a ``pi0_ros.pipeline.PolicyLike``
    (default: ``pi0_ros.pipeline.load_policy``); ``camera_slots`` are the configured cameras'
    slots ("" = the checkpoint's, in order).
    """

    def __init__(
        self,
        node_name: str = NODE_NAME,
        *,
        policy_factory: PolicyFactory | None = None,
        worker_factory: WorkerFactory | None = None,
        **kwargs: Any,
    ) -> None:
        # LifecycleNode.__init__, with the lifecycle services in a group of their own: the
        # node's executor (make_executor) runs that group and the /diagnostics timer's on side
        # threads, so get_state, /diagnostics and the parameter services answer while a
        # transition callback (configure: load + warm up) still runs.
        Node.__init__(self, node_name, **kwargs)
        self.side_groups = (ReentrantCallbackGroup(), ReentrantCallbackGroup())
        LifecycleNodeMixin.__init__(self, enable_communication_interface=True,
                                    callback_group=self.side_groups[0])
        declare_parameters(self)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._policy_factory = policy_factory or load_policy
        self._worker_factory = worker_factory or default_worker_factory
        self.config: NodeConfig | None = None
        self.pipeline: PolicyPipeline | None = None
        self._worker: Any = None
        self._subs: list[Any] = []
        self._pubs: dict[str, Any] = {}
        self._prompt_sub: Any = None
        self._watchdog: Any = None
        self._phase = ""  # configure progress for /diagnostics: loading, warming up
        self.configure_error = ""  # why the last configure failed ("" after a success)
        self._diag_group = self.side_groups[1]
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(1.0, self._publish_diagnostics,
                                             callback_group=self._diag_group)
        self._enable_srv = None
        if SetBool is not None:
            self._enable_srv = self.create_service(SetBool, "~/enable", self._on_enable)

    @property
    def policy(self) -> Any:
        return self.pipeline.policy if self.pipeline is not None else None

    # --------------------------------------------------------------------------------------
    # lifecycle

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.configure_error = ""
        unknown = undeclared(self._parameter_overrides)
        if unknown:  # a typo in the parameter file or a -p must never fall back to a default
            return self._configure_failed(
                f"{unknown_parameters_message(unknown, PARAMETERS)} in the parameters of "
                f"{self.get_fully_qualified_name()} (`ros2 param list` shows the declared ones)")
        try:
            config = config_from_parameters(lambda name: get_param(self, name))
        except ValueError as exc:
            return self._configure_failed(f"invalid parameter: {exc}")
        try:
            self._configure(config)
        except Exception as exc:  # a transition never lets an exception escape
            result = self._configure_failed(f"{type(exc).__name__}: {exc}")
            try:
                self._release()
            except Exception as cleanup_exc:
                self.get_logger().error(f"releasing after the failed configure: {cleanup_exc}")
            return result
        pipe = self.pipeline
        self.get_logger().info(
            f"configured: {pipe.policy.model_name} on {len(config.cameras)} camera(s) "
            f"{[c.topic for c in config.cameras]} -> slots {list(pipe.slots)}, "
            f"{len(config.action_joint_names)} action dims, dt {config.action_dt} s"
        )
        return SUCCESS

    def _configure_failed(self, reason: str) -> TransitionCallbackReturn:
        self.configure_error = printable(reason, 2000)
        self.get_logger().error(f"configure failed: {self.configure_error}")
        return FAILURE

    def _configure(self, config: NodeConfig) -> None:
        chunk_type = _action_chunk_type()  # fails fast when pi0_ros_msgs is not built
        self.config = config
        self.pipeline = PolicyPipeline(
            config,
            clock=lambda: self.get_clock().now().nanoseconds,
            image_of=functools.partial(conv.to_rgb, max_pixels=config.max_image_pixels),
            state_of=functools.partial(conv.joint_state_to_vector,
                                       max_abs=config.max_abs_state),
            make_sync=make_synchronizer,
            sink=self._submit,
            logger=self.get_logger(),
        )
        # The worker thread owns the model from here to cleanup: setup (load, warm up, capture)
        # runs ON it, because a CUDA-graph backend must be replayed by the thread that captured
        # it. start() re-raises a setup failure and leaves no thread behind.
        pipelined = config.model.pipeline
        self._worker = self._worker_factory(
            self.pipeline.pipelined() if pipelined else self.pipeline.infer,
            self._on_result,
            self._on_error,
            setup=lambda: self._load(config),
            teardown=self._unload,
            **({"pipeline": True} if pipelined else {}),
        )
        try:
            self._worker.start()
        except RuntimeError as exc:
            self._worker = None
            raise (exc.__cause__ or exc) from None
        depth = config.output_depth
        types = {"chunk": chunk_type, "trajectory": JointTrajectory, "planned": JointState,
                 "markers": MarkerArray}
        self._pubs = {key: self.create_lifecycle_publisher(types[key], topic, depth)
                      for key, topic in outputs.OUTPUT_TOPICS.items()}
        self._prompt_sub = self.create_subscription(String, "~/prompt", self._on_prompt, 10)
        self._create_inputs(config)
        self.destroy_timer(self._diag_timer)
        self._diag_timer = self.create_timer(config.diagnostics_period, self._publish_diagnostics,
                                             callback_group=self._diag_group)

    def _load(self, config: NodeConfig) -> None:
        """Worker thread: build the policy, resolve camera slots, warm up (progress on
        /diagnostics, published meanwhile by another executor thread)."""
        self._set_phase("loading the policy")
        try:
            policy = self._policy_factory(config, tuple(c.slot for c in config.cameras))
            self._set_phase("warming up")
            try:
                self.pipeline.bind(policy)
            except BaseException:
                policy.close()
                raise
        finally:
            self._phase = ""

    def _set_phase(self, phase: str) -> None:
        self._phase = phase
        self.get_logger().info(f"configure: {phase}")
        self._publish_diagnostics()

    def _unload(self) -> None:
        """Worker thread (teardown): drop the policy and give its GPU memory back."""
        pipe = self.pipeline
        policy = pipe.policy if pipe is not None else None
        if pipe is not None:
            pipe.policy = None
        if policy is not None:
            policy.close()
        del policy
        gc.collect()
        _empty_cuda_cache()

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.pipeline.start()
        except Exception as exc:
            self.get_logger().error(f"activate failed: {type(exc).__name__}: {exc}")
            self._deactivate()
            return FAILURE
        self.get_logger().info("active: inputs accepted, inference running")
        return super().on_activate(state)

    def _create_inputs(self, config: NodeConfig) -> None:
        """Input subscriptions and the silence watchdog, created once per configure.

        They live until cleanup and are gated by the pipeline (inputs are dropped on arrival
        while inactive), like lifecycle publishers. Keeping them matched across
        deactivate/activate means no rediscovery on activate and no entity destruction in the
        frequent transitions: rclpy's MultiThreadedExecutor can raise InvalidHandle while
        another of its threads builds a wait set with a subscription that is being destroyed
        (ros2/rclpy#1206), which would end the spin of a node composed that way.
        """
        n = len(config.cameras) + 1
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=config.input_depth,
            reliability=ReliabilityPolicy.BEST_EFFORT
            if config.input_reliability == "best_effort"
            else ReliabilityPolicy.RELIABLE,
        )
        for i, cam in enumerate(config.cameras):
            msg_type = CompressedImage if cam.compressed else Image
            self._subs.append(
                self.create_subscription(
                    msg_type, cam.topic, lambda m, i=i: self._on_input(i, m), qos
                )
            )
        self._subs.append(
            self.create_subscription(
                JointState, config.joint_states_topic, lambda m: self._on_input(n - 1, m), qos
            )
        )
        period = min(config.max_input_age / 4.0, 0.1)
        self._watchdog = self.create_timer(period, self._check_silence)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        self.get_logger().info("inactive: inputs ignored, in-flight result discarded")
        return super().on_deactivate(state)

    def _deactivate(self) -> None:
        if self.pipeline is not None:
            self.pipeline.stop()  # after this no result is published (see _on_result)
        if self._worker is not None:
            # The pending observation is dropped and the in-flight result is never delivered;
            # the model stays loaded on its thread for the next activate.
            self._worker.discard_pending()

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._release()
        except Exception as exc:  # a transition never lets an exception escape
            self.get_logger().error(f"cleanup: {type(exc).__name__}: {exc}")
        self.get_logger().info("cleaned up: model released")
        return SUCCESS

    def _release(self, timeout: float | None = 30.0) -> bool:
        """Stop the worker (its teardown frees the model on its thread) and the publishers;
        False when the inference thread did not stop within ``timeout`` s (it is a daemon)."""
        worker, self._worker = self._worker, None
        stopped = True
        if worker is not None:
            try:
                worker.stop(timeout)
            except Exception as exc:  # TimeoutError: an inference is stuck; the thread is a daemon
                stopped = False
                self.get_logger().error(f"stopping the inference thread: {exc}")
        if stopped and self.policy is not None:  # setup failed after the policy was built
            self._unload()
        for pub in self._pubs.values():
            self.destroy_lifecycle_publisher(pub)
        self._pubs = {}
        if self._prompt_sub is not None:
            self.destroy_subscription(self._prompt_sub)
            self._prompt_sub = None
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        if self._watchdog is not None:
            self.destroy_timer(self._watchdog)
            self._watchdog = None
        self.config = None
        return stopped

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.stop()
        except Exception as exc:
            self.get_logger().error(f"shutdown: {type(exc).__name__}: {exc}")
        self.get_logger().info("shut down")
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.stop()
        except Exception as exc:
            self.get_logger().error(f"error processing: {type(exc).__name__}: {exc}")
        self.get_logger().error("error processing: released everything, back to unconfigured")
        return SUCCESS

    def lifecycle_state(self) -> str:
        return self._state_machine.current_state[1]

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Stop the worker and free the model whatever the state (used by main on exit, which
        gives it a short ``timeout``); False when the inference thread is still busy."""
        self._deactivate()
        return self._release(timeout)

    def destroy_node(self) -> None:
        """Also stops the inference thread: a destroyed node leaves no thread or model behind."""
        try:
            self.stop()
        except Exception as exc:  # destroying must not fail half-way
            self.get_logger().error(f"stopping before destroy: {type(exc).__name__}: {exc}")
        super().destroy_node()

    # --------------------------------------------------------------------------------------
    # inputs

    def _on_prompt(self, msg: String) -> None:
        pipe = self.pipeline
        if pipe is not None and pipe.set_prompt(msg.data):
            self.get_logger().info(f"prompt set to '{printable(msg.data)}'")

    # --------------------------------------------------------------------------------------
    # live control: `ros2 param set` and ~/enable

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Accept a change of a LIVE_PARAMETERS entry (applied at once); refuse any other
        while configured (it is read at configure only), with the reason."""
        configured = self.config is not None  # set from configure to cleanup
        refusal = live_change_refusal(params, LIVE_PARAMETERS, configured, self._check_live)
        if refusal is not None:
            return SetParametersResult(successful=False, reason=refusal)
        if configured:
            for p in params:
                if p.name in LIVE_PARAMETERS:
                    self._apply_live(p)
        return SetParametersResult(successful=True)

    def _check_live(self, p: Parameter) -> None:
        value = p.value
        if p.name == "prompt":
            limit = self.config.max_prompt_length if self.config else PARAMETERS[
                "max_prompt_length"][0]
            check_prompt(str(value), limit)
            if self.pipeline is not None:
                self.pipeline.check_prompt_tokens(str(value))
        elif p.name == "max_rate" and not (isinstance(value, (int, float)) and value >= 0.0):
            raise ValueError(f"max_rate must be a number >= 0 (0 = unlimited), got {value!r}")
        elif p.name == "enabled" and not isinstance(value, bool):
            raise ValueError(f"enabled must be a bool, got {value!r}")

    def _apply_live(self, p: Parameter) -> None:
        pipe = self.pipeline
        if p.name == "prompt" and pipe.set_prompt(str(p.value)):
            self.get_logger().info(f"prompt set to '{printable(str(p.value))}'")
        elif p.name == "max_rate":
            pipe.set_max_rate(float(p.value))
            self.get_logger().info(f"max_rate set to {float(p.value)} Hz")
        elif p.name == "enabled":
            self.set_enabled(bool(p.value))

    def set_enabled(self, enabled: bool) -> None:
        pipe = self.pipeline
        if pipe is not None:
            pipe.set_enabled(enabled)
            if not enabled and self._worker is not None:
                self._worker.discard_pending()  # nothing submitted before the pause publishes
        self.get_logger().info("inference enabled" if enabled else
                               "inference paused (enabled=false): no chunks until enabled")

    def _on_enable(self, request: Any, response: Any) -> Any:
        """std_srvs/SetBool ~/enable: the ``enabled`` parameter, so both views agree."""
        result = self.set_parameters([Parameter("enabled", value=bool(request.data))])[0]
        response.success = result.successful
        response.message = ("enabled" if request.data else "paused") if result.successful \
            else result.reason
        return response

    def _on_input(self, index: int, msg: Any) -> None:
        """Subscription callback: the pipeline's gate, conversion and synchronizer."""
        pipe = self.pipeline
        if pipe is not None:
            pipe.on_input(index, conv.stamp_to_ns(msg.header.stamp), msg)

    def _submit(self, obs: Any) -> None:
        """Pipeline sink (sync callback): hand the observation to the latest-only slot."""
        worker = self._worker
        if worker is not None and worker.submit(obs):
            self.pipeline.count("dropped_observations")

    def _check_silence(self) -> None:
        if self.pipeline is not None:
            self.pipeline.check_silence()

    # --------------------------------------------------------------------------------------
    # the worker side (GPU thread) and outputs

    def _on_result(self, delivered: Any) -> None:
        """Worker thread, under the worker's delivery lock: check, build, publish."""
        pipe, config = self.pipeline, self.config
        if pipe is None or config is None:
            return
        chunk: Chunk | None = pipe.accept(delivered.result)
        if chunk is None:
            return
        msgs = outputs.chunk_messages(config, chunk, now_ns=self.get_clock().now().nanoseconds,
                                      model_name=pipe.policy.model_name,
                                      rate_hz=pipe.output_rate_hz())
        with pipe.lock:  # a deactivate that returned before this point wins
            if not pipe.is_current(chunk) or not self._pubs:
                pipe.count("discarded_results")
                return
            self._publish(*msgs.items())

    def _publish(self, *items: tuple[str, Any]) -> bool:
        """Publish (key, message) pairs; False, quietly, when the process is shutting down.

        SIGINT / SIGTERM shut the context down at once (rclpy's signal handler), before main()
        stops the inference thread: a result finished in that window must not end in a
        traceback. Any other publishing error propagates (counted as publish_error)."""
        try:
            for key, msg in items:
                self._pubs[key].publish(msg)
        except Exception:
            if self.context.ok():
                raise
            return False
        return True

    def _on_error(self, exc: BaseException, info: Any = None) -> None:
        """Worker thread: the policy (or publishing) raised; the worker keeps serving."""
        where = getattr(info, "where", "infer")
        if where == "setup" or self.pipeline is None:
            return  # start() re-raises it: on_configure logs the reason and fails
        reason = {"infer": "inference_error", "on_result": "publish_error"}.get(where, where)
        self.pipeline.reject(reason, f"{where} failed: {type(exc).__name__}: {exc}")

    # --------------------------------------------------------------------------------------
    # diagnostics

    def counts(self) -> dict[str, int]:
        return self.pipeline.counts() if self.pipeline is not None else {}

    @property
    def last_rejection(self) -> str:
        return self.pipeline.last_rejection if self.pipeline is not None else ""

    def diagnostics(self) -> tuple[int, str, dict[str, object]]:
        """(level, message, values) of the node's DiagnosticStatus (pipeline level codes)."""
        state = self.lifecycle_state()
        phase = self._phase
        if self.pipeline is None:
            return 0, state, {"lifecycle_state": state, "chunks_published": 0}
        if phase:  # configuring: loading, warming up
            return 0, f"{state}: {phase}", {"lifecycle_state": state, "phase": phase,
                                            "chunks_published": 0}
        level, message, values = self.pipeline.diagnostics(state)
        values.setdefault("dropped_observations", 0)
        worker = self._worker
        if worker is not None:
            stats = worker.stats
            for key in ("dropped", "discarded", "delivered", "errors", "callback_errors"):
                values[f"worker_{key}"] = stats.get(key, 0)
            run_ms = stats.get("mean_ms", {}).get("run")
            if run_ms is not None:
                values["worker_mean_run_ms"] = float(run_ms)
        values["gpu_memory_mb"] = _gpu_memory_mb()
        policy = self.policy
        if policy is not None:
            status = policy.status()
            values.update({f"policy.{k}": v for k, v in status.items()})
            if not status.get("connected", True) and level < WARN:
                level, message = WARN, f"policy link {status.get('state')}: " \
                                       f"{status.get('last_error', '')}"
        return level, message, values

    def _publish_diagnostics(self) -> None:
        if not self.context.ok():  # shutting down (SIGINT / SIGTERM)
            return
        level, message, values = self.diagnostics()
        policy = self.policy
        self._diag_pub.publish(outputs.diagnostics(
            f"{self.get_fully_qualified_name().lstrip('/')}: policy",  # namespaced nodes differ
            policy.model_name if policy else "pi0", level,
            message, values, self.get_clock().now().nanoseconds))


# ------------------------------------------------------------------------------------------
# helpers


def _action_chunk_type() -> Any:
    from pi0_ros_msgs.msg import ActionChunk

    return ActionChunk


def make_executor(node: PolicyNode, context: Any = None) -> Any:
    """The policy node's executor: single-threaded for the data path, with the lifecycle
    services and the /diagnostics timer on side threads, so get_state, /diagnostics (progress:
    loading, warming up), the parameter services and ~/enable keep answering while a
    transition runs (configure loads and warms the model up)."""
    from pi0_ros.ros.runner import SideThreadExecutor

    return SideThreadExecutor(node.side_groups, EXECUTOR_THREADS, context=context)


def default_worker_factory(
    infer_fn: Callable, on_result: Callable, on_error: Callable, **kwargs: Any
) -> Any:
    """The engine's GPU thread (latest-only slot, results through ``on_result``)."""
    from pi0_ros.engine.worker import InferenceWorker

    return InferenceWorker(infer_fn, on_result, on_error, name="pi0-policy-node", **kwargs)


def _gpu_memory_mb() -> float | str:
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return "n/a"
    return torch.cuda.memory_allocated() / 2**20


def _empty_cuda_cache() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pi0_policy_node``:
    ``python -m pi0_ros.ros.node [--autostart] --ros-args --params-file F -p checkpoint:=DIR``
    (``ros.runner``: --autostart, clean exit on SIGINT / SIGTERM from any state)."""
    from pi0_ros.ros.runner import run_lifecycle_node

    return run_lifecycle_node(PolicyNode, NODE_NAME, "pi0 / pi0.5 policy node", argv,
                              make_executor=make_executor)


if __name__ == "__main__":
    raise SystemExit(main())
