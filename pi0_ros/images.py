"""Camera images -> model inputs, as openpi does it: resize-with-pad and uint8 -> [-1, 1].

* ``resize_with_pad``  <- ``openpi_client.image_tools.resize_with_pad`` (uint8 in / out;
  ``resize="pillow"``: PIL, bit-identical; ``"fast"``, the default: torch's uint8 antialiased
  kernel, within 1 level; enlarging always goes through Pillow)
* ``resize="lerobot"``: LeRobot's pi0 / pi0.5 instead (``resize_with_pad_torch`` in
  ``_preprocess_images``, lerobot 0.4-0.6): the image as float32 ``u8 / 255``, torch bilinear
  *without* antialiasing, clamped to [0, 1], zero (black) padding, then ``x * 2 - 1``; never
  rounded to uint8, so ``prepare_image`` / ``prepare_image_tensor`` give LeRobot's floats.
* ``image_to_model``   <- ``models.model.Observation.from_dict`` (``u8 / 255 * 2 - 1``, float32)
* ``prepare_image`` / ``PreparedImage``: both at once, on a camera's arrival (the node), and
  ``prepare_image_tensor`` on a device.

numpy / Pillow; torch for the fast resize, ``prepare_image_tensor`` and ``set_torch_threads``
(imported on first use); no rclpy. Checked against the ``openpi_preprocess`` fixture.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

# uint8 -> float32 in [-1, 1]; openpi: `image.to(float32) / 255.0 * 2.0 - 1.0` (float32 ops).
# A lookup table gives the same bits (each entry is that float32 expression) and is ~10x faster.
UINT8_TO_FLOAT_LUT: np.ndarray = (
    np.arange(256, dtype=np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)
)  # (256,) float32
UINT8_TO_FLOAT_LUT.flags.writeable = False
# uint8 -> float32 in [0, 1] as LeRobot feeds cameras (`u8.float() / 255`), same bits.
UINT8_TO_UNIT_LUT: np.ndarray = np.arange(256, dtype=np.float32) / np.float32(255.0)
UINT8_TO_UNIT_LUT.flags.writeable = False


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def resize_geometry(in_h: int, in_w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left) of openpi's resize-with-pad for an ``in_h x in_w`` image.

    Same float expressions as ``image_tools._resize_with_pad_pil`` (truncation, not rounding;
    the odd padding pixel goes to the bottom / right).
    """
    ratio = max(in_w / width, in_h / height)
    new_h, new_w = int(in_h / ratio), int(in_w / ratio)
    if new_h < 1 or new_w < 1:
        raise ValueError(
            f"image {in_h}x{in_w}: aspect ratio too extreme to resize-with-pad into "
            f"{height}x{width} (would be {new_h}x{new_w})"
        )
    top, left = max(0, int((height - new_h) / 2)), max(0, int((width - new_w) / 2))
    return new_h, new_w, top, left


# Resize methods: one registry, read by the Preprocessor, PreparedImage, the tools and tests.
#   "fast":   torch's uint8 antialiased bilinear kernel; within 1 level of openpi's Pillow bytes.
#   "pillow": Pillow's own resampler; bit-identical to openpi (for comparisons with openpi).
#   "lerobot": LeRobot's float bilinear without antialiasing (its checkpoints' training inputs).
RESIZE_METHODS: tuple[str, ...] = ("fast", "pillow", "lerobot")
DEFAULT_RESIZE = "fast"


def check_resize(resize: Any, name: str = "resize") -> str:
    """``resize`` must name one of ``RESIZE_METHODS``; the error names the field."""
    if not isinstance(resize, str) or resize not in RESIZE_METHODS:
        raise ValueError(f"{name}: expected one of {list(RESIZE_METHODS)}, found {resize!r}")
    return resize


def set_torch_threads(threads: int) -> int:
    """Set torch's intra-op thread count for this process; returns the previous count.

    The fast resize and every CPU model op use this pool.  More threads than free cores make
    torch's workers spin against each other: a replay with 2 threads on a loaded 2-core machine
    ran 10x slower than with 1.  The count also changes float summation order, so results made
    with different counts can differ in the last bits (golden replay bags: up to 2.8e-7).
    """
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"torch threads: expected a positive int, found {threads!r}")
    import torch

    previous = torch.get_num_threads()
    if threads != previous:
        torch.set_num_threads(threads)
    return previous


def _pil_resize(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """PIL bilinear resize of a uint8 HWC RGB array (antialiased when shrinking).

    Done as two one-axis resizes, horizontal then vertical.  Pillow resamples separably and
    rounds to uint8 between the passes, so the pass order changes results by 1 level.  Pillow
    <= 12 (openpi's fixture: 11.2.1) always runs horizontal first; Pillow 13 picks the order
    itself (vertical first for e.g. a 301x97 -> 224x72 shrink, 11134 pixels off by 1).  Two
    explicit passes give Pillow <= 12's bytes on every version, at the same cost.
    """
    pil = Image.fromarray(image)
    in_h, in_w = image.shape[:2]
    if new_w != in_w:
        pil = pil.resize((new_w, in_h), resample=Image.BILINEAR)
    if new_h != in_h:
        pil = pil.resize((new_w, new_h), resample=Image.BILINEAR)
    return np.asarray(pil)  # (new_h, new_w, 3) uint8


def _torch_uint8(image: np.ndarray):
    """HWC uint8 numpy -> torch view (H, W, 3); a read-only array (e.g. a ROS message buffer)
    is copied first, since torch wraps only writable memory."""
    import torch

    if not image.flags.writeable:
        image = image.copy()
    return torch.from_numpy(image)


def _is_upscale(in_h: int, in_w: int, new_h: int, new_w: int) -> bool:
    # resize_with_pad keeps the aspect ratio, so both axes grow or neither does.
    return new_h > in_h or new_w > in_w


def _fast_resize_chw(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """The "fast" resize: uint8 HWC RGB -> uint8 CHW ``(3, new_h, new_w)``, C-contiguous.

    torch's uint8 antialiased bilinear (``F.interpolate(mode="bilinear", antialias=True)`` on a
    channels-last uint8 tensor: a SIMD port of Pillow's separable resampler, horizontal pass,
    uint8 rounding, vertical pass).  Its integer weights have fewer fraction bits than Pillow's
    22, so sums that land on a .5 tie can round the other way: within 1 level of Pillow, on
    0.08-0.30 % of the 224x224 values of the openpi fixture's shrinks and at most 0.85 % of the
    other geometries tested (test_processing prints the fraction for each).
    Enlarging (an input smaller than the model resolution) goes through Pillow instead: there
    the 2-tap weights make many exact ties and torch is off on 3-4 % of the values, by 2 levels
    where both passes tie (60x80 -> 168x224: 3.0 % of the fixture's values; 2 levels on noise),
    while Pillow on such a small input costs ~0.2 ms.  Releases the GIL; runs on torch's
    intra-op threads (``set_torch_threads``).
    """
    in_h, in_w = image.shape[:2]
    if _is_upscale(in_h, in_w, new_h, new_w):
        return np.ascontiguousarray(_pil_resize(image, new_h, new_w).transpose(2, 0, 1))
    import torch
    from torch.nn import functional as F

    nchw = _torch_uint8(image).permute(2, 0, 1)[None]  # (1, 3, H, W), channels-last strides
    with torch.inference_mode():
        out = F.interpolate(nchw, size=(new_h, new_w), mode="bilinear", antialias=True,
                            align_corners=False)  # (1, 3, new_h, new_w) uint8, contiguous
    return np.ascontiguousarray(out[0].numpy())


def _lerobot_resize(image: np.ndarray, new_h: int, new_w: int, device: Any = "cpu"):
    """LeRobot's resize: uint8 HWC -> torch float32 ``(3, new_h, new_w)`` in [0, 1] on ``device``.

    As LeRobot feeds a camera (``prepare_observation_for_inference``: ``u8.float() / 255``,
    channels first, contiguous) through ``resize_with_pad_torch`` (``F.interpolate`` bilinear,
    ``align_corners=False``, no antialiasing, then ``clamp(0, 1)``)."""
    import torch
    from torch.nn import functional as F

    with torch.inference_mode():
        if torch.device(device).type == "cpu":  # one pass: the LUT holds float32(k) / 255
            x = torch.from_numpy(np.take(UINT8_TO_UNIT_LUT, image.transpose(2, 0, 1)))[None]
        else:
            x = _torch_uint8(image).to(device).to(torch.float32) / 255
            x = x.permute(2, 0, 1).contiguous()[None]  # (1, 3, H, W)
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
        return x[0].clamp(0.0, 1.0)


def _lerobot_resize_uint8(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """LeRobot's ``resize_with_pad_torch`` on a uint8 image: torch's uint8 bilinear without
    antialiasing (then its ``round`` / ``clamp``, no-ops on uint8) -> uint8 CHW."""
    import torch
    from torch.nn import functional as F

    with torch.inference_mode():
        x = _torch_uint8(image).permute(2, 0, 1).contiguous()[None]  # (1, 3, H, W) uint8
        out = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return np.ascontiguousarray(out[0].numpy())


def _resize_chw(image: np.ndarray, new_h: int, new_w: int, resize: str) -> np.ndarray:
    """uint8 HWC -> uint8 CHW ``(3, new_h, new_w)`` with the named method."""
    if resize == "fast":
        return _fast_resize_chw(image, new_h, new_w)
    if resize == "lerobot":
        return _lerobot_resize_uint8(image, new_h, new_w)
    return np.ascontiguousarray(_pil_resize(image, new_h, new_w).transpose(2, 0, 1))


def resize_with_pad(
    image: np.ndarray, height: int, width: int, *, resize: str = DEFAULT_RESIZE
) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> uint8 ``[height, width, 3]``: openpi's resize-with-pad.

    Already that size: returned unchanged (the same object, as openpi does).  Otherwise the
    aspect-preserving bilinear resize pasted on a black canvas.  ``resize="pillow"``:
    bit-identical to ``openpi_client.image_tools.resize_with_pad`` (PIL's own fixed-point
    resampler); ``"fast"`` (default): within 1 level of it (see ``_fast_resize_chw``);
    ``"lerobot"``: LeRobot's ``resize_with_pad_torch`` on a uint8 image (same geometry).
    """
    image = check_image("image", image)
    check_resize(resize)
    in_h, in_w = image.shape[:2]
    if (in_h, in_w) == (height, width):
        return image
    new_h, new_w, top, left = resize_geometry(in_h, in_w, height, width)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    resized = _resize_chw(image, new_h, new_w, resize).transpose(1, 2, 0)  # (new_h, new_w, 3)
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas


def image_to_model(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 ``[S, S, 3]`` -> float32 ``[3, S, S]`` in [-1, 1], bit-identical to openpi.

    ``out``: optional preallocated float32 ``[3, S, S]`` buffer written in place (C-contiguous).
    """
    image = check_image("image", image)
    chw = np.ascontiguousarray(image.transpose(2, 0, 1))  # (3, S, S) uint8: cheap byte copy
    if out is None:
        return UINT8_TO_FLOAT_LUT[chw]
    np.take(UINT8_TO_FLOAT_LUT, chw, out=out)
    return out


def prepare_image(
    image: np.ndarray, size: int, out: np.ndarray | None = None, *, resize: str = DEFAULT_RESIZE
) -> np.ndarray:
    """uint8 HWC RGB camera image -> model float32 ``[3, size, size]`` (resize-with-pad + convert).

    Same values as ``image_to_model(resize_with_pad(image, size, size, resize=resize))`` without
    the canvas: the padding is written directly as ``-1.0`` (= black) and the resized pixels
    through the LUT.  ``resize="lerobot"``: LeRobot's floats instead (resized in float32, never
    rounded to uint8; ``_lerobot_resize``), ``* 2 - 1``.  Thread-safe (Pillow and torch release
    the GIL while resampling), so cameras can be prepared in parallel or as they arrive.
    """
    image = check_image("image", image)
    check_resize(resize)
    if out is None:
        out = np.empty((3, size, size), dtype=np.float32)
    in_h, in_w = image.shape[:2]
    if (in_h, in_w) == (size, size):
        return image_to_model(image, out=out)  # LeRobot: u8 / 255 * 2 - 1, the LUT's bits
    new_h, new_w, top, left = resize_geometry(in_h, in_w, size, size)
    if resize == "lerobot":
        if (new_h, new_w) != (size, size):
            out.fill(UINT8_TO_FLOAT_LUT[0])  # LeRobot pads 0.0 -> 0.0 * 2 - 1 = -1.0
        resized = _lerobot_resize(image, new_h, new_w).numpy()  # (3, new_h, new_w) in [0, 1]
        region = out[:, top : top + new_h, left : left + new_w]
        np.multiply(resized, np.float32(2.0), out=region)
        np.subtract(region, np.float32(1.0), out=region)
        return out
    resized_chw = _resize_chw(image, new_h, new_w, resize)  # (3, new_h, new_w) uint8
    if (new_h, new_w) == (size, size):
        np.take(UINT8_TO_FLOAT_LUT, resized_chw, out=out)
    else:
        out.fill(UINT8_TO_FLOAT_LUT[0])  # black padding
        region = out[:, top : top + new_h, left : left + new_w]  # (3, new_h, new_w) view
        np.take(UINT8_TO_FLOAT_LUT, resized_chw, out=region)
    return out  # (3, size, size) float32


_DEVICE_LUTS: dict[str, Any] = {}  # str(device) -> UINT8_TO_FLOAT_LUT as a torch tensor there


def prepare_image_tensor(
    image: np.ndarray, size: int, device: Any = "cpu", out: Any = None, *,
    resize: str = DEFAULT_RESIZE,
):
    """uint8 HWC RGB -> torch float32 ``[3, size, size]`` on ``device``, resized there.

    The device form of ``prepare_image``: the uint8 image is uploaded (a third of the bytes of
    the float result) and resized on the device.  ``"fast"``: float32 antialiased bilinear, one
    axis at a time (horizontal first) with Pillow's round-half-up to uint8 values after each
    pass, because torch's CUDA kernel has no uint8 form; within 1 level of Pillow like the CPU
    kernel (enlarging goes through Pillow on the host, as in ``_fast_resize_chw``).
    ``"pillow"``: Pillow on the host, then the upload; bit-identical.  The [-1, 1] conversion
    indexes the same LUT on the device, so equal uint8 pixels give equal float bits.
    ``"lerobot"``: LeRobot's float resize (``_lerobot_resize``) on the device.  On CUDA,
    call it from the thread that owns the device's work (the inference worker).
    ``out``: optional float32 ``[3, size, size]`` tensor on ``device``, written in place.
    """
    import torch
    from torch.nn import functional as F

    image = check_image("image", image)
    check_resize(resize)
    device = torch.device(device)
    lut = _DEVICE_LUTS.get(str(device))
    if lut is None:
        lut = torch.from_numpy(UINT8_TO_FLOAT_LUT.copy()).to(device)  # (256,) float32
        lut = _DEVICE_LUTS.setdefault(str(device), lut)
    if out is None:
        out = torch.empty((3, size, size), dtype=torch.float32, device=device)
    in_h, in_w = image.shape[:2]
    new_h, new_w, top, left = (size, size, 0, 0)
    if (in_h, in_w) != (size, size):
        new_h, new_w, top, left = resize_geometry(in_h, in_w, size, size)
    with torch.inference_mode():
        if resize == "lerobot" and (in_h, in_w) != (new_h, new_w):
            if (new_h, new_w) != (size, size):
                out.fill_(float(UINT8_TO_FLOAT_LUT[0]))  # black padding
            resized = _lerobot_resize(image, new_h, new_w, device)
            out[:, top : top + new_h, left : left + new_w] = resized * 2.0 - 1.0
            return out
        if (in_h, in_w) == (new_h, new_w):
            chw = _torch_uint8(image).to(device).permute(2, 0, 1)  # (3, S, S) uint8
        elif resize == "pillow" or _is_upscale(in_h, in_w, new_h, new_w):
            chw = torch.from_numpy(_resize_chw(image, new_h, new_w, "pillow")).to(device)
        else:
            x = _torch_uint8(image).to(device).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
            # Horizontal pass, then vertical, each resizing the last axis only: torch's float
            # antialiased CPU kernel mis-resizes the height of a 1-pixel-wide tensor (2000x1 ->
            # 224x1 is off by up to 150 levels, torch 2.13), so the vertical pass runs on the
            # transposed tensor.
            if new_w != in_w:
                x = _resize_last_axis(x, new_w, F)  # (1, 3, H, new_w)
            if new_h != in_h:
                x = _resize_last_axis(x.transpose(2, 3), new_h, F).transpose(2, 3)
            chw = x[0].to(torch.uint8)  # (3, new_h, new_w)
        if (new_h, new_w) != (size, size):
            out.fill_(float(UINT8_TO_FLOAT_LUT[0]))  # black padding
        out[:, top : top + new_h, left : left + new_w] = lut[chw.long()]
    return out  # (3, size, size) float32 on device


def _resize_last_axis(x, n: int, F):
    """Antialiased bilinear of float ``(1, C, A, B)`` -> ``(1, C, A, n)``, then Pillow's
    rounding of a pass to uint8 values (round half up, clamp)."""
    import torch

    x = F.interpolate(x, size=(int(x.shape[2]), n), mode="bilinear", antialias=True,
                      align_corners=False)
    return torch.floor(x + 0.5).clamp_(0.0, 255.0)


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedImage:
    """A camera image already through ``prepare_image``: float32 ``[3, S, S]`` in [-1, 1].

    Lets a caller resize each camera as it arrives (e.g. in its ROS callback) so that only a copy
    remains on the observation's critical path; ``CameraMapping.assemble`` accepts it in place of
    the uint8 image.  Same values as preparing inside ``assemble`` with the same ``resize``.
    ``resize``: the method that made it (None: not recorded); ``assemble`` refuses a recorded
    method other than its own, so fast and Pillow frames are never mixed unnoticed.
    """

    data: np.ndarray
    resize: str | None = None

    def __post_init__(self) -> None:
        d = self.data
        if (not isinstance(d, np.ndarray) or d.dtype != np.float32 or d.ndim != 3
                or d.shape[0] != 3 or d.shape[1] != d.shape[2]):
            found = f"{d.dtype} {list(d.shape)}" if isinstance(d, np.ndarray) else type(d)
            raise ValueError(f"PreparedImage.data: expected float32 [3, S, S], found {found}")
        if self.resize is not None:
            check_resize(self.resize, "PreparedImage.resize")

    @classmethod
    def from_uint8(
        cls, image: np.ndarray, size: int, name: str = "image", *, resize: str = DEFAULT_RESIZE
    ) -> PreparedImage:
        check_resize(resize, f"image {name!r}: resize")
        return cls(prepare_image(check_image(name, image), size, resize=resize), resize)

    @property
    def size(self) -> int:
        return int(self.data.shape[1])


def check_image(name: str, image: Any) -> np.ndarray:
    """Require a uint8 ``[H, W, 3]`` RGB numpy array; error names the field, expected and found."""
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"image {name!r}: expected a numpy uint8 array [H, W, 3] (HWC RGB), "
            f"found {type(image).__name__}"
        )
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image {name!r}: expected uint8 [H, W, 3] (HWC RGB), "
            f"found {image.dtype} {list(image.shape)}"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image {name!r}: empty image {list(image.shape)}")
    return image
