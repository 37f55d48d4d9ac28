"""The policy node's fault probe (issue 13 item 14) below the node: the checks the node's
converters and the pipeline apply (no DDS; test_policy_node_surface.py drives them through the
node). Huge image headers refused before decoding, duplicate / absurd joint states, prompts
that are too long or would be cut by the tokenizer, and log text that is bounded and printable.
"""

from __future__ import annotations


import zlib

import numpy as np
import pytest
from ros_helpers import FIXTURES

from pi0_ros.pipeline import PolicyPipeline, config_from_values
from pi0_ros.pipeline.config import MAX_IMAGE_PIXELS, printable
from pi0_ros.pipeline.core import LOG_TEXT_CHARS
from pi0_ros.ros import conversions as conv
from pi0_ros.ros.sync import ApproximateTimeSynchronizer

BASE = {"checkpoint": "/ckpt", "prompt": "pick", "cameras.topics": ["/cam"],
        "joint_states.names": ["a", "b"], "actions.joint_names": ["a", "b"]}


def _png_header(width: int, height: int) -> bytes:
    """A png signature + IHDR chunk claiming width x height (8-bit RGB): no pixel data."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + len(ihdr).to_bytes(4, "big") + chunk
            + zlib.crc32(chunk).to_bytes(4, "big"))


# -- images ----------------------------------------------------------------------------------


def test_compressed_size_reads_png_and_jpeg_headers():
    rgb = np.zeros((30, 50, 3), np.uint8)
    for fmt in ("png", "jpeg"):
        msg = conv.rgb_to_compressed(rgb, fmt)
        assert conv.compressed_size(msg.data) == (50, 30), fmt
    assert conv.compressed_size(_png_header(9000, 9000)) == (9000, 9000)
    assert conv.compressed_size(b"not an image at all") is None


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_huge_compressed_image_is_refused_before_decoding(monkeypatch, fmt):
    big = 9000
    if fmt == "png":
        data = _png_header(big, big) + b"\x00" * 10_000
    else:  # a real jpeg's header with its frame size patched to 9000 x 9000
        data = bytearray(conv.rgb_to_compressed(np.zeros((16, 16, 3), np.uint8), "jpeg").data)
        i = 2
        while data[i + 1] not in (0xC0, 0xC2):
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
        data[i + 5:i + 9] = big.to_bytes(2, "big") + big.to_bytes(2, "big")
    msg = conv.rgb_to_compressed(np.zeros((2, 2, 3), np.uint8), fmt)
    msg.data = bytes(data)
    monkeypatch.setattr(conv, "_opencv", lambda: pytest.fail("decoded a refused image"))
    with pytest.raises(conv.ConversionError, match="9000x9000") as info:
        conv.to_rgb(msg)
    assert info.value.reason == "image_too_large"


def test_max_pixels_is_configurable_and_raw_images_are_checked_too():
    msg = conv.rgb_to_image(np.zeros((40, 50, 3), np.uint8), "rgb8")
    assert conv.to_rgb(msg, max_pixels=2000).shape == (40, 50, 3)
    with pytest.raises(conv.ConversionError, match="50x40 = 2000 pixels > max_image_pixels 1999"):
        conv.to_rgb(msg, max_pixels=1999)
    assert MAX_IMAGE_PIXELS >= 3840 * 2160  # 4K cameras pass by default


# -- joint states ----------------------------------------------------------------------------


def _js(names, positions):
    return conv.vector_to_joint_state(list(names), np.asarray(positions, np.float64))


def test_duplicate_joint_names_are_refused_not_last_wins():
    with pytest.raises(conv.ConversionError, match="a more than once") as info:
        conv.joint_state_to_vector(_js(["a", "b", "a"], [1.0, 2.0, 3.0]), ["a", "b"])
    assert info.value.reason == "duplicate_joint"


@pytest.mark.parametrize(("value", "reason"), [
    (1e6, "absurd_state"), (-2e3, "absurd_state"), (1e39, "absurd_state"),
    (float("nan"), "nonfinite_state"), (float("inf"), "nonfinite_state"),
])
def test_absurd_and_nonfinite_state_is_refused_naming_the_joint(value, reason):
    msg = conv.vector_to_joint_state(["a", "b"], np.zeros(2))
    msg.position = [0.5, value]  # float64 on the wire: 1e39 does not fit a float32
    with pytest.raises(conv.ConversionError, match="b") as info:
        conv.joint_state_to_vector(msg, ["a", "b"])
    assert info.value.reason == reason


def test_state_bound_is_configurable():
    msg = _js(["a"], [5.0])
    assert conv.joint_state_to_vector(msg, ["a"], max_abs=10.0)[0] == 5.0
    with pytest.raises(conv.ConversionError, match="a=5"):
        conv.joint_state_to_vector(msg, ["a"], max_abs=1.0)


# -- prompts and log text --------------------------------------------------------------------


class Tokenizer:
    """Tokens = words + state dims (pi0.5 puts the state after the task)."""

    max_len = 12
    discrete_state = True

    def n_tokens(self, prompt, state=None):
        return len(prompt.split()) + len(state) + 4


class FakePolicy:
    model_name = "fake"
    camera_slots = ("base_0_rgb",)
    noise_shape = None
    state_dim = None
    rtc = None

    tokenizer = Tokenizer()

    def prompt_fit(self, prompt, state):
        tok = self.tokenizer
        return tok.n_tokens(prompt, state), tok.max_len, tok.discrete_state

    def prepare_image(self, rgb, name):
        return rgb

    def infer(self, obs, noise=None):
        return {"actions": np.zeros((4, 2), np.float32)}

    def status(self):
        return {}

    def close(self):
        pass


def _pipeline(**params):
    config = config_from_values({**BASE, **params})
    pipe = PolicyPipeline(config, clock=lambda: 1, image_of=lambda m: m,
                          state_of=lambda m, n: m,
                          make_sync=lambda n, q, s: ApproximateTimeSynchronizer(n, q, s))
    pipe.bind(FakePolicy())
    return pipe


def test_a_prompt_too_long_is_refused_at_configure_and_at_run_time():
    with pytest.raises(ValueError, match="300 characters > max_prompt_length 200"):
        config_from_values({**BASE, "prompt": "p" * 300, "max_prompt_length": 200})
    pipe = _pipeline(max_prompt_length=200)
    assert not pipe.set_prompt("p" * 1_000_000)
    assert pipe.prompt == "pick" and pipe.counts()["rejected.prompt_too_long"] == 1


def test_a_prompt_the_tokenizer_would_cut_is_refused():
    """pi0.5: the state follows the task in the prompt: truncation would cut the state out."""
    pipe = _pipeline()
    assert pipe.set_prompt("put the cup away")  # 4 words + 2 dims + 4 = 10 <= 12
    assert not pipe.set_prompt("put the red cup in the sink")  # 7 + 6 = 13 > 12
    assert pipe.prompt == "put the cup away"
    assert pipe.counts()["rejected.prompt_truncated"] == 1
    assert "13 tokens > the model's max_token_len 12" in pipe.last_rejection
    assert "state" in pipe.last_rejection
    with pytest.raises(ValueError, match="max_token_len"):  # the configured prompt: at bind
        _pipeline(prompt="put the red cup in the sink")


def test_prompt_tokenizer_counts_the_whole_pi05_text():
    from pi0_ros.processing import PromptTokenizer

    path = FIXTURES / "openpi_preprocess" / "tokenizer.model"
    tok = PromptTokenizer(path, 48, discrete_state=True)
    state = np.full(8, 0.999)
    short = tok.n_tokens("pick", state)
    assert short <= 48 and int(tok.encode("pick", state)[1].sum()) == short
    long = "pick up the red block and put it in the bowl " * 6
    assert tok.n_tokens(long, state) > 48  # encode() would cut it: the node refuses it


def test_rejection_text_is_printable_and_bounded():
    pipe = _pipeline()
    pipe.reject("test", "\x1b[31mred\nline\x00" + "y" * 10_000)
    text = pipe.last_rejection
    assert "\x1b" not in text and "\n" not in text and "\x00" not in text
    assert "\\x1b[31mred\\nline" in text
    assert len(text) < LOG_TEXT_CHARS + 100


def test_printable():
    assert printable("ok text") == "ok text"
    assert printable("a\tb", 10) == "a\\tb"
    assert printable("x" * 20, 5) == "xxxxx... (20 chars)"


