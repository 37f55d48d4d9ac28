"""pi0_ros.processing against openpi's own preprocessing outputs (fixture ``openpi_preprocess``).

Every token id, mask, bin and resized pixel is compared exactly; normalized / unnormalized floats
to ``NORM_RTOL`` relative (we compute in float64 with openpi's formulas, so this is tight).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from pi0_ros import processing as P

FIXTURES = Path(__file__).parent / "fixtures"
PRE = FIXTURES / "openpi_preprocess"
LEROBOT = FIXTURES / "lerobot_tiny_pi05"

NORM_RTOL = 1e-12  # float64 reproduction of float64 openpi values (README: <= 1e-12 relative)
NORM_ATOL = 0.0
MAX_PIXEL_DIFF = 0  # resize="pillow": PIL itself, so resized images must be bit-identical
FAST_MAX_LEVEL_DIFF = 1  # resize="fast": torch's uint8 kernel, within 1 uint8 level of PIL
FAST_MAX_DIFF_FRACTION = 0.02  # of one 224x224x3 frame's values (measured <= 1.02 %; printed)
IMAGE_SIZE = 224
CONFS = {  # conf -> (max_len, discrete_state, use_quantiles)
    "pi0": (48, False, False),
    "pi05": (200, True, True),
    "pi05_nostate": (200, False, True),
}


@pytest.fixture(scope="module")
def ref():
    return load_file(str(PRE / "preprocess.safetensors"))


@pytest.fixture(scope="module")
def strings():
    return json.loads((PRE / "strings.json").read_text())


@pytest.fixture(scope="module")
def tokenizers():
    return {
        conf: P.PromptTokenizer(PRE / "tokenizer.model", max_len, discrete)
        for conf, (max_len, discrete, _) in CONFS.items()
    }


def _sha(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _assert_rel(actual, expected, rtol=NORM_RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=NORM_ATOL)


# ---------------------------------------------------------------------------------- images


def test_uint8_lut_bit_identical(ref):
    expected = ref["image.uint8_to_float_lut"]
    assert P.UINT8_TO_FLOAT_LUT.dtype == np.float32
    assert P.UINT8_TO_FLOAT_LUT.tobytes() == expected.tobytes()
    assert P.UINT8_TO_FLOAT_LUT[0] == -1.0 and P.UINT8_TO_FLOAT_LUT[255] == 1.0


def _recipe_image(h: int, w: int) -> np.ndarray:
    """strings.json["image_recipe"], integer-only."""
    y, x, c = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing="ij")
    i = ((y * w + x) * 3 + c).astype(np.uint64)
    n = ((i * np.uint64(2654435761)) % np.uint64(2**32)) >> np.uint64(26)
    g = np.stack(
        [
            (x[..., 0] * 191) // (w - 1),
            (y[..., 0] * 191) // (h - 1),
            ((x[..., 0] + y[..., 0]) * 191) // (w + h - 2),
        ],
        axis=-1,
    )
    return (g + n.astype(np.int64)).astype(np.uint8)


def _image_cases(strings):
    return {img["name"]: img for img in strings["images"]}


FIXTURE_IMAGES = ["img_480x640", "img_720x1280", "img_224x224", "img_100x300", "img_301x97",
                  "img_60x80"]
SHRUNK_FIXTURE_IMAGES = ["img_480x640", "img_720x1280", "img_100x300", "img_301x97"]


def _fixture_input(name, ref, strings) -> np.ndarray:
    meta = _image_cases(strings)[name]
    if meta["stored"]:
        image = ref[f"image.{name}.input"]
    else:
        image = _recipe_image(meta["height"], meta["width"])
    assert _sha(image) == meta["input_sha256"]
    return image


def _levels(model_float: np.ndarray) -> np.ndarray:
    """Model floats (LUT values) -> the uint8 levels they encode."""
    return np.rint((model_float.astype(np.float64) + 1.0) * 127.5).astype(np.int64)


def _assert_exact_openpi(name, image, resized, model, ref, strings):
    """Every byte of openpi's resize-with-pad and float conversion (the fixture's hashes)."""
    meta = _image_cases(strings)[name]
    assert resized.dtype == np.uint8 and resized.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    if f"image.{name}.resized" in ref:
        diff = np.abs(resized.astype(int) - ref[f"image.{name}.resized"].astype(int))
        assert diff.max() <= MAX_PIXEL_DIFF, (
            f"{name}: {np.count_nonzero(diff)} pixel values differ from openpi, max {diff.max()}")
    assert _sha(resized) == meta["resized_sha256"], f"{name}: resized bytes differ from openpi"
    assert _sha(model[None]) == meta["model_float_sha256"], f"{name}: model floats differ"
    if f"image.{name}.model_float" in ref:
        assert model[None].tobytes() == ref[f"image.{name}.model_float"].tobytes()


def _openpi_resized(name, ref, strings) -> np.ndarray:
    """openpi's resized uint8 image: stored, or (224x224) the input returned unchanged."""
    if f"image.{name}.resized" in ref:
        return ref[f"image.{name}.resized"]
    assert _image_cases(strings)[name]["returned_unchanged"]
    return _fixture_input(name, ref, strings)


def _diff_report(label: str, ours: np.ndarray, expected: np.ndarray) -> tuple[int, float, str]:
    diff = np.abs(ours.astype(np.int64) - expected.astype(np.int64))
    fraction = float(np.count_nonzero(diff)) / diff.size
    text = (f"{label}: max diff {int(diff.max())} levels, {np.count_nonzero(diff)} of "
            f"{diff.size} values differ ({100 * fraction:.3f} %)")
    print(text)
    return int(diff.max()), fraction, text


@pytest.mark.parametrize("name", FIXTURE_IMAGES)
def test_resize_with_pad_matches_openpi(name, ref, strings):
    """resize="pillow": bit-identical to openpi on every fixture image."""
    meta = _image_cases(strings)[name]
    image = _fixture_input(name, ref, strings)

    resized = P.resize_with_pad(image, IMAGE_SIZE, IMAGE_SIZE, resize="pillow")
    model = P.image_to_model(resized)
    assert model.dtype == np.float32 and model.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    _assert_exact_openpi(name, image, resized, model, ref, strings)
    if meta["returned_unchanged"]:
        assert resized is image

    new_h, new_w, top, left = P.resize_geometry(
        meta["height"], meta["width"], IMAGE_SIZE, IMAGE_SIZE
    )
    assert [new_h, new_w] == meta["resized_hw"]
    assert [top, left] == meta["pad_top_left"]

    # The fused path (no canvas, padding written as -1) gives the same bytes, on the host and
    # through the device form (run here on the CPU device).
    out = np.full((3, IMAGE_SIZE, IMAGE_SIZE), 7.0, dtype=np.float32)
    fused = P.prepare_image(image, IMAGE_SIZE, out=out, resize="pillow")
    assert fused is out
    assert fused.tobytes() == model.tobytes()
    on_device = P.prepare_image_tensor(image, IMAGE_SIZE, "cpu", resize="pillow")
    assert on_device.numpy().tobytes() == model.tobytes()
    prepared = P.PreparedImage.from_uint8(image, IMAGE_SIZE, resize="pillow")
    assert prepared.data.tobytes() == model.tobytes() and prepared.resize == "pillow"


@pytest.mark.parametrize("name", FIXTURE_IMAGES)
def test_fast_resize_within_one_level_of_openpi(name, ref, strings):
    """resize="fast" (the default): every value within 1 level of openpi's, on every fixture
    image, through each entry point; the fraction of differing values is printed and in the
    assertion message."""
    image = _fixture_input(name, ref, strings)
    expected = _openpi_resized(name, ref, strings)  # (224, 224, 3) uint8, openpi's bytes
    expected_levels = expected.transpose(2, 0, 1)  # (3, 224, 224)

    resized = P.resize_with_pad(image, IMAGE_SIZE, IMAGE_SIZE)  # default: fast
    assert resized.dtype == np.uint8 and resized.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    outputs = {
        "resize_with_pad": resized.transpose(2, 0, 1),
        "prepare_image": _levels(P.prepare_image(image, IMAGE_SIZE)),
        "PreparedImage.from_uint8": _levels(P.PreparedImage.from_uint8(image, IMAGE_SIZE).data),
        "prepare_image_tensor(cpu)": _levels(P.prepare_image_tensor(image, IMAGE_SIZE).numpy()),
    }
    for label, levels in outputs.items():
        worst, fraction, text = _diff_report(f"{name} fast {label}", levels, expected_levels)
        assert worst <= FAST_MAX_LEVEL_DIFF, text
        assert fraction <= FAST_MAX_DIFF_FRACTION, text
    # The host entry points share one kernel: identical among themselves.
    assert np.array_equal(outputs["prepare_image"], outputs["resize_with_pad"])
    assert np.array_equal(outputs["PreparedImage.from_uint8"], outputs["prepare_image"])
    # Padding stays exact black: every differing value lies inside the resized region.
    meta = _image_cases(strings)[name]
    (new_h, new_w), (top, left) = meta["resized_hw"], meta["pad_top_left"]
    inside = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    inside[top : top + new_h, left : left + new_w] = True
    assert not np.any((outputs["prepare_image"] != expected_levels)[:, ~inside])


@pytest.mark.parametrize("name", SHRUNK_FIXTURE_IMAGES)
def test_fast_resize_fails_the_exact_openpi_test(name, ref, strings):
    """The switch is real: the default path does not produce openpi's bytes on a shrink."""
    image = _fixture_input(name, ref, strings)
    resized = P.resize_with_pad(image, IMAGE_SIZE, IMAGE_SIZE)
    model = P.prepare_image(image, IMAGE_SIZE)
    with pytest.raises(AssertionError, match="differ"):
        _assert_exact_openpi(name, image, resized, model, ref, strings)


def test_fast_resize_is_pillow_when_enlarging_or_unchanged(ref, strings):
    """Enlarging goes through Pillow (torch's uint8 kernel is 2 levels off there); an image
    already at the model size is only converted.  Both are exact under the default."""
    for name in ("img_60x80", "img_224x224"):
        image = _fixture_input(name, ref, strings)
        fast = P.prepare_image(image, IMAGE_SIZE)
        exact = P.prepare_image(image, IMAGE_SIZE, resize="pillow")
        assert fast.tobytes() == exact.tobytes(), name


# Geometries beyond the fixture: odd sizes, 1-pixel results, extreme aspect ratios both ways,
# near-square shrinks by one pixel, enlargements, large frames.
EXTRA_GEOMETRIES = [
    (481, 641), (479, 639), (1080, 1920), (300, 99), (224, 225), (225, 224), (333, 777),
    (1000, 20), (20, 1000), (2000, 9), (9, 2000), (448, 2), (2, 448), (9, 1000), (224, 100),
    (100, 224), (223, 1), (1, 223),
    (50, 50), (113, 57), (1, 1),
]


@pytest.mark.parametrize("kind", ["noise", "recipe"])
@pytest.mark.parametrize("shape", EXTRA_GEOMETRIES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fast_resize_within_one_level_on_more_geometries(shape, kind):
    h, w = shape
    if kind == "noise":
        image = np.random.default_rng(h * 10007 + w).integers(0, 256, (h, w, 3), np.uint8)
    else:
        if h < 2 or w < 2:
            pytest.skip("the recipe needs at least 2 x 2 pixels")
        image = _recipe_image(h, w)
    exact = P.prepare_image(image, IMAGE_SIZE, resize="pillow")
    for label, out in (
        ("prepare_image", P.prepare_image(image, IMAGE_SIZE)),
        ("prepare_image_tensor(cpu)", P.prepare_image_tensor(image, IMAGE_SIZE).numpy()),
    ):
        worst, fraction, text = _diff_report(f"{h}x{w} {kind} fast {label}", _levels(out),
                                             _levels(exact))
        assert worst <= FAST_MAX_LEVEL_DIFF, text
        # 1-2 pixel wide results are mostly edge pixels: allow more of them to differ.
        small = min(P.resize_geometry(h, w, IMAGE_SIZE, IMAGE_SIZE)[:2]) < 8
        assert small or fraction <= FAST_MAX_DIFF_FRACTION, text


def test_fast_resize_same_bytes_for_any_torch_thread_count(ref):
    """The uint8 kernel is integer arithmetic: the thread count (which does change float model
    outputs, docs/REPLAY.md) never changes the prepared images."""
    torch = pytest.importorskip("torch")
    image = ref["image.img_480x640.input"]
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2, 3):
            P.set_torch_threads(threads)
            outputs.append(P.prepare_image(image, IMAGE_SIZE).tobytes())
    finally:
        torch.set_num_threads(before)
    assert outputs[0] == outputs[1] == outputs[2]


def test_fast_resize_reads_read_only_buffers():
    """ROS message data arrives as read-only memory: same result, no torch warning."""
    image = np.random.default_rng(3).integers(0, 256, (300, 400, 3), np.uint8)  # a shrink
    expected = P.prepare_image(image, IMAGE_SIZE)
    frozen = image.copy()
    frozen.flags.writeable = False
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.prepare_image(frozen, IMAGE_SIZE).tobytes() == expected.tobytes()
        assert P.prepare_image_tensor(frozen, IMAGE_SIZE).numpy().tobytes() == (
            P.prepare_image_tensor(image, IMAGE_SIZE).numpy().tobytes())


def test_prepare_image_tensor_writes_out_in_place(ref):
    torch = pytest.importorskip("torch")
    image = ref["image.img_480x640.input"]
    out = torch.full((3, IMAGE_SIZE, IMAGE_SIZE), 7.0)
    assert P.prepare_image_tensor(image, IMAGE_SIZE, "cpu", out=out) is out
    assert torch.all(out[:, :28] == -1.0) and torch.all(out[:, 28 + 168 :] == -1.0)


@pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs CUDA (the device resize path)"
)
@pytest.mark.parametrize("name", FIXTURE_IMAGES)
def test_prepare_image_tensor_on_cuda(name, ref, strings):
    image = _fixture_input(name, ref, strings)
    expected = _openpi_resized(name, ref, strings).transpose(2, 0, 1)
    exact = P.prepare_image_tensor(image, IMAGE_SIZE, "cuda", resize="pillow")
    assert exact.device.type == "cuda"
    assert exact.cpu().numpy().tobytes() == P.prepare_image(image, IMAGE_SIZE,
                                                            resize="pillow").tobytes()
    fast = P.prepare_image_tensor(image, IMAGE_SIZE, "cuda")
    worst, fraction, text = _diff_report(f"{name} fast cuda", _levels(fast.cpu().numpy()),
                                         expected)
    assert worst <= FAST_MAX_LEVEL_DIFF and fraction <= FAST_MAX_DIFF_FRACTION, text


def test_resize_setting_is_validated(ref):
    image = ref["image.img_480x640.input"]
    with pytest.raises(ValueError, match=r"resize: expected one of \['fast', 'pillow', "
                                         r"'lerobot'\], "
                                         r"found 'bicubic'"):
        P.prepare_image(image, IMAGE_SIZE, resize="bicubic")
    with pytest.raises(ValueError, match="resize: expected one of"):
        P.resize_with_pad(image, IMAGE_SIZE, IMAGE_SIZE, resize="PIL")
    with pytest.raises(ValueError, match="image 'cam': resize: expected one of"):
        P.PreparedImage.from_uint8(image, IMAGE_SIZE, "cam", resize=None)
    with pytest.raises(ValueError, match="PreparedImage.resize: expected one of"):
        P.PreparedImage(np.zeros((3, 4, 4), np.float32), resize="exact")
    with pytest.raises(ValueError, match="resize: expected one of"):
        P.prepare_image_tensor(image, IMAGE_SIZE, resize="nearest")
    mapping = P.CameraMapping(slots=P.MODEL_SLOTS[:1], sources={"a": "base_0_rgb"})
    with pytest.raises(ValueError, match="resize: expected one of"):
        mapping.assemble({"a": image}, IMAGE_SIZE, resize="Fast")
    assert P.RESIZE_METHODS == ("fast", "pillow", "lerobot") and P.DEFAULT_RESIZE == "fast"


def test_prepared_with_another_resize_is_refused(ref):
    mapping = P.CameraMapping(slots=P.MODEL_SLOTS[:1], sources={"a": "base_0_rgb"})
    image = ref["image.img_480x640.input"]
    fast = P.PreparedImage.from_uint8(image, IMAGE_SIZE)
    assert fast.resize == "fast"
    with pytest.raises(ValueError, match="camera 'a': prepared with resize='fast', the "
                                         "preprocessor uses resize='pillow'"):
        mapping.assemble({"a": fast}, IMAGE_SIZE, resize="pillow")
    # Not recorded (a caller's own PreparedImage(data)): accepted by either.
    images, _ = mapping.assemble({"a": P.PreparedImage(fast.data)}, IMAGE_SIZE, resize="pillow")
    assert images[0].tobytes() == fast.data.tobytes()


def test_set_torch_threads():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        assert P.set_torch_threads(1) == before
        assert torch.get_num_threads() == 1
        assert P.set_torch_threads(2) == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"torch threads: expected a positive int, found"):
            P.set_torch_threads(bad)


def test_resize_geometry_odd_padding_goes_bottom_right():
    # 100x300 -> 74x224: 150 rows of padding, 75 on top (int((224-74)/2)), 75 below.
    assert P.resize_geometry(100, 300, 224, 224) == (74, 224, 75, 0)
    # 301x97 -> 224x72 at left 76.
    assert P.resize_geometry(301, 97, 224, 224) == (224, 72, 0, 76)
    # 99 wide -> 73 px: (224 - 73) / 2 = 75.5 -> 75 left, 76 right.
    new_h, new_w, top, left = P.resize_geometry(300, 99, 224, 224)
    assert (new_h, left) == (224, int((224 - new_w) / 2))


def test_resize_rejects_degenerate_aspect():
    with pytest.raises(ValueError, match="aspect"):
        P.resize_geometry(1, 1000, 224, 224)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((224, 224, 3), np.float32), "uint8"),
        (np.zeros((3, 224, 224), np.uint8), r"\[3, 224, 224\]"),
        (np.zeros((224, 224), np.uint8), r"\[224, 224\]"),
        (np.zeros((224, 224, 4), np.uint8), r"\[224, 224, 4\]"),
    ],
)
def test_image_validation(bad, match):
    with pytest.raises(ValueError, match=match) as err:
        P.resize_with_pad(bad, 224, 224)
    assert "HWC" in str(err.value)
    with pytest.raises(TypeError, match="numpy"):
        P.check_image("cam", [[1, 2, 3]])


def test_camera_mapping_missing_camera_black_and_masked(ref):
    mapping = P.CameraMapping(
        slots=P.MODEL_SLOTS,
        sources={"observation/image": "base_0_rgb", "observation/wrist_image": "left_wrist_0_rgb"},
    )
    img = ref["image.img_480x640.input"]
    images, masks = mapping.assemble({"observation/image": img}, IMAGE_SIZE, resize="pillow")
    assert images.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == np.float32
    assert masks.tolist() == [True, False, False]
    assert np.all(images[1:] == -1.0)
    expected = P.image_to_model(ref["image.img_480x640.resized"])
    assert images[0].tobytes() == expected.tobytes()
    fast, _ = mapping.assemble({"observation/image": img}, IMAGE_SIZE)  # default: fast
    assert np.all(fast[1:] == -1.0)
    assert np.abs(_levels(fast[0]) - _levels(expected)).max() == FAST_MAX_LEVEL_DIFF


def test_prepared_images_give_the_same_tensors(ref):
    mapping = P.CameraMapping(slots=P.MODEL_SLOTS[:2], sources={"a": "base_0_rgb",
                                                                "b": "left_wrist_0_rgb"})
    raw = {"a": ref["image.img_480x640.input"], "b": ref["image.img_301x97.input"]}
    for resize in P.RESIZE_METHODS:
        prepared = {k: P.PreparedImage.from_uint8(v, IMAGE_SIZE, resize=resize)
                    for k, v in raw.items()}
        images, masks = mapping.assemble(raw, IMAGE_SIZE, resize=resize)
        images2, masks2 = mapping.assemble(prepared, IMAGE_SIZE, resize=resize)
        assert images.tobytes() == images2.tobytes(), resize
        assert masks.tolist() == masks2.tolist() == [1, 1]
    with pytest.raises(ValueError, match="prepared at 98x98"):
        mapping.assemble({"a": P.PreparedImage.from_uint8(raw["a"], 98)}, IMAGE_SIZE)
    with pytest.raises(ValueError, match="float32"):
        P.PreparedImage(np.zeros((224, 224, 3), np.uint8))


def test_camera_mapping_validation():
    with pytest.raises(ValueError, match="right_wrist"):
        P.CameraMapping(slots=("base_0_rgb",), sources={"cam": "right_wrist_0_rgb"})
    with pytest.raises(ValueError, match="two cameras"):
        P.CameraMapping(slots=P.MODEL_SLOTS, sources={"a": "base_0_rgb", "b": "base_0_rgb"})
    lerobot = P.CameraMapping(
        slots=("observation.images.base_0_rgb", "observation.images.left_wrist_0_rgb"),
        sources={"front": "base_0_rgb"},
    )
    assert lerobot.slot_sources() == ["front", None]


# ---------------------------------------------------------------------------------- text


def _normalizer(use_quantiles: bool) -> P.Normalizer:
    return P.Normalizer.from_json(PRE / "norm_stats.json", use_quantiles=use_quantiles)


@pytest.mark.parametrize("conf", list(CONFS))
@pytest.mark.parametrize("index", range(8))
def test_full_text_pipeline_matches_openpi(conf, index, ref, strings, tokenizers):
    """Normalize -> tokenize with the normalized unpadded state -> pad state to 32."""
    sample = strings["samples"][index]
    expected = sample[conf]
    max_len, _, use_quantiles = CONFS[conf]
    norm = _normalizer(use_quantiles)

    state = norm.normalize(ref["text.state_raw"][index], "state")
    assert state.dtype == np.float64
    padded = P.pad_to_dim(state, 32)
    _assert_rel(padded, ref[f"text.{conf}.state"][index])

    tok = tokenizers[conf]
    ids, mask = tok.encode(sample["prompt"], state)
    assert ids.dtype == np.int64 and ids.shape == (max_len,)
    assert mask.dtype == np.bool_ and mask.shape == (max_len,)
    np.testing.assert_array_equal(ids, ref[f"text.{conf}.tokenized_prompt"][index])
    np.testing.assert_array_equal(mask, ref[f"text.{conf}.tokenized_prompt_mask"][index])

    assert P.clean_prompt(sample["prompt"]) == expected["cleaned_text"]
    if conf == "pi05":
        assert tok.text(sample["prompt"], state) == expected["full_prompt"]
        bins = P.discretize_state(state)
        np.testing.assert_array_equal(bins, ref["text.pi05.state_bins"][index])
        assert " ".join(map(str, bins.tolist())) == expected["state_str"]
    n = expected["n_tokens_before_pad_or_truncation"]
    assert int(mask.sum()) == min(n, max_len)
    assert expected["truncated"] == (n > max_len)


def test_truncated_samples_present(strings):
    # The fixture covers truncation for both lengths; guard against a silently changed fixture.
    assert [s["pi0"]["truncated"] for s in strings["samples"]].count(True) == 2
    assert [s["pi05"]["truncated"] for s in strings["samples"]].count(True) == 1


def test_state_ignored_without_discrete_state(tokenizers):
    tok = tokenizers["pi0"]
    a = tok.encode("pick up the cup", np.array([0.1, 0.2]))
    b = tok.encode("pick up the cup")
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0][int(a[1].sum()) - 1] == 4  # trailing "\n" piece (fixture newline id 4)


def test_discrete_state_requires_state(tokenizers):
    with pytest.raises(ValueError, match="state=None"):
        tokenizers["pi05"].encode("pick up the cup")


def _disc_names(strings):
    return [c["name"] for c in strings["discretization_cases"]]


@pytest.mark.parametrize(
    "name",
    [
        "bin_edges",
        "outside_range",
        "below_edges_f32",
        "f64_just_below_edge",
        "f32_of_previous",
        "dims_3",
        "dims_14",
        "negative_zero",
    ],
)
def test_discretization_cases(name, ref, strings, tokenizers):
    case = next(c for c in strings["discretization_cases"] if c["name"] == name)
    state = ref[f"disc.{name}.state"]
    assert str(state.dtype) == case["dtype"]
    bins = P.discretize_state(state)
    np.testing.assert_array_equal(bins, ref[f"disc.{name}.bins"])
    tok = tokenizers["pi05"]
    assert tok.text(strings["discretization_prompt"], state) == case["full_prompt"]
    ids, mask = tok.encode(strings["discretization_prompt"], state)
    np.testing.assert_array_equal(ids, ref[f"disc.{name}.tokenized_prompt"])
    np.testing.assert_array_equal(mask, ref[f"disc.{name}.tokenized_prompt_mask"])


def test_all_disc_cases_covered(strings):
    assert set(_disc_names(strings)) == {
        "bin_edges",
        "outside_range",
        "below_edges_f32",
        "f64_just_below_edge",
        "f32_of_previous",
        "dims_3",
        "dims_14",
        "negative_zero",
    }


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(-1.5, 1.5, allow_nan=False),
            st.floats(-1e-300, 1e-300),
            st.sampled_from([-1.0, -0.0, 0.0, 0.9921875, 1.0, -0.0078125]),
        ),
        min_size=1,
        max_size=32,
    ),
    st.booleans(),
)
def test_discretize_equals_np_digitize(values, as_f32):
    x = np.array(values, dtype=np.float32 if as_f32 else np.float64)
    expected = np.digitize(x, np.linspace(-1, 1, 256 + 1)[:-1]) - 1
    np.testing.assert_array_equal(P.discretize_state(x), expected)


def test_tokenizer_cache_returns_read_only_equal_arrays(tokenizers):
    tok = tokenizers["pi05"]
    s = np.array([0.1, -0.3, 0.5])
    ids1, mask1 = tok.encode("wipe the table", s)
    ids2, mask2 = tok.encode("wipe the table", s + 1e-4)  # same bins -> cache hit
    assert ids1 is ids2 and mask1 is mask2
    assert not ids1.flags.writeable and not mask1.flags.writeable
    ids3, _ = tok.encode("wipe the table", s + 0.05)  # different bins -> different ids
    assert not np.array_equal(ids1, ids3)


# ------------------------------------------------------------------------------ tokenizer files


# find_tokenizer / find_norm_stats: test/test_assets.py (pi0_ros.model.assets)


def test_tokenizer_from_directory(tmp_path, strings, ref):
    shutil.copy(PRE / "tokenizer.model", tmp_path / "tokenizer.model")
    tok = P.PromptTokenizer(tmp_path, 48)
    ids, _ = tok.encode(strings["samples"][0]["prompt"])
    np.testing.assert_array_equal(ids, ref["text.pi0.tokenized_prompt"][0])
    assert tok.vocab_size == 512


# ---------------------------------------------------------------------------------- prompts


def test_resolve_prompt():
    assert P.resolve_prompt(None, "do it") == "do it"
    assert P.resolve_prompt("", "do it") == ""  # openpi injects only when the key is absent
    assert P.resolve_prompt(np.array("pick")) == "pick"
    assert P.resolve_prompt(b"pick") == "pick"
    with pytest.raises(ValueError, match="default_prompt"):
        P.resolve_prompt(None)
    with pytest.raises(TypeError, match="string"):
        P.resolve_prompt(3)


# ---------------------------------------------------------------------------------- state


def test_state_validation():
    good = np.zeros(8, np.float32)
    assert P.check_state("observation/state", good, 8).dtype == np.float32
    assert P.check_state("s", [1, 2], 2).dtype == np.float64
    with pytest.raises(ValueError, match=r"'observation/state': expected 8 values, found 7"):
        P.check_state("observation/state", np.zeros(7), 8)
    bad = good.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match=r"NaN/Inf\) at indices \[3\]"):
        P.check_state("s", bad, 8)
    bad[3] = np.inf
    with pytest.raises(ValueError, match="NaN/Inf"):
        P.check_state("s", bad, 8)
    with pytest.raises(ValueError, match="1-D"):
        P.check_state("s", np.zeros((2, 4)), None)
    with pytest.raises(ValueError, match="missing"):
        P.check_state("s", None, 8)


# ---------------------------------------------------------------------------------- normalization


@pytest.mark.parametrize("use_quantiles", [False, True])
def test_normalize_matches_openpi(use_quantiles, ref):
    norm = _normalizer(use_quantiles)
    suffix = "quantile" if use_quantiles else "zscore"
    state = norm.normalize(ref["text.state_raw"], "state")
    assert state.dtype == np.float64
    _assert_rel(state, ref[f"norm.state_{suffix}"])
    actions = norm.normalize(ref["norm.actions_raw"], "actions")
    _assert_rel(actions, ref[f"norm.actions_{suffix}"])
    # The fixture's degenerate dims (std = 0, q01 = q99) are covered: there only the 1e-6 counts.
    assert norm.stats["state"].std[7] == 0.0 and norm.stats["actions"].std[6] == 0.0
    assert norm.stats["state"].q01[7] == norm.stats["state"].q99[7]


@pytest.mark.parametrize("use_quantiles", [False, True])
def test_unnormalize_matches_openpi(use_quantiles, ref):
    norm = _normalizer(use_quantiles)
    suffix = "quantile" if use_quantiles else "zscore"
    model_out = ref["norm.actions_model"]  # (50, 32) float32
    out = norm.unnormalize(model_out, "actions")
    assert out.dtype == np.float64 and out.shape == (50, 32)
    _assert_rel(out, ref[f"norm.actions_unnorm_{suffix}"])
    _assert_rel(out[:, :7], ref[f"norm.actions_out_{suffix}"])
    if use_quantiles:
        # dims past len(q01) pass through unchanged (float32 values)
        assert np.array_equal(out[:, 7:], model_out[:, 7:].astype(np.float64))
        # (x + 1.0) / 2.0 in float32: the all-float64 evaluation differs measurably
        st_ = norm.stats["actions"]
        f64 = (model_out[:, :7].astype(np.float64) + 1) / 2 * (st_.q99 - st_.q01 + 1e-6) + st_.q01
        assert not np.array_equal(f64, out[:, :7])
        np.testing.assert_array_equal(out, ref["norm.actions_unnorm_quantile"])
    else:
        # z-score pads std with 1: dims 7.. become x * (1 + 1e-6), not x
        _assert_rel(out[:, 7:], model_out[:, 7:].astype(np.float64) * (1.0 + 1e-6))


def test_normalize_uses_first_stats_entries(ref):
    norm = _normalizer(True)
    full = norm.normalize(ref["text.state_raw"][0], "state")
    part = norm.normalize(ref["text.state_raw"][0][:5], "state")
    np.testing.assert_array_equal(part, full[:5])
    with pytest.raises(ValueError, match="9 values but the norm stats have 8"):
        norm.normalize(np.zeros(9), "state")


def test_lerobot_stats_equal_norm_stats_json():
    lerobot = P.Normalizer.from_lerobot(LEROBOT)
    openpi = _normalizer(True)
    assert lerobot.modes == {"state": "quantile", "actions": "quantile"}
    for key in ("state", "actions"):
        for stat in ("mean", "std", "q01", "q99"):
            a = getattr(lerobot.stats[key], stat)
            b = getattr(openpi.stats[key], stat)
            assert a.dtype == np.float64
            np.testing.assert_array_equal(a, b)


def test_lerobot_mean_std_mode(tmp_path):
    for f in LEROBOT.glob("policy_*"):
        shutil.copy(f, tmp_path / f.name)
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        text = (tmp_path / name).read_text().replace('"QUANTILES"', '"MEAN_STD"')
        (tmp_path / name).write_text(text)
    norm = P.Normalizer.from_lerobot(tmp_path)
    assert norm.modes == {"state": "zscore", "actions": "zscore"}


def test_norm_stats_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="norm_stats.json"):
        P.Normalizer.from_json(tmp_path / "norm_stats.json", use_quantiles=True)
    no_q = {
        "norm_stats": {
            "state": {"mean": [0.0], "std": [1.0]},
            "actions": {"mean": [0.0], "std": [1.0]},
        }
    }
    (tmp_path / "norm_stats.json").write_text(json.dumps(no_q))
    with pytest.raises(ValueError, match="q01/q99"):
        P.Normalizer.from_json(tmp_path / "norm_stats.json", use_quantiles=True)
    assert P.Normalizer.from_json(tmp_path, use_quantiles=False).dim("state") == 1
    with pytest.raises(ValueError, match="different lengths"):
        P.NormStats(mean=[0.0, 1.0], std=[1.0])


def test_pad_to_dim():
    x = np.arange(3, dtype=np.float64)
    padded = P.pad_to_dim(x, 5)
    np.testing.assert_array_equal(padded, [0, 1, 2, 0, 0])
    with pytest.raises(ValueError, match="width 6"):
        P.pad_to_dim(np.zeros(6), 5)


def test_bench_host_smoke(tmp_path):
    import os

    import torch

    from pi0_ros.tools import bench_host

    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    assert bench_host.main(["--iters", "3", "--warmup", "1", "--cameras", "2", "--height", "120",
                            "--width", "160", "--json", str(out),
                            "--tokenizer", str(PRE / "tokenizer.model"),
                            "--norm-stats", str(PRE / "norm_stats.json")]) == 0
    result = json.loads(out.read_text())
    assert set(result["results"]) == {f"{kind}/{method}" for kind in ("raw", "jpeg")
                                      for method in P.RESIZE_METHODS}
    for clocks in result["results"].values():
        for clock in ("wall", "cpu"):
            for part in bench_host.PARTS:
                assert 0 < clocks[clock][part]["p50"] <= clocks[clock][part]["p99"]
    for kind in ("raw", "jpeg"):
        ratio = result["ratio_pillow_over_fast_p50"][kind]
        assert set(ratio) == {"per_camera_wall", "pipelined_wall", "per_camera_cpu",
                              "pipelined_cpu"}
        assert all(r > 0 for r in ratio.values())
    cfg = result["config"]
    assert cfg["torch_threads"] == 1 and cfg["cameras"] == 2
    assert cfg["resize"] == list(P.RESIZE_METHODS)
    assert torch.get_num_threads() == threads  # restored
    if before is not None:
        assert os.sched_getaffinity(0) == before  # pinning is undone
