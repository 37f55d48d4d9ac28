"""Deterministic, offline demo material: a tiny random-weight pi0.5 checkpoint and a synthetic bag.

Everything is a pure function of a seed, so two runs (on any machine) produce the same checkpoint
bytes and the same bag messages:

* ``make_checkpoint(dir)``: openpi layout (SEMANTICS §11) -- ``model.safetensors`` with the key
  names of a converted openpi checkpoint, ``config.json`` (with a ``geometry`` block in the layout
  of the openpi tiny fixtures), ``assets/<asset_id>/norm_stats.json`` for an 8-dim state (7-joint
  arm + gripper) and 8-dim action, and ``tokenizer.model`` (the tiny SentencePiece model shipped
  as package data in ``pi0_ros/data/``). Weights follow the recipe of the openpi tiny fixtures:
  one numpy generator per tensor seeded from ``seed`` and the key's CRC32, so tensors do not
  depend on each other or on the iteration order.
* ``make_bag(dir)``: a rosbag2 bag (sqlite3 or mcap, written with ``rosbags``) of a DROID-style
  single-arm robot: an exterior camera (``sensor_msgs/Image`` rgb8 320x240) and a wrist camera
  (``sensor_msgs/CompressedImage`` jpeg 224x224) at 30 Hz showing moving patterns driven by the
  arm's motion, ``sensor_msgs/JointState`` of 7 joints + gripper at 100 Hz and one
  ``std_msgs/String`` prompt.
* ``write_demo_params(path, ...)``: the policy / executor ros-args parameter file that configures
  the nodes (and ``pi0-ros-replay``) for that checkpoint and bag.

CLI: ``python -m pi0_ros.tools.make_demo OUT_DIR [--duration S] [--seed N] [--storage mcap]``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import shutil
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
TOKENIZER = DATA_DIR / "tokenizer.model"
ASSET_ID = "demo"
NS_PER_S = 1_000_000_000
# Bag start time: a fixed epoch so the bag is the same on every run (2023-11-14T22:13:20Z).
START_NS = 1_700_000_000 * NS_PER_S

POLICY_NODE = "pi0_policy_node"
EXECUTOR_NODE = "pi0_executor_node"
JOINT_NAMES = tuple(f"panda_joint{i}" for i in range(1, 8)) + ("panda_finger_joint1",)
# Joint motion of the synthetic arm: q_i(t) = center + amplitude * sin(2 pi f t + phase) (rad).
_CENTER = np.array([0.0, -0.4, 0.0, -2.0, 0.0, 1.6, 0.8])
_AMPLITUDE = np.array([0.6, 0.3, 0.4, 0.35, 0.5, 0.3, 0.7])
_FREQUENCY = np.array([0.10, 0.15, 0.12, 0.20, 0.17, 0.13, 0.25])
_PHASE = np.array([0.0, 1.0, 2.0, 0.5, 1.5, 2.5, 3.0])
GRIPPER_OPEN = 0.04  # finger joint travel, metres
# Plot axis unit per joint: the arm's revolute joints in radians, the prismatic finger in metres.
JOINT_UNITS = {**{name: "rad" for name in JOINT_NAMES[:7]}, JOINT_NAMES[7]: "m"}
GRIPPER_PERIOD = 5.0  # seconds per open / close cycle


@dataclass(frozen=True)
class DemoSpec:
    """Everything the demo material depends on (defaults: the ``pi0-ros-demo`` setup)."""

    seed: int = 0
    duration: float = 10.0  # bag length, seconds
    camera_rate: float = 30.0
    joint_rate: float = 100.0
    action_horizon: int = 16
    action_dt: float = 0.05  # seconds between the actions of a chunk
    max_rate: float = 5.0  # policy inference cap, Hz
    prompt: str = "pick up the red block and put it in the bowl"
    exterior_topic: str = "/exterior_camera/image_raw"
    exterior_size: tuple[int, int] = (320, 240)  # (width, height), rgb8
    wrist_topic: str = "/wrist_camera/image_raw/compressed"
    wrist_size: tuple[int, int] = (224, 224)  # jpeg
    joint_states_topic: str = "/joint_states"
    prompt_topic: str = f"/{POLICY_NODE}/prompt"
    cameras: tuple[str, ...] = field(default=("base_0_rgb", "left_wrist_0_rgb"))

    def __post_init__(self) -> None:
        if not self.duration > 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration}")
        for name in ("camera_rate", "joint_rate", "action_dt", "max_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.action_horizon < 2:
            raise ValueError(f"action_horizon must be >= 2, got {self.action_horizon}")


# ---------------------------------------------------------------------------------------------
# checkpoint


def model_config(spec: DemoSpec) -> Any:
    """The tiny pi0.5 geometry of the openpi fixtures, with the demo's horizon and cameras."""
    from pi0_ros.model import tiny_config

    return tiny_config(
        pi05=True, num_cameras=len(spec.cameras), action_horizon=spec.action_horizon,
        cameras=spec.cameras,
    )


def init_tensor(key: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random value of one checkpoint tensor (the openpi tiny-fixture recipe, README there).

    matrices / embeddings / conv N(0, clip(1/sqrt(fan_in), 0.02, 0.2)); biases N(0, 0.05); Gemma
    RMSNorm weights N(0, 0.1) (used as 1 + w); SigLIP LayerNorm weight 1 + N(0, 0.1); adaRMS
    ``dense`` weight N(0, 0.3), bias N(0, 0.5).
    """
    rng = np.random.default_rng(seed * 1_000_003 + zlib.crc32(key.encode()))
    siglip_norm = "vision_model" in key and ("layer_norm" in key or "post_layernorm" in key)
    if ".dense." in key:
        std, mean = (0.3 if key.endswith("weight") else 0.5), 0.0
    elif siglip_norm:
        std, mean = (0.1, 1.0) if key.endswith("weight") else (0.05, 0.0)
    elif key.endswith("bias"):
        std, mean = 0.05, 0.0
    elif len(shape) == 1:  # Gemma RMSNorm (1 + w)
        std, mean = 0.1, 0.0
    else:
        fan_in = int(np.prod(shape[1:]))
        std, mean = float(np.clip(1.0 / math.sqrt(fan_in), 0.02, 0.2)), 0.0
    value = mean + std * rng.standard_normal(shape)
    return _contract(key, value, rng).astype(np.float32)


# Demo-only deviation from the fixture recipe, so that plots are readable: with fully random
# weights the untrained sampler returns its N(0, 1) initial noise almost unchanged (actions jump
# over the whole joint range every step). Near-identity action projections and damped expert
# residual branches make the velocity field roughly proportional to x_t, so the 10 Euler steps
# contract the noise to ~0.15 of its size: actions become small random deviations around the
# middle of the normalization range. Still random weights from the seeded generator.
_DAMPED = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def _contract(key: str, value: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if key in ("action_in_proj.weight", "action_out_proj.weight"):
        return np.eye(*value.shape) + 0.02 * rng.standard_normal(value.shape)
    if key in ("action_in_proj.bias", "action_out_proj.bias"):
        return 0.1 * value
    if "gemma_expert." in key and (key.endswith(_DAMPED) or ".model.norm.dense." in key):
        return 0.1 * value
    return value


def norm_stats(spec: DemoSpec) -> dict[str, Any]:
    """openpi ``norm_stats.json`` content for the synthetic arm (state and actions alike).

    Quantiles are the exact range of the synthetic motion, mean / std those of a sine.
    """
    lo = np.concatenate([_CENTER - _AMPLITUDE, [0.0]])
    hi = np.concatenate([_CENTER + _AMPLITUDE, [GRIPPER_OPEN]])
    mean = np.concatenate([_CENTER, [GRIPPER_OPEN / 2]])
    std = np.concatenate([_AMPLITUDE / math.sqrt(2.0), [GRIPPER_OPEN / 2]])
    stats = {
        "mean": [float(np.float32(x)) for x in mean],
        "std": [float(np.float32(x)) for x in std],
        "q01": [float(np.float32(x)) for x in lo],
        "q99": [float(np.float32(x)) for x in hi],
    }
    return {"norm_stats": {"state": stats, "actions": dict(stats)}}


def make_checkpoint(out_dir: str | Path, spec: DemoSpec = DemoSpec()) -> Path:
    """Write the demo checkpoint into ``out_dir`` (created); returns the directory.

    The same ``spec`` gives byte-identical files.
    """
    from safetensors.numpy import save_file

    from pi0_ros.model.weights import checkpoint_shapes, geometry_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model_config(spec)
    shapes = checkpoint_shapes(config)
    tensors = {key: init_tensor(key, shape, spec.seed) for key, shape in sorted(shapes.items())}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "action_dim": config.action_dim,
        "action_horizon": config.action_horizon,
        "paligemma_variant": "tiny_gemma_lm",
        "action_expert_variant": "tiny_gemma_expert",
        "precision": "float32",
        "pi05": True,
        "max_token_len": config.max_token_len,
        "discrete_state_input": True,
        "geometry": geometry_dict(config),
        "demo": {"seed": spec.seed, "asset_id": ASSET_ID,
                 "note": "random weights from pi0_ros.tools.make_demo; not a trained policy"},
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    assets = out / "assets" / ASSET_ID
    assets.mkdir(parents=True, exist_ok=True)
    (assets / "norm_stats.json").write_text(json.dumps(norm_stats(spec), indent=2) + "\n")
    shutil.copyfile(TOKENIZER, out / "tokenizer.model")
    log.info("wrote demo checkpoint %s (%d tensors)", out, len(tensors))
    return out


# ---------------------------------------------------------------------------------------------
# synthetic robot


def joint_positions(t: np.ndarray) -> np.ndarray:
    """(N,) seconds since the bag start -> (N, 8) positions of 7 arm joints + gripper."""
    t = np.asarray(t, dtype=np.float64)[:, None]
    arm = _CENTER + _AMPLITUDE * np.sin(2 * np.pi * _FREQUENCY * t + _PHASE)
    phase = np.sin(2 * np.pi * t[:, 0] / GRIPPER_PERIOD)
    gripper = GRIPPER_OPEN * 0.5 * (1.0 + np.tanh(4.0 * phase))
    return np.concatenate([arm, gripper[:, None]], axis=1)


def joint_velocities(t: np.ndarray) -> np.ndarray:
    t = np.asarray(t, dtype=np.float64)[:, None]
    w = 2 * np.pi * _FREQUENCY
    arm = _AMPLITUDE * w * np.cos(w * t + _PHASE)
    phase = np.sin(2 * np.pi * t[:, 0] / GRIPPER_PERIOD)
    dphase = 2 * np.pi / GRIPPER_PERIOD * np.cos(2 * np.pi * t[:, 0] / GRIPPER_PERIOD)
    gripper = GRIPPER_OPEN * 0.5 * 4.0 * (1.0 - np.tanh(4.0 * phase) ** 2) * dphase
    return np.concatenate([arm, gripper[:, None]], axis=1)


def exterior_frame(q: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A scene seen from outside: gradient backdrop, a red block whose position follows joints
    1 / 2 and a bowl whose colour follows the gripper. (H, W, 3) uint8."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = 40 + 60 * y / height
    img[..., 1] = 60 + 80 * x / width
    img[..., 2] = 90
    cx = width * (0.5 + 0.35 * (q[0] - _CENTER[0]) / _AMPLITUDE[0])
    cy = height * (0.5 + 0.35 * (q[1] - _CENTER[1]) / _AMPLITUDE[1])
    g = q[7] / GRIPPER_OPEN
    bowl = (x - width * 0.75) ** 2 + (y - height * 0.75) ** 2 < (0.1 * min(width, height)) ** 2
    img[bowl] = (200 * g + 30, 200 * g + 30, 230)
    block = (np.abs(x - cx) < width * 0.06) & (np.abs(y - cy) < height * 0.08)
    img[block] = (220, 30, 30)
    return np.clip(img, 0, 255).astype(np.uint8)


def wrist_frame(q: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A wrist view: a checkerboard rotating with joint 7 and scrolling with joint 4, darkened
    as the gripper closes. (H, W, 3) uint8."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x, y = x - width / 2, y - height / 2
    a = q[6]
    u = x * math.cos(a) - y * math.sin(a) + 40 * q[3]
    v = x * math.sin(a) + y * math.cos(a)
    board = ((np.floor(u / 28) + np.floor(v / 28)) % 2).astype(np.float32)
    shade = 0.4 + 0.6 * q[7] / GRIPPER_OPEN
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = (60 + 150 * board) * shade
    img[..., 1] = (80 + 120 * board) * shade
    img[..., 2] = (50 + 60 * (1 - board)) * shade + 40
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(rgb: np.ndarray) -> bytes:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# bag


def typestore() -> Any:
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def _header(types: Any, stamp_ns: int, frame_id: str) -> Any:
    sec, nanosec = divmod(int(stamp_ns), NS_PER_S)
    return types["std_msgs/msg/Header"](
        stamp=types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec), frame_id=frame_id
    )


def bag_messages(spec: DemoSpec) -> list[tuple[int, str, str, Any]]:
    """Every message of the demo bag as (log time ns, topic, type name, rosbags message), in time
    order. Log time equals the header stamp."""
    store = typestore()
    t = store.types
    image_t = "sensor_msgs/msg/Image"
    comp_t = "sensor_msgs/msg/CompressedImage"
    joint_t = "sensor_msgs/msg/JointState"
    string_t = "std_msgs/msg/String"
    events: list[tuple[int, int, str, str, Any]] = []

    n_joint = int(math.floor(spec.duration * spec.joint_rate)) + 1
    times = np.arange(n_joint) / spec.joint_rate
    pos, vel = joint_positions(times), joint_velocities(times)
    for k in range(n_joint):
        stamp = START_NS + round(times[k] * NS_PER_S)
        msg = t[joint_t](
            header=_header(store.types, stamp, ""), name=list(JOINT_NAMES),
            position=pos[k].astype(np.float64), velocity=vel[k].astype(np.float64),
            effort=np.zeros(0, np.float64),
        )
        events.append((stamp, 1, spec.joint_states_topic, joint_t, msg))

    n_cam = int(math.floor(spec.duration * spec.camera_rate)) + 1
    ew, eh = spec.exterior_size
    for k in range(n_cam):
        t_ext = k / spec.camera_rate
        t_wri = t_ext + 0.003  # the wrist camera is triggered 3 ms later
        stamp_e = START_NS + round(t_ext * NS_PER_S)
        stamp_w = START_NS + round(t_wri * NS_PER_S)
        q_e, q_w = joint_positions(np.array([t_ext, t_wri]))
        rgb = exterior_frame(q_e, spec.exterior_size)
        image = t[image_t](
            header=_header(store.types, stamp_e, "exterior_camera_optical_frame"),
            height=eh, width=ew, encoding="rgb8", is_bigendian=0, step=3 * ew,
            data=rgb.reshape(-1),
        )
        events.append((stamp_e, 2, spec.exterior_topic, image_t, image))
        comp = t[comp_t](
            header=_header(store.types, stamp_w, "wrist_camera_optical_frame"), format="jpeg",
            data=np.frombuffer(_jpeg(wrist_frame(q_w, spec.wrist_size)), np.uint8),
        )
        events.append((stamp_w, 3, spec.wrist_topic, comp_t, comp))

    events.append((START_NS, 0, spec.prompt_topic, string_t, t[string_t](
        data=spec.prompt)))
    events.sort(key=lambda e: (e[0], e[1]))
    return [(stamp, topic, typ, msg) for stamp, _, topic, typ, msg in events]


def make_bag(out_path: str | Path, spec: DemoSpec = DemoSpec(), storage: str = "sqlite3") -> Path:
    """Write the synthetic bag to ``out_path`` (a new directory); returns it."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    plugins = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}
    if storage not in plugins:
        raise ValueError(f"storage must be one of {sorted(plugins)}, got '{storage}'")
    out = Path(out_path)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another path")
    store = typestore()
    messages = bag_messages(spec)
    writer = Writer(out, version=8, storage_plugin=plugins[storage])
    writer.open()
    try:
        connections: dict[str, Any] = {}
        for _, topic, typ, _ in messages:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, typ, typestore=store)
        for stamp, topic, typ, msg in messages:
            writer.write(connections[topic], stamp, store.serialize_cdr(msg, typ))
    finally:
        writer.close()
    log.info("wrote demo bag %s (%d messages, %.1f s, %s)", out, len(messages), spec.duration,
             storage)
    return out


# ---------------------------------------------------------------------------------------------
# parameters


def policy_parameters(checkpoint: str | Path, spec: DemoSpec = DemoSpec()) -> dict[str, Any]:
    """Policy-node parameters (names of ``pi0_ros.ros.params.PARAMETERS``) for the demo."""
    return {
        "checkpoint": str(checkpoint),
        "norm_stats": ASSET_ID,
        "model.device": "cpu",
        "model.dtype": "float32",
        "model.backend": "eager",
        "model.num_steps": 10,
        "model.warmup": 1,
        "prompt": spec.prompt,
        "cameras.topics": [spec.exterior_topic, spec.wrist_topic],
        "cameras.slots": list(spec.cameras),
        "cameras.transports": ["raw", "compressed"],
        "joint_states.topic": spec.joint_states_topic,
        "joint_states.names": list(JOINT_NAMES),
        "actions.joint_names": list(JOINT_NAMES),
        "actions.dt": spec.action_dt,
        "sync.slop": 0.02,
        "sync.queue_size": 10,
        "max_input_age": 0.5,
        "max_rate": spec.max_rate,
        "viz.lookahead": spec.action_horizon // 2,
    }


# Franka Panda joint limits (rad, rad/s, rad/s^2; the finger in m, m/s, m/s^2), from the
# robot's published datasheet; the executor clamps / rate-limits the demo's commands to them.
PANDA_POSITION_MIN = [-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973, 0.0]
PANDA_POSITION_MAX = [2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973, 0.04]
PANDA_VELOCITY_MAX = [2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61, 0.2]
PANDA_ACCELERATION_MAX = [15.0, 7.5, 10.0, 12.5, 15.0, 20.0, 20.0, 2.0]


def executor_parameters(spec: DemoSpec = DemoSpec()) -> dict[str, Any]:
    """Executor-node parameters (names of ``pi0_ros.ros.executor_node.PARAMETERS``)."""
    return {
        "joint_names": list(JOINT_NAMES),
        "position_min": PANDA_POSITION_MIN,
        "position_max": PANDA_POSITION_MAX,
        "velocity_max": PANDA_VELOCITY_MAX,
        "acceleration_max": PANDA_ACCELERATION_MAX,
        "control_rate": 250.0,
        "strategy": "crossfade",
        "crossfade_window": 0.1,
        "max_seam_jump": 1.0,
        "chunk_timeout": 0.5,
        "joint_states_topic": spec.joint_states_topic,
        "chunk_topic": f"/{POLICY_NODE}/action_chunk",
    }


def write_demo_params(path: str | Path, checkpoint: str | Path,
                      spec: DemoSpec = DemoSpec()) -> Path:
    """Write the ros-args parameter file (policy and executor node sections) for the demo;
    returns it."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {POLICY_NODE: {"ros__parameters": policy_parameters(checkpoint, spec)},
           EXECUTOR_NODE: {"ros__parameters": executor_parameters(spec)}}
    header = (
        "# pi0_ros demo parameters (written by pi0_ros.tools.make_demo).\n"
        "# Use with: pi0_policy_node --ros-args --params-file THIS_FILE\n"
        "#       or: pi0-ros-replay BAG --config THIS_FILE --output OUT\n"
    )
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return path


def make_demo(out_dir: str | Path, spec: DemoSpec = DemoSpec(), *, storage: str = "sqlite3",
              force: bool = False) -> dict[str, Path]:
    """Checkpoint, bag and parameter file under ``out_dir``; existing pieces are kept unless
    ``force``. Returns {"checkpoint", "bag", "params"}."""
    out = Path(out_dir)
    ckpt, bag, params = out / "checkpoint", out / "bag", out / "demo_params.yaml"
    stamp = out / "spec.json"
    wanted = json.dumps({"spec": _spec_dict(spec), "storage": storage}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() != wanted:
        log.info("demo spec changed: regenerating %s", out)
        force = True
    if force:
        for p in (ckpt, bag):
            if p.exists():
                shutil.rmtree(p)
    if not (ckpt / "model.safetensors").is_file():
        make_checkpoint(ckpt, spec)
    if not (bag / "metadata.yaml").is_file():
        if bag.exists():
            shutil.rmtree(bag)  # an interrupted earlier run
        make_bag(bag, spec, storage)
    write_demo_params(params, ckpt.resolve(), spec)
    stamp.write_text(wanted)
    return {"checkpoint": ckpt, "bag": bag, "params": params}


def _spec_dict(spec: DemoSpec) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pi0_ros.tools.make_demo",
        description="Write a tiny random-weight pi0.5 checkpoint, a synthetic rosbag2 bag and a "
        "parameter file (deterministic, offline).",
    )
    parser.add_argument("out_dir", help="output directory (checkpoint/, bag/, demo_params.yaml)")
    parser.add_argument("--duration", type=float, default=DemoSpec.duration,
                        help="bag length in seconds (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DemoSpec.seed,
                        help="weight seed (default %(default)s)")
    parser.add_argument("--storage", choices=("sqlite3", "mcap"), default="sqlite3",
                        help="rosbag2 storage plugin (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="regenerate existing pieces")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        spec = DemoSpec(seed=args.seed, duration=args.duration)
        paths = make_demo(args.out_dir, spec, storage=args.storage, force=args.force)
    except (ValueError, OSError) as exc:
        print(f"make_demo: error: {exc}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
