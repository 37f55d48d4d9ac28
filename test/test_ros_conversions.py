"""Round trips and rejections of pi0_ros.ros.conversions (pyrobosim ros_conversions style)."""

from __future__ import annotations

import array

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sensor_msgs.msg import CompressedImage, Image, JointState

from pi0_ros.ros import conversions as conv
from pi0_ros.ros.conversions import ConversionError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
GRAY = np.repeat(RGB[..., :1], 3, axis=-1)  # mono encodings keep one channel
JPEG_MAX_ABS_DIFF = 40  # lossy; a smooth image keeps far below this
JPEG_MEAN_ABS_DIFF = 10.0  # demo jpeg (q 90, sharp board) vs rendered: 5.3-6.2; BGR order: 47+


# --- time ------------------------------------------------------------------------------------


@given(st.integers(0, 2**62))
def test_stamp_round_trip(ns):
    assert conv.stamp_to_ns(conv.ns_to_stamp(ns)) == ns


@pytest.mark.parametrize("seconds", [0.0, 0.02, 0.1, 1.5, 49 * 0.02])
def test_duration_round_trip(seconds):
    assert conv.duration_to_seconds(conv.seconds_to_duration(seconds)) == pytest.approx(
        seconds, abs=1e-9
    )


# --- raw images ------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
@pytest.mark.parametrize("padding", [0, 3])
def test_color_image_round_trip(encoding, padding):
    msg = conv.rgb_to_image(RGB, encoding, stamp_ns=123, frame_id="cam", row_padding=padding)
    assert msg.step == RGB.shape[1] * (4 if "a" in encoding else 3) + padding
    out = conv.image_to_rgb(msg)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("encoding", ["mono8", "8UC1", "mono16", "16UC1"])
@pytest.mark.parametrize("padding", [0, 2])
@pytest.mark.parametrize("big", [False, True])
def test_mono_image_round_trip(encoding, padding, big):
    msg = conv.rgb_to_image(GRAY, encoding, row_padding=padding, is_bigendian=big)
    np.testing.assert_array_equal(conv.image_to_rgb(msg), GRAY)


def test_mono16_keeps_the_high_byte():
    values = np.array([[0, 255, 256, 65535, 0x1234]], dtype="<u2")
    msg = Image(height=1, width=5, encoding="mono16", step=10, is_bigendian=0)
    msg.data = array.array("B", values.tobytes())
    out = conv.image_to_rgb(msg)
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 255, 0x12])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_known_pixel_values_per_encoding():
    px = np.array([[[10, 20, 30]]], np.uint8)
    for encoding, raw in [
        ("rgb8", [10, 20, 30]),
        ("bgr8", [30, 20, 10]),
        ("rgba8", [10, 20, 30, 7]),
        ("bgra8", [30, 20, 10, 7]),
    ]:
        msg = Image(height=1, width=1, encoding=encoding, step=len(raw))
        msg.data = array.array("B", raw)
        np.testing.assert_array_equal(conv.image_to_rgb(msg), px, err_msg=encoding)


def _image(h=4, w=4, encoding="rgb8", step=None, nbytes=None):
    step = w * 3 if step is None else step
    msg = Image(height=h, width=w, encoding=encoding, step=step)
    msg.data = array.array("B", bytes(step * h if nbytes is None else nbytes))
    return msg


@pytest.mark.parametrize(
    ("msg", "reason", "text"),
    [
        (_image(encoding="yuv422"), "encoding", "yuv422"),
        (_image(encoding="32FC1"), "encoding", "32FC1"),
        (_image(nbytes=47), "data_length", "47 bytes"),
        (_image(nbytes=49), "data_length", "expected"),
        (_image(step=11), "step", "step 11"),
        (_image(h=0, nbytes=0), "zero_size", "4x0"),
        (_image(w=0, step=0, nbytes=0), "zero_size", "0x4"),
    ],
)
def test_bad_images_are_rejected_with_a_reason(msg, reason, text):
    with pytest.raises(ConversionError, match=text) as err:
        conv.image_to_rgb(msg)
    assert err.value.reason == reason
    assert isinstance(err.value, ValueError)


@settings(max_examples=50, deadline=None)
@given(
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    pad=st.integers(0, 5),
    encoding=st.sampled_from(["rgb8", "bgr8", "rgba8", "bgra8"]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(h, w, pad, encoding, seed):
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    msg = conv.rgb_to_image(rgb, encoding, row_padding=pad)
    np.testing.assert_array_equal(conv.image_to_rgb(msg), rgb)


# --- compressed images -----------------------------------------------------------------------


def test_png_round_trip_is_exact():
    msg = conv.rgb_to_compressed(RGB, "png", stamp_ns=5)
    assert isinstance(msg, CompressedImage) and msg.format == "png"
    np.testing.assert_array_equal(conv.compressed_to_rgb(msg), RGB)
    np.testing.assert_array_equal(conv.to_rgb(msg), RGB)


def test_jpeg_round_trip_is_close():
    smooth = np.broadcast_to(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (16, 32, 3))
    out = conv.compressed_to_rgb(conv.rgb_to_compressed(smooth, "jpeg"))
    assert out.shape == smooth.shape
    assert np.abs(out.astype(int) - smooth).max() < JPEG_MAX_ABS_DIFF


def test_png16_maps_like_mono16():
    import io

    from PIL import Image as PILImage

    values = np.array([[0, 256, 65535]], dtype=np.uint16)
    buf = io.BytesIO()
    PILImage.fromarray(values).save(buf, format="PNG")
    msg = CompressedImage(format="png")
    msg.data = array.array("B", buf.getvalue())
    np.testing.assert_array_equal(conv.compressed_to_rgb(msg)[0, :, 1], [0, 1, 255])


def _compressed(data: bytes, fmt: str) -> CompressedImage:
    msg = CompressedImage(format=fmt)
    msg.data = array.array("B", data)
    return msg


def _cv_bridge_rgb8(data: bytes) -> np.ndarray:
    """What cv_bridge's ``compressed_imgmsg_to_cv2(msg, "rgb8")`` computes for a colour image:
    ``imdecode(IMREAD_UNCHANGED)`` then ``cvtColor2(im, "bgr8", "rgb8")`` (= BGR2RGB)."""
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _demo_compressed(duration: float = 0.2) -> list[tuple[CompressedImage, np.ndarray]]:
    """The demo bag's wrist-camera messages (as rclpy messages) with the frames rendered."""
    from pi0_ros.tools import make_demo

    spec = make_demo.DemoSpec(duration=duration)
    out = []
    for stamp, topic, _, msg in make_demo.bag_messages(spec):
        if topic != spec.wrist_topic:
            continue
        t = (stamp - make_demo.START_NS) / 1e9
        rendered = make_demo.wrist_frame(make_demo.joint_positions(np.array([t]))[0],
                                         spec.wrist_size)
        out.append((_compressed(np.asarray(msg.data, np.uint8).tobytes(), msg.format), rendered))
    return out


def test_demo_bag_jpeg_decodes_to_cv_bridge_pixels():
    """The demo bag's jpeg frames: exactly cv_bridge's pixels, Pillow's decoder within 1 level,
    the rendered frame within jpeg error."""
    import io

    from PIL import Image as PILImage

    frames = _demo_compressed()
    assert len(frames) >= 6
    for msg, rendered in frames:
        data = bytes(msg.data)
        rgb = conv.compressed_to_rgb(msg)
        assert rgb.dtype == np.uint8 and rgb.flags.c_contiguous and rgb.shape == (224, 224, 3)
        np.testing.assert_array_equal(rgb, _cv_bridge_rgb8(data))
        pillow = np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB"))
        assert np.abs(rgb.astype(int) - pillow).max() <= 1
        err = np.abs(rgb.astype(int) - rendered)
        assert np.mean(err) < JPEG_MEAN_ABS_DIFF, np.mean(err)  # also catches a BGR order
        np.testing.assert_array_equal(conv.to_rgb(msg), rgb)


def test_demo_bag_jpeg_matches_real_cv_bridge():
    cv_bridge = pytest.importorskip("cv_bridge", reason="cv_bridge not installed (no ROS install)")
    bridge = cv_bridge.CvBridge()
    for msg, _ in _demo_compressed():
        np.testing.assert_array_equal(conv.compressed_to_rgb(msg),
                                      bridge.compressed_imgmsg_to_cv2(msg, "rgb8"))


def _cv2_encode(image: np.ndarray, ext: str, params: tuple[int, ...] = ()) -> bytes:
    import cv2

    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    return buf.tobytes()


def test_png_colour_channels_and_alpha():
    import cv2

    bgr = np.ascontiguousarray(RGB[..., ::-1])
    np.testing.assert_array_equal(conv.compressed_to_rgb(_compressed(_cv2_encode(bgr, ".png"),
                                                                     "png")), RGB)
    bgra = np.concatenate([bgr, np.full(RGB.shape[:2] + (1,), 9, np.uint8)], axis=-1)
    out = conv.compressed_to_rgb(_compressed(_cv2_encode(bgra, ".png"), "png"))
    np.testing.assert_array_equal(out, RGB)  # alpha dropped, BGR -> RGB
    assert cv2.IMREAD_UNCHANGED == -1


def test_png16_colour_keeps_the_high_byte():
    rgb16 = np.random.default_rng(5).integers(0, 65536, (6, 9, 3), dtype=np.uint16)
    data = _cv2_encode(np.ascontiguousarray(rgb16[..., ::-1]), ".png")  # 16-bit BGR png
    out = conv.compressed_to_rgb(_compressed(data, "png"))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, (rgb16 >> 8).astype(np.uint8))


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_gray_compressed_is_replicated_like_mono8(ext):
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))  # (8, 16) smooth ramp
    out = conv.compressed_to_rgb(_compressed(_cv2_encode(gray, ext), ext[1:]))
    assert out.shape == (8, 16, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    tol = 0 if ext == ".png" else JPEG_MAX_ABS_DIFF
    assert np.abs(out[..., 0].astype(int) - gray).max() <= tol


def test_jpeg_exif_orientation_is_not_applied():
    """cv_bridge decodes with IMREAD_UNCHANGED, which ignores EXIF rotation: so do we."""
    import io

    from PIL import Image as PILImage

    img = PILImage.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = PILImage.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert conv.compressed_to_rgb(_compressed(buf.getvalue(), "jpeg")).shape == (10, 30, 3)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "zero_size"),
        (b"\xff\xd8\xff\xe0garbage", "corrupt_compressed"),
        (b"x" * 64, "corrupt_compressed"),
    ],
)
def test_bad_compressed_images_are_rejected(data, reason):
    msg = CompressedImage(format="jpeg")
    msg.data = array.array("B", data)
    with pytest.raises(ConversionError) as err:
        conv.compressed_to_rgb(msg)
    assert err.value.reason == reason


def test_truncated_jpeg_is_rejected():
    good = conv.rgb_to_compressed(RGB, "jpeg")
    msg = CompressedImage(format="jpeg")
    msg.data = array.array("B", bytes(good.data)[: len(good.data) // 2])
    with pytest.raises(ConversionError) as err:
        conv.compressed_to_rgb(msg)
    assert err.value.reason == "corrupt_compressed"


def test_cv_bridge_is_used_when_given():
    calls = []

    class Bridge:
        def compressed_imgmsg_to_cv2(self, msg, desired_encoding):
            calls.append(desired_encoding)
            return RGB

    msg = conv.rgb_to_compressed(RGB, "png")
    np.testing.assert_array_equal(conv.compressed_to_rgb(msg, bridge=Bridge()), RGB)
    assert calls == ["rgb8"]

    class Failing:
        def compressed_imgmsg_to_cv2(self, msg, desired_encoding):
            raise RuntimeError("cv2 error")

    with pytest.raises(ConversionError) as err:
        conv.compressed_to_rgb(msg, bridge=Failing())
    assert err.value.reason == "corrupt_compressed"


# --- joint states ----------------------------------------------------------------------------

NAMES = ["j1", "j2", "j3"]


def test_joint_state_round_trip():
    pos = np.array([0.5, -1.0, 2.25], np.float32)
    msg = conv.vector_to_joint_state(NAMES, pos, stamp_ns=42)
    assert isinstance(msg, JointState)
    np.testing.assert_array_equal(conv.joint_state_to_vector(msg, NAMES), pos)


def test_joint_state_reorders_by_name_and_ignores_extras():
    msg = JointState(name=["extra", "j3", "j1", "j2"], position=[9.0, 3.0, 1.0, 2.0])
    out = conv.joint_state_to_vector(msg, NAMES)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [1.0, 2.0, 3.0])


def test_missing_joint_is_named():
    msg = JointState(name=["j1", "j3"], position=[1.0, 3.0])
    with pytest.raises(ConversionError, match="j2") as err:
        conv.joint_state_to_vector(msg, NAMES)
    assert err.value.reason == "missing_joint"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_positions_are_rejected(bad):
    msg = JointState(name=NAMES, position=[1.0, bad, 3.0])
    with pytest.raises(ConversionError, match="j2") as err:
        conv.joint_state_to_vector(msg, NAMES)
    assert err.value.reason == "nonfinite_state"


def test_nonfinite_unused_joint_is_ignored():
    msg = JointState(name=NAMES + ["other"], position=[1.0, 2.0, 3.0, float("nan")])
    np.testing.assert_array_equal(conv.joint_state_to_vector(msg, NAMES), [1, 2, 3])


def test_names_and_positions_of_different_length_are_rejected():
    msg = JointState(name=NAMES, position=[1.0, 2.0])
    with pytest.raises(ConversionError) as err:
        conv.joint_state_to_vector(msg, NAMES)
    assert err.value.reason == "malformed_joint_state"


# --- action chunks and trajectories ----------------------------------------------------------

ACTIONS = RNG.standard_normal((6, 3)).astype(np.float32)
DT = 0.02


def test_trajectory_round_trip_and_timing():
    msg = conv.chunk_to_trajectory(ACTIONS, stamp_ns=7 * 10**9, dt=DT, joint_names=NAMES)
    assert msg.joint_names == NAMES
    assert conv.stamp_to_ns(msg.header.stamp) == 7 * 10**9
    positions, times = conv.trajectory_to_chunk(msg)
    np.testing.assert_array_equal(positions, ACTIONS)
    np.testing.assert_allclose(times, np.arange(6) * DT, atol=1e-9)


def test_trajectory_is_acceptable_to_joint_trajectory_controller():
    # joint_trajectory_controller's validate_trajectory_msg: strictly increasing time_from_start,
    # per-point field sizes equal to the joint count, a last point with zero velocity.
    msg = conv.chunk_to_trajectory(ACTIONS, stamp_ns=1, dt=DT, joint_names=NAMES)
    times = [conv.duration_to_seconds(p.time_from_start) for p in msg.points]
    assert np.all(np.diff(times) > 0)
    for p in msg.points:
        assert len(p.positions) == len(p.velocities) == len(NAMES)
        assert np.all(np.isfinite(p.velocities))
    assert np.all(np.abs(msg.points[-1].velocities) <= np.finfo(np.float32).eps)


def test_finite_difference_velocities():
    ramp = np.outer(np.arange(5), [1.0, -2.0]).astype(np.float32)  # constant velocity
    vel = conv.finite_difference_velocities(ramp, 0.5)
    np.testing.assert_allclose(vel[:-1], np.tile([2.0, -4.0], (4, 1)))
    np.testing.assert_array_equal(vel[-1], 0.0)
    np.testing.assert_array_equal(conv.finite_difference_velocities(ramp[:1], 0.5), 0.0)


@pytest.mark.parametrize(
    ("actions", "match"),
    [
        (np.zeros((0, 3)), "shape"),
        (np.zeros((4, 2)), "joint names"),
        (np.full((4, 3), np.nan), "NaN"),
    ],
)
def test_bad_actions_never_become_messages(actions, match):
    with pytest.raises(ValueError, match=match):
        conv.chunk_to_trajectory(actions, stamp_ns=0, dt=DT, joint_names=NAMES)


def test_action_chunk_round_trip():
    pytest.importorskip("pi0_ros_msgs.msg", reason="pi0_ros_msgs not built into this venv")
    msg = conv.chunk_to_msg(
        ACTIONS,
        stamp_ns=3 * 10**9 + 5,
        dt=DT,
        joint_names=NAMES,
        inference_latency=0.125,
        sequence=9,
        model_name="pi05_tiny",
    )
    assert (msg.horizon, msg.action_dim) == ACTIONS.shape
    assert conv.stamp_to_ns(msg.header.stamp) == 3 * 10**9 + 5
    assert msg.dt == DT and msg.sequence == 9 and msg.model_name == "pi05_tiny"
    assert list(msg.joint_names) == NAMES
    np.testing.assert_array_equal(conv.msg_to_chunk(msg), ACTIONS)


def test_bench_ros_host_smoke(tmp_path):
    import json
    import os

    import torch

    from pi0_ros.tools import bench_ros_host

    affinity = os.sched_getaffinity(0)
    threads = torch.get_num_threads()
    out = tmp_path / "ros_host.json"
    assert bench_ros_host.main(["--iterations", "3", "--warmup", "1", "--width", "160",
                                "--height", "120", "--encoding", "jpeg", "--resize", "pillow",
                                "--cpu", str(min(affinity)), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["resize"] == "pillow" and "jpeg" in result["what"]
    assert result["tensors"]["images"] == [1, 3, 3, 224, 224]
    assert 0 < result["total_cpu_ms"]["p50"]
    assert os.sched_getaffinity(0) == affinity and torch.get_num_threads() == threads
