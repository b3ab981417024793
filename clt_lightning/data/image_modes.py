"""Every PIL image mode the readers accept, converted to 8-bit RGB with the right scaling.

`Image.convert("RGB")` is right for 8-bit modes but clips wider ones: a 16-bit PNG
(mode "I;16", 0..65535) comes out almost all white. `to_rgb` scales instead:

| mode | conversion |
|---|---|
| RGB, RGBX, 1, L, P, CMYK, YCbCr, HSV | PIL's converter (palette applied; CMYK as R = (255-C)(255-K)/255; YCbCr full-range BT.601) |
| RGBA, RGBa, LA, La, PA | alpha dropped, colour kept (what open_clip's own `_convert_to_rgb` does) |
| I;16, I;16L, I;16B, I;16N | unsigned 16-bit: round(v * 255 / 65535), grey replicated |
| I | 32-bit integers holding 16-bit values (16-bit PGM, 32-bit TIFF): as I;16 when all in 0..65535, else refused |
| F | 32-bit floats in [0, 1]: round(v * 255); refused when outside [0, 1] or not finite |
| LAB and anything else | refused (no colour profile to convert with) |

A refused image raises `ValueError` with the reason; `image_datasets.open_image` turns it into
`UnreadableImageError`, so `on_bad_image` decides (stop, or skip with the reason recorded
in the cache manifest).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

PIL_CONVERTED = ("RGB", "RGBX", "1", "L", "P", "CMYK", "YCbCr", "HSV")
ALPHA_DROPPED = ("RGBA", "RGBa", "LA", "La", "PA")
UNSIGNED_16 = ("I;16", "I;16L", "I;16B", "I;16N")
SUPPORTED_MODES = (*PIL_CONVERTED, *ALPHA_DROPPED, *UNSIGNED_16, "I", "F")
"""Modes `to_rgb` converts; any other mode is refused."""


def _grey(values: np.ndarray) -> Image.Image:
    """[H, W] uint8 grey -> RGB image (grey replicated)."""
    return Image.fromarray(values, mode="L").convert("RGB")


def _from_16_bit(values: np.ndarray) -> Image.Image:
    """[H, W] integers in 0..65535 -> RGB, round(v * 255 / 65535) (= round(v / 257))."""
    return _grey(((values.astype(np.int64) + 128) // 257).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `image`, scaled by its mode (see the module docstring).

    Args:
        image: A decoded PIL image of any mode.

    Returns:
        A new "RGB" image of the same size.

    Raises:
        ValueError: The mode cannot be converted faithfully (the message says why).
    """
    mode = image.mode
    if mode in PIL_CONVERTED:
        return image.convert("RGB")
    if mode in ALPHA_DROPPED:
        opaque = image.convert("LA") if mode == "La" else image  # PIL has no La -> RGB
        return opaque.convert("RGB")
    if mode in UNSIGNED_16:
        return _from_16_bit(np.asarray(image))
    if mode == "I":
        values = np.asarray(image)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ValueError(
                f"32-bit integer image (mode I) with values {low}..{high}: only 0..65535 "
                "(16-bit) has a standard 8-bit scaling; convert the file to 8-bit RGB"
            )
        return _from_16_bit(values)
    if mode == "F":
        return _from_float(np.asarray(image))
    raise ValueError(
        f"image mode {mode} is not supported (no faithful conversion to RGB here); "
        f"convert the file to RGB; supported modes: {', '.join(SUPPORTED_MODES)}"
    )


def _from_float(values: np.ndarray) -> Image.Image:
    """[H, W] float values in [0, 1] -> RGB, round(v * 255)."""
    if not np.isfinite(values).all():
        raise ValueError("floating-point image (mode F) holds NaN or Inf values")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"floating-point image (mode F) with values {low:g}..{high:g}: only values in "
            "[0, 1] have a standard 8-bit scaling; convert the file to 8-bit RGB"
        )
    return _grey(np.rint(values.astype(np.float64) * 255.0).astype(np.uint8))
