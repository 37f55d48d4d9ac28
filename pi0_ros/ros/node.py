"""pi0_policy_node: a lifecycle node that runs a pi0 / pi0.5 policy on synchronized observations.

Data path (one observation)::

    cameras (Image / CompressedImage) + JointState      [subscription callbacks]
      -> stamp checks (zero, future, out of order); cameras converted and prepared for the model
      -> ApproximateTimeSynchronizer (sync.py)
      -> JointState -> state vector, age check            [sync callback: no inference here]
      -> worker.submit(obs): latest-only slot, newest wins      (engine/worker.py)
      -> policy.infer(obs) on the inference thread
      -> ActionChunk, JointTrajectory, planned JointState, MarkerArray   [result callback]

Lifecycle (ros2/demos ``lifecycle_py/talker.py``): parameters are declared in ``__init__``;
``on_configure`` maps them onto a frozen NodeConfig and starts the inference thread, which loads
the policy and warms it up (a CUDA graph is captured by the thread that replays it), then creates
the publishers and the input subscriptions (gated: inputs are dropped on arrival until
``on_activate``); ``on_activate`` opens the gate with a fresh synchronizer; ``on_deactivate``
closes it, gates publishing at once and makes the worker discard the pending and in-flight
observations; ``on_cleanup`` stops the thread, whose
teardown frees the model. A transition never lets an exception escape: it logs the reason and
returns FAILURE. Every rejected input is logged (rate-limited per reason) and counted on
/diagnostics. docs/NODE.md is the user's description.
"""

from __future__ import annotations

import collections
import gc
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory
from visualization_msgs.msg import MarkerArray

from pi0_ros.ros import conversions as conv
from pi0_ros.ros import viz
from pi0_ros.ros.params import NodeConfig, config_from_parameters, declare_parameters, get_param
from pi0_ros.ros.sync import make_synchronizer

NODE_NAME = "pi0_policy_node"
LOG_PERIOD = 2.0  # s between two log lines of the same rejection reason
STALE_HINT_AGE = 60.0  # s; older observations get a use_sim_time hint in the rejection
WARMUP_IMAGE_SIZE = 224  # px, square black frames used to warm the policy up
SUCCESS = TransitionCallbackReturn.SUCCESS
FAILURE = TransitionCallbackReturn.FAILURE

PolicyFactory = Callable[[NodeConfig, Sequence[str]], Any]
WorkerFactory = Callable[..., Any]


@dataclass(frozen=True)
class Observation:
    """One synchronized, converted observation on its way to the worker."""

    stamp_ns: int  # the JointState's header stamp: the chunk's time origin
    images: dict[str, Any]  # model slot -> (H, W, 3) uint8 RGB or PreparedImage
    state: np.ndarray  # (S,) float32 in joint_states.names order
    prompt: str
    received: float  # time.monotonic() when the set was complete
    epoch: int  # activation epoch; results of an older epoch are discarded


@dataclass(frozen=True)
class Frame:
    """A camera message converted on arrival; what the synchronizer queues for a camera.

    ``image`` is prepared for the model (``PreparedImage``: resized with pad, float32) when the
    policy says its input size, so that only a copy is left on the observation's critical path
    when the set completes; else the (H, W, 3) uint8 RGB array.
    """

    header: Any  # the message's header (message_filters reads header.stamp)
    image: Any
    shape: tuple[int, int]  # the camera's (H, W)


@dataclass(frozen=True)
class Result:
    obs: Observation
    actions: np.ndarray  # (H, D) float32 robot space
    timing: dict


class PolicyNode(LifecycleNode):
    """The policy lifecycle node. ``policy_factory`` / ``worker_factory`` are injectable for tests.

    ``policy_factory(config, camera_slots)`` returns an object with ``infer(obs) -> {"actions":
    (H, D)}``; ``camera_slots`` are the model slots of the configured cameras, in camera order.
    """

    def __init__(
        self,
        node_name: str = NODE_NAME,
        *,
        policy_factory: PolicyFactory | None = None,
        worker_factory: WorkerFactory | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(node_name, **kwargs)
        declare_parameters(self)
        self._policy_factory = policy_factory or default_policy_factory
        self._worker_factory = worker_factory or default_worker_factory
        self.config: NodeConfig | None = None
        self.policy: Any = None
        self._slots: tuple[str, ...] = ()
        self._image_size: int | None = None  # prepare cameras on arrival at this size
        self._model_name = ""
        self._worker: Any = None
        self._subs: list[Any] = []
        self._pubs: dict[str, Any] = {}
        self._prompt_sub: Any = None
        self._watchdog: Any = None
        self._sync: Any = None
        self._prompt = ""
        self._lock = threading.Lock()  # guards the fields below and publishing
        self._active = False
        self._epoch = 0
        self._sequence = 0
        self._last_set_stamp = -1
        self._last_stamp: list[int] = []
        self._last_receipt: list[float] = []
        self._silent: set[int] = set()
        self._topic_rates: list[viz.RateMeter] = []
        self._last_submit = -float("inf")
        self._counts: collections.Counter[str] = collections.Counter()
        self._last_log: dict[str, float] = {}
        self.last_rejection = ""
        self._latency = viz.LatencyWindow()
        self._input_rate = viz.RateMeter()
        self._output_rate = viz.RateMeter()
        self._mixed_sizes_logged = False
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(1.0, self._publish_diagnostics)

    # --------------------------------------------------------------------------------------
    # lifecycle

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            config = config_from_parameters(lambda name: get_param(self, name))
        except ValueError as exc:
            self.get_logger().error(f"configure failed: invalid parameter: {exc}")
            return FAILURE
        try:
            self._configure(config)
        except Exception as exc:  # a transition never lets an exception escape
            self.get_logger().error(f"configure failed: {type(exc).__name__}: {exc}")
            try:
                self._release()
            except Exception as cleanup_exc:
                self.get_logger().error(f"releasing after the failed configure: {cleanup_exc}")
            return FAILURE
        self.get_logger().info(
            f"configured: {self._model_name} on {len(config.cameras)} camera(s) "
            f"{[c.topic for c in config.cameras]} -> slots {list(self._slots)}, "
            f"{len(config.action_joint_names)} action dims, dt {config.action_dt} s"
        )
        return SUCCESS

    def _configure(self, config: NodeConfig) -> None:
        chunk_type = _action_chunk_type()  # fails fast when pi0_ros_msgs is not built
        self.config = config
        # The worker thread owns the model from here to cleanup: setup (load, warm up, capture)
        # runs ON it, because a CUDA-graph backend must be replayed by the thread that captured
        # it. start() re-raises a setup failure and leaves no thread behind.
        self._worker = self._worker_factory(
            self._infer,
            self._on_result,
            self._on_error,
            setup=lambda: self._load(config),
            teardown=self._unload,
        )
        try:
            self._worker.start()
        except RuntimeError as exc:
            self._worker = None
            raise (exc.__cause__ or exc) from None
        depth = config.output_depth
        self._pubs = {
            "chunk": self.create_lifecycle_publisher(chunk_type, "~/action_chunk", depth),
            "trajectory": self.create_lifecycle_publisher(JointTrajectory, "~/trajectory", depth),
            "planned": self.create_lifecycle_publisher(
                JointState, "~/planned_joint_states", depth
            ),
            "markers": self.create_lifecycle_publisher(MarkerArray, "~/markers", depth),
        }
        self._prompt = config.prompt
        self._prompt_sub = self.create_subscription(String, "~/prompt", self._on_prompt, 10)
        self._create_inputs(config)
        self.destroy_timer(self._diag_timer)
        self._diag_timer = self.create_timer(config.diagnostics_period, self._publish_diagnostics)

    def _load(self, config: NodeConfig) -> None:
        """Worker thread: build the policy, resolve camera slots, warm up."""
        slots = tuple(c.slot for c in config.cameras)
        self.policy = self._policy_factory(config, slots)
        if not all(slots):  # unset slots: the checkpoint's slots in order
            model_slots = _model_slots(self.policy)
            if len(model_slots) < len(slots):
                raise ValueError(
                    f"{len(slots)} cameras configured but the checkpoint has only "
                    f"{len(model_slots)} camera slots {list(model_slots)}"
                )
            slots = tuple(s or model_slots[i] for i, s in enumerate(slots))
        self._slots = slots
        self._model_name = str(getattr(self.policy, "model_name", "")) or _model_name(config)
        self._image_size = _model_image_size(self.policy)
        self._warm_up(config)

    def _unload(self) -> None:
        """Worker thread (teardown): drop the policy and give its GPU memory back."""
        policy, self.policy = self.policy, None
        close = getattr(policy, "close", None)
        if callable(close):
            close()
        del policy
        gc.collect()
        _empty_cuda_cache()

    def _warm_up(self, config: NodeConfig) -> None:
        """Run the policy on black frames; checks the output shape against the parameters."""
        images = {
            slot: np.zeros((WARMUP_IMAGE_SIZE, WARMUP_IMAGE_SIZE, 3), np.uint8)
            for slot in self._slots
        }
        state = np.zeros(len(config.state_joint_names), np.float32)
        for _ in range(max(config.model.warmup, 1)):  # at least one: it checks the shapes
            out = self.policy.infer(policy_observation(images, state, config.prompt))
        actions = np.asarray(out["actions"])
        dims = len(config.action_joint_names)
        if actions.ndim != 2 or actions.shape[1] != dims or not np.all(np.isfinite(actions)):
            raise ValueError(
                f"policy outputs actions of shape {list(actions.shape)} but actions.joint_names "
                f"has {dims} names (checkpoint and parameters do not match)"
            )

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._activate()
        except Exception as exc:
            self.get_logger().error(f"activate failed: {type(exc).__name__}: {exc}")
            self._deactivate()
            return FAILURE
        self.get_logger().info("active: inputs accepted, inference running")
        return super().on_activate(state)

    def _activate(self) -> None:
        config = self.config
        assert config is not None and self._worker is not None
        n = len(config.cameras) + 1
        sync = make_synchronizer(n, config.sync_queue_size, config.sync_slop)
        sync.register_callback(self._on_synchronized)
        now = time.monotonic()
        with self._lock:
            self._sync = sync
            self._epoch += 1
            self._last_stamp = [-1] * n
            self._last_receipt = [now] * n
            self._topic_rates = [viz.RateMeter() for _ in range(n)]
            self._silent = set()
            self._last_set_stamp = -1
            self._last_submit = -float("inf")
            self._active = True

    def _create_inputs(self, config: NodeConfig) -> None:
        """Input subscriptions and the silence watchdog, created once per configure.

        They live until cleanup and are gated by ``_active`` (inputs are dropped on arrival
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
        with self._lock:  # after this no result is published (see _on_result)
            self._active = False
            self._epoch += 1
            self._sync = None
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

    def _release(self) -> None:
        """Stop the worker (its teardown frees the model on its thread) and the publishers."""
        worker, self._worker = self._worker, None
        if worker is not None:
            try:
                worker.stop()
            except Exception as exc:  # TimeoutError: an inference is stuck; the thread is a daemon
                self.get_logger().error(f"stopping the inference thread: {exc}")
        if self.policy is not None:  # setup failed after the policy was built
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

    def stop(self) -> None:
        """Stop the worker and free the model whatever the state (used by main on exit)."""
        self._deactivate()
        self._release()

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
        if not msg.data.strip():
            self._reject(
                "empty_prompt", f"ignored empty prompt on ~/prompt; keeping '{self._prompt}'"
            )
            return
        self._prompt = msg.data
        self.get_logger().info(f"prompt set to '{msg.data}'")

    def _on_input(self, index: int, msg: Any) -> None:
        """Subscription callback: stamp checks, then the synchronizer. Nothing heavy here."""
        config, sync = self.config, self._sync
        if config is None or sync is None or not self._active:
            return
        topic = self._topic(index)
        stamp = conv.stamp_to_ns(msg.header.stamp)
        if stamp == 0:
            self._reject("zero_stamp", f"{topic}: message with a zero stamp")
            return
        now_ns = self.get_clock().now().nanoseconds
        skew = stamp - now_ns
        if skew > config.max_clock_skew * 1e9:
            self._reject(
                "future_stamp",
                f"{topic}: stamp {skew / 1e9:.3f} s in the future (max_clock_skew "
                f"{config.max_clock_skew} s)",
            )
            return
        with self._lock:
            last = self._last_stamp[index]
            out_of_order = stamp <= last
            back = not out_of_order and index in self._silent
            if not out_of_order:
                self._last_stamp[index] = stamp
                self._last_receipt[index] = time.monotonic()
                self._topic_rates[index].tick(self._last_receipt[index])
                self._silent.discard(index)
        if back:
            self.get_logger().info(f"{topic} is back: inference resumes")
        if out_of_order:
            self._reject(
                "stamp_out_of_order",
                f"{topic}: stamp {stamp / 1e9:.6f} not newer than the previous {last / 1e9:.6f}",
            )
            return
        if index < len(config.cameras):
            msg = self._frame(msg, topic)
            if msg is None:
                return
        sync.add(index, stamp, msg)

    def _frame(self, msg: Any, topic: str) -> Frame | None:
        """Camera message -> Frame (converted, and prepared for the model when possible)."""
        try:
            rgb = _convert_image(msg, topic)
            image = rgb
            if self._image_size is not None:
                image = _prepare(rgb, self._image_size, topic)
        except conv.ConversionError as exc:
            self._reject(exc.reason, str(exc))
            return None
        return Frame(msg.header, image, rgb.shape[:2])

    def _on_synchronized(self, *msgs: Any) -> None:
        """Sync callback: convert, stamp, hand to the worker's latest-only slot."""
        config = self.config
        if config is None or not self._active:
            return
        received = time.monotonic()
        joint_msg = msgs[-1]
        stamp = conv.stamp_to_ns(joint_msg.header.stamp)
        with self._lock:
            if stamp <= self._last_set_stamp:
                stale_set = True
            else:
                stale_set = False
                self._last_set_stamp = stamp
            epoch = self._epoch
        if stale_set:
            self._reject("stamp_out_of_order", "synchronized set not newer than the last one")
            return
        age = (self.get_clock().now().nanoseconds - stamp) / 1e9
        if age > config.max_input_age:
            hint = ""
            if age > STALE_HINT_AGE:
                hint = (" (stamps far in the past: a recorded bag? run the node with "
                        "use_sim_time:=true and play the bag with /clock)")
            self._reject(
                "stale_input",
                f"observation is {age:.3f} s old > max_input_age {config.max_input_age} s{hint}",
            )
            return
        frames: tuple[Frame, ...] = msgs[:-1]
        try:
            state = conv.joint_state_to_vector(joint_msg, config.state_joint_names)
        except conv.ConversionError as exc:
            self._reject(exc.reason, str(exc))
            return
        images = {self._slots[i]: frame.image for i, frame in enumerate(frames)}
        self._note_sizes({self._slots[i]: frame.shape for i, frame in enumerate(frames)})
        self._input_rate.tick(received)
        if config.min_period and received - self._last_submit < config.min_period:
            self._count("rate_limited")
            return
        self._last_submit = received
        obs = Observation(stamp, images, state, self._prompt, received, epoch)
        worker = self._worker
        if worker is not None and worker.submit(obs):
            self._count("dropped_observations")

    def _note_sizes(self, sizes: dict[str, tuple[int, int]]) -> None:
        if len(set(sizes.values())) > 1:
            self._count("mixed_camera_sizes")
            if not self._mixed_sizes_logged:
                self._mixed_sizes_logged = True
                self.get_logger().info(
                    f"cameras have different sizes {sizes}; each is resized with padding to the "
                    "model's square input independently"
                )

    def _check_silence(self) -> None:
        """Watchdog timer: an input silent for longer than max_input_age pauses inference."""
        config = self.config
        if config is None or not self._active:
            return
        now = time.monotonic()
        with self._lock:  # recovery is noticed by _on_input as soon as a message arrives
            ages = [now - t for t in self._last_receipt]
            newly = [
                i for i, age in enumerate(ages)
                if age > config.max_input_age and i not in self._silent
            ]  # fmt: skip
            self._silent.update(newly)
        for i in newly:
            self._count("input_silent_events")
            self.get_logger().warning(
                f"{self._topic(i)} silent for {ages[i]:.2f} s > max_input_age "
                f"{config.max_input_age} s: inference paused"
            )

    # --------------------------------------------------------------------------------------
    # the worker side (GPU thread) and outputs

    def _infer(self, obs: Observation) -> Result:
        """Runs on the worker thread."""
        policy = self.policy
        if policy is None:
            raise RuntimeError("no policy loaded")
        out = policy.infer(policy_observation(obs.images, obs.state, obs.prompt))
        actions = np.asarray(out["actions"], dtype=np.float32)
        return Result(obs, actions, dict(out.get("policy_timing", {})))

    def _on_result(self, delivered: Any) -> None:
        """Worker thread, under the worker's delivery lock: validate, build, publish."""
        result: Result = delivered.result
        config, obs, actions = self.config, result.obs, result.actions
        if config is None:
            return
        names = config.action_joint_names
        if actions.ndim != 2 or actions.shape[0] == 0 or actions.shape[1] != len(names):
            self._reject("bad_output", f"policy returned actions of shape {list(actions.shape)}")
            return
        if not np.all(np.isfinite(actions)):
            self._reject("nonfinite_output", "policy returned NaN/Inf actions; chunk dropped")
            return
        now = time.monotonic()
        now_ns = self.get_clock().now().nanoseconds
        latency = now - obs.received
        chunk = conv.chunk_to_msg(
            actions,
            stamp_ns=obs.stamp_ns,
            dt=config.action_dt,
            joint_names=names,
            inference_latency=latency,
            model_name=self._model_name,
        )
        trajectory = conv.chunk_to_trajectory(
            actions, stamp_ns=obs.stamp_ns, dt=config.action_dt, joint_names=names
        )
        planned = viz.planned_joint_state(actions, names, config.viz.lookahead, stamp_ns=now_ns)
        with self._lock:  # a deactivate that returned before this point wins
            if not self._active or obs.epoch != self._epoch or not self._pubs:
                self._counts["discarded_results"] += 1
                return
            self._sequence += 1
            chunk.sequence = self._sequence
            if not self._publish(("chunk", chunk), ("trajectory", trajectory),
                                 ("planned", planned)):
                return
        self._latency.add(latency)
        self._output_rate.tick(now)
        text = viz.status_text(latency, self._output_rate.rate(now), chunk.sequence)
        markers = viz.chunk_markers(
            actions,
            path_indices=config.viz.path_indices,
            frame_id=config.viz.frame_id,
            stamp_ns=now_ns,
            text=text,
        )
        with self._lock:
            if self._active and self._pubs:
                self._publish(("markers", markers))

    def _publish(self, *outputs: tuple[str, Any]) -> bool:
        """Publish (key, message) pairs; False, quietly, when the process is shutting down.

        SIGINT / SIGTERM shut the context down at once (rclpy's signal handler), before main()
        stops the inference thread: a result finished in that window must not end in a
        traceback. Any other publishing error propagates (counted as publish_error)."""
        try:
            for key, msg in outputs:
                self._pubs[key].publish(msg)
        except Exception:
            if self.context.ok():
                raise
            return False
        return True

    def _on_error(self, exc: BaseException, info: Any = None) -> None:
        """Worker thread: the policy (or publishing) raised; the worker keeps serving."""
        where = getattr(info, "where", "infer")
        if where == "setup":
            return  # start() re-raises it: on_configure logs the reason and fails
        reason = {"infer": "inference_error", "on_result": "publish_error"}.get(where, where)
        self._reject(reason, f"{where} failed: {type(exc).__name__}: {exc}")

    # --------------------------------------------------------------------------------------
    # bookkeeping and diagnostics

    def _topic(self, index: int) -> str:
        config = self.config
        if config is None:
            return f"input {index}"
        if index < len(config.cameras):
            return config.cameras[index].topic
        return config.joint_states_topic

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _reject(self, reason: str, text: str) -> None:
        """Count a rejected input or output under ``reason`` and log it (rate-limited)."""
        now = time.monotonic()
        with self._lock:
            self._counts[f"rejected.{reason}"] += 1
            self.last_rejection = f"{reason}: {text}"
            last = self._last_log.get(reason, -float("inf"))
            log = now - last >= LOG_PERIOD
            if log:
                self._last_log[reason] = now
        if log:
            self.get_logger().warning(f"rejected ({reason}): {text}")

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def diagnostics(self) -> tuple[bytes, str, dict[str, object]]:
        """(level, message, values) of the node's DiagnosticStatus."""
        now = time.monotonic()
        state = self.lifecycle_state()
        with self._lock:
            counts = dict(self._counts)
            silent = [self._topic(i) for i in sorted(self._silent)]
            seq = self._sequence
            active = self._active
        values: dict[str, object] = {"lifecycle_state": state, "chunks_published": seq}
        lat = self._latency.summary()
        if lat is not None:
            values.update(
                latency_p50_ms=lat[0] * 1e3,
                latency_p95_ms=lat[1] * 1e3,
                latency_max_ms=lat[2] * 1e3,
            )
        values["input_rate_hz"] = self._input_rate.rate(now)  # synchronized sets
        for i, meter in enumerate(self._topic_rates):
            values[f"input_rate_hz.{self._topic(i)}"] = meter.rate(now)
        values["output_rate_hz"] = self._output_rate.rate(now)
        values["dropped_observations"] = counts.get("dropped_observations", 0)
        worker = self._worker
        if worker is not None:
            stats = worker.stats
            for key in ("dropped", "discarded", "delivered", "errors", "callback_errors"):
                values[f"worker_{key}"] = stats.get(key, 0)
            run_ms = stats.get("mean_ms", {}).get("run")
            if run_ms is not None:
                values["worker_mean_run_ms"] = float(run_ms)
        values.update({k: v for k, v in sorted(counts.items()) if k != "dropped_observations"})
        values["gpu_memory_mb"] = _gpu_memory_mb()
        values["last_rejection"] = self.last_rejection
        if silent:
            return DiagnosticStatus.ERROR, f"inference paused: silent input(s) {silent}", values
        if active and counts.get("rejected.inference_error", 0):
            return DiagnosticStatus.WARN, "inference errors occurred", values
        return DiagnosticStatus.OK, state, values

    def _publish_diagnostics(self) -> None:
        if not self.context.ok():  # shutting down (SIGINT / SIGTERM)
            return
        level, message, values = self.diagnostics()
        self._diag_pub.publish(
            viz.diagnostics_message(
                name=f"{self.get_name()}: policy",
                hardware_id=self._model_name or "pi0",
                level=level,
                message=message,
                values=values,
                stamp_ns=self.get_clock().now().nanoseconds,
            )
        )


# ------------------------------------------------------------------------------------------
# helpers


def policy_observation(images: dict[str, np.ndarray], state: np.ndarray, prompt: str) -> dict:
    """The dict handed to ``Policy.infer``: images keyed by model slot, state, prompt."""
    return {**images, "state": state, "prompt": prompt}


def _convert_image(msg: Any, topic: str) -> np.ndarray:
    try:
        return conv.to_rgb(msg)
    except conv.ConversionError as exc:
        raise conv.ConversionError(exc.reason, f"{topic}: {exc}") from exc


def _prepare(rgb: np.ndarray, size: int, topic: str) -> Any:
    from pi0_ros.processing import PreparedImage

    try:
        return PreparedImage.from_uint8(rgb, size, topic)
    except ValueError as exc:  # e.g. an aspect ratio too extreme to resize with pad
        raise conv.ConversionError("image_geometry", f"{topic}: {exc}") from exc


def _model_image_size(policy: Any) -> int | None:
    """The policy's square input size when it accepts prepared images (pi0_ros.policy.Policy)."""
    size = getattr(getattr(policy, "settings", None), "image_size", None)
    if size is None:
        return None
    try:
        from pi0_ros.processing import PreparedImage  # noqa: F401
    except ImportError:
        return None
    return int(size)


def _model_name(config: NodeConfig) -> str:
    import os

    return os.path.basename(os.path.normpath(config.model.checkpoint))


def _action_chunk_type() -> Any:
    from pi0_ros_msgs.msg import ActionChunk

    return ActionChunk


def _resolve_model(config: NodeConfig) -> tuple[str, str, str]:
    device, dtype, backend = config.model.device, config.model.dtype, config.model.backend
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = device.startswith("cuda")
    if dtype == "auto":
        dtype = "bfloat16" if on_cuda else "float32"
    if backend == "auto":
        backend = "cuda_graph" if on_cuda else "eager"
    return device, dtype, backend


def default_policy_factory(config: NodeConfig, camera_slots: Sequence[str]) -> Any:
    """Load ``pi0_ros.policy.Policy`` from the checkpoint named by the parameters.

    Observations are keyed by model slot (``input_keys="slots"``: slot names, "state",
    "prompt"); slots no configured camera feeds are black with mask False.
    """
    from pi0_ros.policy import Policy

    device, dtype, backend = _resolve_model(config)
    model = config.model
    return Policy(
        model.checkpoint,
        device=device,
        dtype=dtype,
        backend=backend,
        num_steps=model.num_steps,
        norm_stats=model.norm_stats or None,
        tokenizer=model.tokenizer or None,
        cameras={s: s for s in camera_slots} if all(camera_slots) else None,
        input_keys="slots",
    )


def _model_slots(policy: Any) -> tuple[str, ...]:
    slots = getattr(policy, "camera_slots", None)
    if slots is None:
        slots = getattr(getattr(policy, "cameras", None), "slots", ())
    return tuple(slots)


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

    return run_lifecycle_node(PolicyNode, NODE_NAME, "pi0 / pi0.5 policy node", argv)


if __name__ == "__main__":
    raise SystemExit(main())
