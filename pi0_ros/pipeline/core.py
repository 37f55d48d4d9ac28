"""The policy pipeline: sensor messages in, a checked action chunk out. One implementation, driven
by the live node (``ros/node.py``), the offline replay (``tools/replay.py``) and any server.

    messages ──on_input──> gate (zero / future / out-of-order stamp; receipt; silence recovery)
                           cameras converted and prepared for the model on arrival
             ──sync──────> approximate-time set ──assemble──> silent / stale / state / rate
                                                     ──> Observation (noise for its stamp)
    sink(obs)            the caller's: the node's latest-only GPU worker, the replay's loop
    infer(obs) -> Chunk  on the inference thread: policy.infer with the observation's noise
    accept(chunk)        bad / non-finite output; latency, rate, sequence

Nothing here imports rclpy: the caller injects its clock (``clock() -> ns``: the node's ROS clock,
so sim time works; the replay's bag time), the message converters (``ros/conversions.py``), the
synchronizer factory and the observation sink. Every rejected input is counted under one reason
name (``REASONS``) and logged rate-limited; ``diagnostics()`` gives the same level, message and
values to the node's /diagnostics and the replay's report.

Noise: the initial noise of an observation is drawn from ``(model.seed, observation stamp)``, so
two runs that infer the same observation draw the same noise, whichever observations a live run
skipped while it was busy (the live-vs-replay parity test relies on it).

Real-time chunking (``rtc.enabled``, ``model/rtc.py``): every accepted chunk's latency
(observation stamp -> accepted, on the caller's clock, plus ``delivery_delay`` s to the executor)
feeds a ``DelayEstimator``; each inference gets d (the latency percentile at ``actions.dt``) and
the previous accepted chunk's normalized actions aligned to its stamp, and its chunk carries d
(``Chunk.rtc_delay``, the ActionChunk's ``rtc_delay``) for the executor's ``rtc`` strategy.

Size (~680 lines, over the house's ~600): one class whose gate, assembly, result checks and
counters share one lock and one set of per-activation state; splitting it would spread that
lock's invariants over files.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .config import NodeConfig, check_prompt, printable
from ..model.rtc import DelayEstimator, align_prefix
from ..stats import LatencyWindow, RateMeter

log = logging.getLogger(__name__)

LOG_PERIOD_S = 2.0  # between two log lines of the same rejection reason
LOG_TEXT_CHARS = 400  # a rejection's text is cut to this (and control characters escaped)
STALE_HINT_AGE_S = 60.0  # older observations get a use_sim_time hint in the rejection
WARMUP_IMAGE_SIZE = 224  # px, square black frames used to warm the policy up
NO_OUTPUT_WARN_S = 3.0  # active this long without a chunk -> WARN naming the top rejection
OK, WARN, ERROR = 0, 1, 2  # diagnostic levels (diagnostic_msgs/DiagnosticStatus values)

# Every rejection reason, the one name the node, the replay and the docs use.
REASONS = {
    "zero_stamp": "an input message with a zero header stamp",
    "future_stamp": "a stamp further in the future than max_clock_skew",
    "stamp_out_of_order": "a stamp not newer than the previous one of the same input / set",
    "input_silent": "a set completed while an input had been silent for > max_input_age",
    "stale_input": "a set older than max_input_age when it completed",
    "empty_prompt": "an empty prompt on ~/prompt (the previous one is kept)",
    "prompt_too_long": "a prompt longer than max_prompt_length characters",
    "prompt_truncated": "a prompt whose tokens exceed the model's max_token_len: refused, as "
                        "truncation would cut a pi0.5 prompt's state out",
    "disabled": "a synchronized set while enabled is false (paused without a transition)",
    "bad_output": "the policy returned actions of the wrong shape",
    "nonfinite_output": "the policy returned NaN / Inf actions",
    "inference_error": "the policy raised",
    "publish_error": "building or publishing the outputs raised",
    # conversion reasons (ros/conversions.ConversionError.reason) are used as they are:
    # encoding, image_geometry, decode, missing_joint, nonfinite_state, ...
}


class PolicyLike(Protocol):
    """What the pipeline needs of a policy (``pi0_ros.policy.Policy``, a remote one, a fake)."""

    model_name: str
    camera_slots: tuple[str, ...]  # the model's camera slots, in order
    noise_shape: tuple[int, int] | None  # (H, A) of the initial noise; None: no noise input
    state_dim: int | None  # robot state dims the model expects (None: not known here)
    rtc: Any  # its RTCConfig when it runs real-time chunking, else None

    def prompt_fit(self, prompt: str, state: np.ndarray) -> tuple[int, int, bool] | None:
        """(tokens of the prompt with this state, the model's max, whether the state follows
        the task in the prompt); None when the policy cannot tell (a remote one)."""

    def prepare_image(self, rgb: np.ndarray, name: str) -> Any: ...

    def infer(self, obs: Mapping[str, Any], noise: Any = None) -> Mapping[str, Any]: ...

    def status(self) -> dict[str, Any]: ...  # "state", "connected" (False: WARN), details

    def close(self) -> None: ...


class Rejection(ValueError):
    """An input the pipeline refuses, with its reason name (converters raise it too)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Frame:
    """A camera message converted (and prepared for the model) on arrival."""

    header: Any  # the message's header: message_filters reads header.stamp
    image: Any  # prepared image (policy.prepare_image) or (H, W, 3) uint8
    shape: tuple[int, int]  # the camera's (H, W)


@dataclass(frozen=True)
class Observation:
    stamp_ns: int  # the joint state's stamp: the chunk's time origin
    images: dict[str, Any]  # model slot -> prepared image
    state: np.ndarray  # (S,) float32 in joint_states.names order
    prompt: str
    noise: np.ndarray | None  # (H, A) float32, from (seed, stamp)
    received: float  # monotonic s when the set completed (latency origin)
    epoch: int  # activation epoch; results of an older epoch are discarded
    input_stamps: tuple[int, ...] = ()  # each camera's stamp, then the joint state's


@dataclass(frozen=True)
class Chunk:
    obs: Observation
    actions: np.ndarray  # (H, D) float32 robot space
    timing: dict = field(default_factory=dict)
    latency: float = 0.0  # s, set completed -> result accepted
    sequence: int = 0
    normalized: np.ndarray | None = None  # RTC: (H, A) float32 raw model output
    rtc_delay: int = 0  # RTC: d, the actions the prefix assumed executed from the last chunk


def policy_observation(images: Mapping[str, Any], state: np.ndarray, prompt: str) -> dict:
    """The dict handed to ``policy.infer``: images keyed by model slot, state, prompt."""
    return {**images, "state": state, "prompt": prompt}


def noise_for(seed: int, stamp_ns: int, shape: tuple[int, int] | None) -> np.ndarray | None:
    """The initial noise of the observation stamped ``stamp_ns`` (float32 standard normal)."""
    if shape is None:
        return None
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(stamp_ns) & 0xFFFFFFFFFFFFFFFF])
    return rng.standard_normal(shape, dtype=np.float32)


def resolve_slots(configured: Sequence[str], model_slots: Sequence[str]) -> tuple[str, ...]:
    """Configured camera slots with unset ones ("") taken from the checkpoint's, in order."""
    if len(model_slots) < len(configured):
        raise ValueError(f"{len(configured)} cameras configured but the checkpoint has only "
                         f"{len(model_slots)} camera slots {list(model_slots)}")
    slots = tuple(s or model_slots[i] for i, s in enumerate(configured))
    unknown = [s for s in slots if s not in model_slots]
    if unknown:
        raise ValueError(f"cameras.slots: {unknown} are not camera slots of the checkpoint "
                         f"{list(model_slots)}")
    if len(set(slots)) != len(slots):
        raise ValueError(f"cameras.slots: two cameras feed one slot: {list(slots)}")
    return slots


class PolicyPipeline:
    """Gate, synchronization, assembly, inference, result checks and bookkeeping of one node.

    ``clock()``: the caller's time in ns (ROS clock / bag time) for stamps, ages, silence and
    rates; ``monotonic()``: seconds, for latencies. ``image_of(msg) -> (H, W, 3) uint8`` and
    ``state_of(msg, names) -> (S,) float32`` convert messages (raising a ValueError with a
    ``reason``); ``make_sync(n, queue_size, slop)`` builds the synchronizer; ``sink(obs)`` takes
    each observation. Thread-safe: inputs, the worker thread and diagnostics may interleave.
    """

    def __init__(self, config: NodeConfig, *, clock: Callable[[], int],
                 image_of: Callable[[Any], np.ndarray],
                 state_of: Callable[[Any, Sequence[str]], np.ndarray],
                 make_sync: Callable[[int, int, float], Any],
                 sink: Callable[[Observation], Any] = lambda obs: None,
                 monotonic: Callable[[], float] = time.monotonic,
                 logger: Any = None, topics: Sequence[str] | None = None) -> None:
        self.config = config
        self.clock, self.monotonic = clock, monotonic
        self._image_of, self._state_of, self._make_sync = image_of, state_of, make_sync
        self.sink = sink
        self.log = logger or log
        self.n_inputs = len(config.cameras) + 1
        self.topics = tuple(topics or [c.topic for c in config.cameras]
                            + [config.joint_states_topic])
        self.lock = threading.RLock()  # guards everything below and the caller's publishing
        self.policy: PolicyLike | None = None
        self.slots: tuple[str, ...] = ()
        self.prompt = config.prompt
        self.enabled = config.enabled  # live: False pauses inference (the gate stays open)
        self.min_period = config.min_period  # live (max_rate)
        self.active = False
        self.epoch = 0
        self.sequence = 0
        self.sync: Any = None
        self._counts: collections.Counter[str] = collections.Counter()
        self._last_log: dict[str, float] = {}
        self.last_rejection = ""
        self.latency = LatencyWindow()
        self.input_rate = RateMeter()
        self.output_rate = RateMeter()
        self._topic_rates = [RateMeter() for _ in range(self.n_inputs)]
        self._mixed_sizes_logged = False
        # Real-time chunking: latencies -> d, the last accepted chunk (stamp, normalized).
        self.rtc = config.rtc if config.rtc.enabled else None
        self.delays: DelayEstimator | None = None
        self.delivery_delay = 0.0  # s from accept to the executor (the replay's --latency)
        self._rtc_prev: tuple[int, np.ndarray] | None = None
        self._rtc_last_delay = 0
        self._reset_inputs(self.clock())

    # -- policy ---------------------------------------------------------------------------------
    def bind(self, policy: PolicyLike) -> None:
        """Resolve the camera slots against the policy's and warm it up (checks its output)."""
        slots = resolve_slots([c.slot for c in self.config.cameras], policy.camera_slots)
        names = self.config.state_joint_names
        expected = policy.state_dim
        if expected is not None and expected != len(names):
            raise ValueError(f"joint_states.names has {len(names)} names {list(names)} but the "
                             f"checkpoint's state has {expected} dims: list the {expected} joints "
                             "the model was trained on, in its order")
        if self.rtc is not None:
            if policy.rtc is None or policy.noise_shape is None:
                raise ValueError("rtc.enabled: the policy runs without real-time chunking "
                                 "(load it with rtc=RTCConfig(enabled=True))")
            self.delays = DelayEstimator(self.rtc, policy.noise_shape[0])
        self.policy, self.slots = policy, slots
        self.check_prompt_tokens(self.prompt)
        try:
            self.warm_up()
        except ValueError as exc:
            if "state" not in str(exc):
                raise
            raise ValueError(f"warm-up with a {len(names)}-dim state (joint_states.names "
                             f"{list(names)}) failed: {exc}") from exc

    def warm_up(self) -> None:
        """``model.warmup`` inferences (at least one: it checks the output) on black frames,
        zero state and zero noise, through the same image preparation as live frames."""
        policy, config = self.policy, self.config
        black = np.zeros((WARMUP_IMAGE_SIZE, WARMUP_IMAGE_SIZE, 3), np.uint8)
        images = {slot: policy.prepare_image(black, slot) for slot in self.slots}
        state = np.zeros(len(config.state_joint_names), np.float32)
        shape = policy.noise_shape
        noise = None if shape is None else np.zeros(shape, np.float32)
        for _ in range(max(config.model.warmup, 1)):
            out = policy.infer(policy_observation(images, state, self.prompt), noise=noise)
        actions = np.asarray(out["actions"])
        dims = len(config.action_joint_names)
        if actions.ndim != 2 or actions.shape[1] != dims:
            raise ValueError(f"policy outputs actions of shape {list(actions.shape)} but "
                             f"actions.joint_names has {dims} names (checkpoint and parameters "
                             "do not match)")
        if not np.all(np.isfinite(actions)):
            raise ValueError("the policy's warm-up output is not finite (NaN / Inf actions on "
                             "black frames and a zero state): the checkpoint's weights or norm "
                             "stats hold non-finite values?")

    # -- activation -----------------------------------------------------------------------------
    def start(self) -> int:
        """Open the gate with a fresh synchronizer; returns the new epoch."""
        sync = self._make_sync(self.n_inputs, self.config.sync_queue_size, self.config.sync_slop)
        sync.register_callback(self._on_set)
        with self.lock:
            self.sync = sync
            self.epoch += 1
            self._reset_inputs(self.clock())
            self._active_since = self.clock()
            self.active = True
            return self.epoch

    def stop(self) -> None:
        """Close the gate; results of the current epoch are no longer current."""
        with self.lock:
            self.active = False
            self.epoch += 1
            self.sync = None
            self._rtc_prev = None  # nothing of this epoch is executed any more

    def _reset_inputs(self, now: int) -> None:
        n = self.n_inputs
        self._last_stamp = [-1] * n
        self._last_receipt: list[int | None] = [None] * n  # None: nothing since activation
        self._silent: set[int] = set()
        self._last_set_stamp = -1
        self._last_submit: int | None = None
        self._last_now = now
        self._active_since = now
        self._last_chunk_at: int | None = None

    # -- inputs ---------------------------------------------------------------------------------
    def set_prompt(self, text: str) -> bool:
        """A new prompt (``~/prompt``, ``ros2 param set``); False (counted, logged) when it is
        empty, too long, or would be cut by the tokenizer; the previous one is kept."""
        if not text.strip():
            self.reject("empty_prompt", f"ignored an empty prompt; keeping '{self.prompt}'")
            return False
        try:
            check_prompt(text, self.config.max_prompt_length)  # before tokenizing 1M chars
        except ValueError as exc:
            self.reject("prompt_too_long", f"{exc}; keeping the previous prompt")
            return False
        try:
            self.check_prompt_tokens(text)
        except ValueError as exc:
            self.reject("prompt_truncated", f"{exc}; keeping the previous prompt")
            return False
        with self.lock:
            self.prompt = text
        return True

    def check_prompt_tokens(self, text: str) -> None:
        """ValueError when the model would see ``text`` truncated: the policy's tokenizer
        (``n_tokens`` / ``max_len``; pi0.5 counted with 3-digit state bins) must fit it whole,
        else pi0.5 silently loses the state that follows the task in its prompt."""
        state = np.full(len(self.config.state_joint_names), 0.999)  # widest bins ("255")
        fit = self.policy.prompt_fit(text, state)
        if fit is None:
            return
        n, max_len, with_state = fit
        if n > max_len:
            what = "and the state after it " if with_state else ""
            raise ValueError(f"prompt: {n} tokens > the model's max_token_len {max_len}: the "
                             f"prompt {what}would be cut (starts '{printable(text, 40)}')")

    def set_enabled(self, enabled: bool) -> None:
        """Pause (False) or resume inference without a lifecycle transition."""
        with self.lock:
            self.enabled = bool(enabled)
            self._active_since = self.clock()  # no 'no chunk' warning for the paused time
            self._last_chunk_at = None

    def set_max_rate(self, hz: float) -> None:
        if not hz >= 0.0:
            raise ValueError(f"max_rate must be >= 0 (0 = unlimited), got {hz}")
        with self.lock:
            self.min_period = 1.0 / hz if hz > 0 else 0.0

    def on_input(self, index: int, stamp_ns: int, msg: Any) -> bool:
        """One camera (index < n-1) or joint-state (n-1) message; True when it reached the
        synchronizer. Cameras are converted and prepared here, on arrival."""
        config, sync = self.config, self.sync
        if sync is None or not self.active:
            return False
        topic = self.topics[index]
        if stamp_ns == 0:
            self.reject("zero_stamp", f"{topic}: message with a zero stamp")
            return False
        now = self.clock()
        skew = stamp_ns - now
        if skew > config.max_clock_skew * 1e9:
            self.reject("future_stamp", f"{topic}: stamp {skew / 1e9:.3f} s in the future "
                                        f"(max_clock_skew {config.max_clock_skew} s)")
            return False
        with self.lock:
            if now < self._last_now - config.max_input_age * 1e9:
                # The clock went back (a looping bag, a simulator reset): start over rather than
                # rejecting every input as out of order until a re-activation.
                self._counts["clock_jumps_back"] += 1
                self.log.warning(f"clock jumped back by {(self._last_now - now) / 1e9:.3f} s: "
                                 "input history reset")
                self._reset_inputs(now)
                sync = self.sync = self._restart_sync()
            self._last_now = max(self._last_now, now)
            last = self._last_stamp[index]
            out_of_order = stamp_ns <= last
            back = not out_of_order and index in self._silent
            if not out_of_order:
                self._last_stamp[index] = stamp_ns
                self._last_receipt[index] = now
                self._topic_rates[index].tick(now / 1e9)
                self._silent.discard(index)
        if back:
            self.log.info(f"{topic} is back: inference resumes")
        if out_of_order:
            self.reject("stamp_out_of_order", f"{topic}: stamp {stamp_ns / 1e9:.6f} not newer "
                                              f"than the previous {last / 1e9:.6f}")
            return False
        if index < len(config.cameras):
            msg = self._frame(msg, topic)
            if msg is None:
                return False
        sync.add(index, stamp_ns, msg)
        return True

    def _restart_sync(self) -> Any:
        sync = self._make_sync(self.n_inputs, self.config.sync_queue_size, self.config.sync_slop)
        sync.register_callback(self._on_set)
        return sync

    def _frame(self, msg: Any, topic: str) -> Frame | None:
        try:
            rgb = self._image_of(msg)
            image = self.policy.prepare_image(rgb, topic)
        except ValueError as exc:
            self.reject(getattr(exc, "reason", "image_geometry"), f"{topic}: {exc}")
            return None
        return Frame(msg.header, image, tuple(rgb.shape[:2]))

    def _on_set(self, *msgs: Any) -> None:
        """Synchronizer callback: a complete set -> an Observation for the sink."""
        obs = self.assemble(msgs[:-1], msgs[-1])
        if obs is not None:
            self.sink(obs)

    def assemble(self, frames: Sequence[Frame], joint_msg: Any) -> Observation | None:
        config = self.config
        stamp = _stamp_ns(joint_msg)
        now = self.clock()
        with self.lock:
            if not self.active:
                return None
            if not self.enabled:
                self._counts["rejected.disabled"] += 1
                return None
            stale_set = stamp <= self._last_set_stamp
            if not stale_set:
                self._last_set_stamp = stamp
            epoch = self.epoch
            silent = [self.topics[i] for i, age in enumerate(self._ages(now))
                      if age > config.max_input_age]
        if stale_set:
            self.reject("stamp_out_of_order", "synchronized set not newer than the last one")
            return None
        if silent:
            self.reject("input_silent", f"set completed while {silent} silent for more than "
                                        f"max_input_age {config.max_input_age} s")
            return None
        age = (now - stamp) / 1e9
        if age > config.max_input_age:
            hint = ""
            if age > STALE_HINT_AGE_S:
                hint = (" (stamps far in the past: a recorded bag? run the node with "
                        "use_sim_time:=true and play the bag with /clock)")
            self.reject("stale_input", f"observation is {age:.3f} s old > max_input_age "
                                       f"{config.max_input_age} s{hint}")
            return None
        try:
            state = self._state_of(joint_msg, config.state_joint_names)
        except ValueError as exc:
            self.reject(getattr(exc, "reason", "invalid_state"),
                        f"{config.joint_states_topic}: {exc} (joint_states.names "
                        f"{list(config.state_joint_names)})")
            return None
        images = {self.slots[i]: f.image for i, f in enumerate(frames)}
        self._note_sizes({self.slots[i]: f.shape for i, f in enumerate(frames)})
        self.input_rate.tick(now / 1e9)
        with self.lock:
            min_period = self.min_period * 1e9
            if (min_period and self._last_submit is not None
                    and now - self._last_submit < min_period):
                self._counts["rate_limited"] += 1
                return None
            self._last_submit = now
            prompt = self.prompt
        policy = self.policy
        noise = noise_for(config.model.seed, stamp, policy.noise_shape)
        stamps = tuple(_stamp_ns(f) for f in frames) + (stamp,)
        return Observation(stamp, images, state, prompt, noise, self.monotonic(), epoch, stamps)

    def _note_sizes(self, sizes: dict[str, tuple[int, int]]) -> None:
        """Informational: cameras of different sizes are fine (each is resized with pad)."""
        if len(set(sizes.values())) > 1:
            self.count("mixed_camera_sizes")
        if len(set(sizes.values())) > 1 and not self._mixed_sizes_logged:
            self._mixed_sizes_logged = True
            self.log.info(f"cameras have different sizes {sizes}; each is resized with padding "
                          "to the model's square input independently")

    def check_silence(self) -> list[int]:
        """Inputs silent for longer than max_input_age after their last message (newly silent
        ones are counted and logged once); called periodically by the caller."""
        config = self.config
        if not self.active:
            return []
        now = self.clock()
        with self.lock:
            ages = self._ages(now)
            # Silent = heard from, then quiet: an input not heard from since activation is
            # "waiting" (diagnostics WARN), not an event (a player or driver starting late).
            newly = [i for i, age in enumerate(ages) if age > config.max_input_age
                     and i not in self._silent and self._last_receipt[i] is not None]
            self._silent.update(newly)
            self._counts.update({"input_silent_events": len(newly)} if newly else {})
        for i in newly:
            self.log.warning(f"{self.topics[i]} silent for {ages[i]:.2f} s > max_input_age "
                             f"{config.max_input_age} s: inference paused")
        return newly

    def _ages(self, now: int) -> list[float]:
        """Seconds since each input's last message (since activation for one not heard from
        yet). A clock that read 0 at activation (sim time before the first /clock) starts the
        count at its first real reading, so nothing is 'silent' for the epoch's age."""
        if self._active_since <= 0 < now:
            self._active_since = now
        return [(now - (self._active_since if t is None else t)) / 1e9
                for t in self._last_receipt]

    # -- inference side -------------------------------------------------------------------------
    def infer(self, obs: Observation) -> Chunk:
        """Runs on the inference thread."""
        policy = self.policy
        if policy is None:
            raise RuntimeError("no policy loaded")
        if self.rtc is None:
            out = policy.infer(policy_observation(obs.images, obs.state, obs.prompt),
                               noise=obs.noise)
            actions = np.ascontiguousarray(out["actions"], dtype=np.float32)
            return Chunk(obs, actions, dict(out.get("policy_timing", {})))
        prefix = self.rtc_prefix(obs)
        out = policy.infer(policy_observation(obs.images, obs.state, obs.prompt),
                           noise=obs.noise, prefix=prefix)
        actions = np.ascontiguousarray(out["actions"], dtype=np.float32)
        return Chunk(obs, actions, dict(out.get("policy_timing", {})),
                     normalized=np.asarray(out["actions_normalized"], np.float32),
                     rtc_delay=0 if prefix is None else prefix.delay)

    def rtc_prefix(self, obs: Observation) -> Any:
        """The last accepted chunk aligned to ``obs``'s stamp with d from the measured
        latencies (``model.rtc.AlignedPrefix``), or None: no previous chunk of this epoch, or
        it ends before ``obs``."""
        with self.lock:
            prev = self._rtc_prev
        if prev is None or obs.stamp_ns <= prev[0]:
            return None
        dt = self.config.action_dt
        h, a = prev[1].shape
        d = self.delays.delay(dt)
        aligned = align_prefix(prev[1], 0.0, (obs.stamp_ns - prev[0]) / 1e9, dt, d, h, a)
        if aligned.valid_len == 0:
            return None
        with self.lock:
            self._rtc_last_delay = d
        return aligned

    def pipelined(self) -> PipelinedTarget:
        """The worker target for the two-stream pipelined mode (``model.pipeline``)."""
        return PipelinedTarget(self)

    def accept(self, chunk: Chunk) -> Chunk | None:
        """Check a result; the accepted chunk carries its latency and sequence number. The
        caller publishes it while holding ``lock`` if ``is_current(chunk)``."""
        actions, names = chunk.actions, self.config.action_joint_names
        if actions.ndim != 2 or actions.shape[0] == 0 or actions.shape[1] != len(names):
            self.reject("bad_output", f"policy returned actions of shape {list(actions.shape)}"
                                      f", expected (H, {len(names)})")
            return None
        if not np.all(np.isfinite(actions)):
            self.reject("nonfinite_output", "policy returned NaN/Inf actions; chunk dropped")
            return None
        latency = self.monotonic() - chunk.obs.received
        with self.lock:
            if not self.is_current(chunk):
                self._counts["discarded_results"] += 1
                return None
            self.sequence += 1
            seq = self.sequence
            now = self.clock()
            self._last_chunk_at = now
        self.latency.add(latency)
        self.output_rate.tick(now / 1e9)
        if self.rtc is not None:
            # d is the number of actions whose time passes before the executor has the chunk:
            # observation stamp -> now on the caller's clock (+ the delivery to the executor).
            self.delays.add(max(0.0, (now - chunk.obs.stamp_ns) / 1e9 + self.delivery_delay))
            if chunk.normalized is not None:
                with self.lock:
                    if self.is_current(chunk):
                        self._rtc_prev = (chunk.obs.stamp_ns, chunk.normalized)
        return Chunk(chunk.obs, actions, chunk.timing, latency, seq, chunk.normalized,
                     chunk.rtc_delay)

    def is_current(self, chunk: Chunk) -> bool:
        return self.active and chunk.obs.epoch == self.epoch

    def output_rate_hz(self) -> float:
        return self.output_rate.rate(self.clock() / 1e9)

    # -- bookkeeping ----------------------------------------------------------------------------
    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self._counts[key] += n

    def reject(self, reason: str, text: str) -> None:
        """Count a rejected input or output under ``reason`` and log it (rate-limited)."""
        now = self.monotonic()
        text = printable(text, LOG_TEXT_CHARS)  # no raw control characters, bounded length
        with self.lock:
            self._counts[f"rejected.{reason}"] += 1
            self.last_rejection = f"{reason}: {text}"
            due = now - self._last_log.get(reason, -float("inf")) >= LOG_PERIOD_S
            if due:
                self._last_log[reason] = now
        if due:
            self.log.warning(f"rejected ({reason}): {text}")

    def counts(self) -> dict[str, int]:
        with self.lock:
            return dict(self._counts)

    def silent_topics(self) -> list[str]:
        with self.lock:
            return [self.topics[i] for i in sorted(self._silent)]

    def diagnostics(self, state: str = "") -> tuple[int, str, dict[str, object]]:
        """(level, message, values): ERROR while an input is silent; WARN when active without
        a chunk for NO_OUTPUT_WARN_S (naming the top rejection reason) or after inference
        errors; OK otherwise. The caller adds its own values (worker, memory)."""
        now = self.clock()
        counts = self.counts()
        with self.lock:
            seq, active = self.sequence, self.active
            last_chunk = self._last_chunk_at
            since = self._active_since
        values: dict[str, object] = {"lifecycle_state": state, "chunks_published": seq}
        lat = self.latency.summary()
        if lat is not None:
            values.update(latency_p50_ms=lat[0] * 1e3, latency_p95_ms=lat[1] * 1e3,
                          latency_max_ms=lat[2] * 1e3)
        values["input_rate_hz"] = self.input_rate.rate(now / 1e9)
        for i, meter in enumerate(self._topic_rates):
            values[f"input_rate_hz.{self.topics[i]}"] = meter.rate(now / 1e9)
        values["output_rate_hz"] = self.output_rate.rate(now / 1e9)
        if self.rtc is not None:
            values["rtc_delay"] = self._rtc_last_delay
        values.update(sorted(counts.items()))
        values["last_rejection"] = self.last_rejection
        silent = self.silent_topics()
        if silent:
            return ERROR, f"inference paused: silent input(s) {silent}", values
        with self.lock:
            waiting = [self.topics[i] for i, t in enumerate(self._last_receipt) if t is None]
        if active and waiting and (now - since) / 1e9 > self.config.max_input_age:
            return WARN, f"waiting for the first message on {waiting}", values
        if active and not self.enabled:
            return OK, "paused: enabled is false", values
        if active:
            idle = (now - (last_chunk if last_chunk is not None else since)) / 1e9
            if idle > NO_OUTPUT_WARN_S:
                top = top_rejection(counts)
                why = f"; top rejection: {top[0]} ({top[1]})" if top else ""
                return WARN, f"no chunk for {idle:.1f} s{why}", values
            if counts.get("rejected.inference_error", 0):
                return WARN, "inference errors occurred", values
        return OK, state, values


class PipelinedTarget:
    """``engine/worker.py``'s pipelined protocol over the pipeline's policy (``Policy.begin`` /
    ``begin_denoise`` / ``ready`` / ``collect``): vision + prefix of observation N+1 run while N
    denoises. ``infer`` is the serial path, for the worker's other callers."""

    def __init__(self, pipe: PolicyPipeline) -> None:
        self.pipe = pipe

    def infer(self, obs: Observation) -> Chunk:
        return self.pipe.infer(obs)

    def begin_prefix(self, obs: Observation) -> tuple[Observation, Any]:
        policy = self.pipe.policy
        return obs, policy.begin(policy_observation(obs.images, obs.state, obs.prompt),
                                 noise=obs.noise)

    def begin_denoise(self, ticket: tuple[Observation, Any]) -> None:
        self.pipe.policy.begin_denoise(ticket[1])

    def ready(self, ticket: tuple[Observation, Any]) -> bool:
        return self.pipe.policy.ready(ticket[1])

    def collect(self, ticket: tuple[Observation, Any]) -> Chunk:
        out = self.pipe.policy.collect(ticket[1])
        actions = np.ascontiguousarray(out["actions"], dtype=np.float32)
        return Chunk(ticket[0], actions, dict(out.get("policy_timing", {})))


def top_rejection(counts: Mapping[str, int]) -> tuple[str, int] | None:
    rejected = [(k.split(".", 1)[1], v) for k, v in counts.items() if k.startswith("rejected.")]
    return max(rejected, key=lambda kv: kv[1]) if rejected else None


def _stamp_ns(msg: Any) -> int:
    stamp = msg.header.stamp
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
