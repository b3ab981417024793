"""Every PIL mode the readers accept becomes 8-bit RGB with the right scaling, or is refused.

Expectations are computed with numpy (and colorsys) from the pixel values written, never
with PIL's own converters. Real files are written in each format that can hold the mode
(PNG, TIFF, PGM, JPEG) and read back through `open_image`, the imagefolder dataset and
`write_cache` (activations of a 16-bit image equal those of its numpy-scaled 8-bit copy).
"""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clt_lightning.data.cache_reader import open_cache
from clt_lightning.data.cache_writer import write_cache
from clt_lightning.data.datasets import DatasetConfig, build_dataset
from clt_lightning.data.image_datasets import open_image
from clt_lightning.data.image_modes import SUPPORTED_MODES, to_rgb
from clt_lightning.errors import UnreadableImageError

RNG = np.random.default_rng(0)
H, W = 6, 8


def grey_rgb(values: np.ndarray) -> np.ndarray:
    """[H, W] -> [H, W, 3] uint8, grey replicated."""
    return np.repeat(values.astype(np.uint8)[..., None], 3, axis=2)


def expected_16_bit(values: np.ndarray) -> np.ndarray:
    return grey_rgb(np.round(values.astype(np.float64) * 255.0 / 65535.0))


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """JPEG (JFIF) full-range BT.601."""
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    rgb = np.stack(
        [
            y + 1.402 * (cr - 128),
            y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
            y + 1.772 * (cb - 128),
        ],
        axis=-1,
    )
    return np.clip(np.round(rgb), 0, 255)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    out = np.empty(hsv.shape, dtype=np.float64)
    for index in np.ndindex(hsv.shape[:2]):
        h, s, v = (hsv[index] / 255.0).tolist()
        out[index] = np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0
    return np.round(out)


def case_images() -> dict[str, tuple[Image.Image, np.ndarray, int]]:
    """mode -> (in-memory image, expected RGB [H, W, 3], tolerance in grey levels)."""
    u8 = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
    alpha = RNG.integers(1, 256, (H, W), dtype=np.uint8)  # no 0: RGBa divides by it
    u16 = RNG.integers(0, 65536, (H, W), dtype=np.uint16)
    floats = RNG.random((H, W), dtype=np.float32)
    index = RNG.integers(0, 4, (H, W), dtype=np.uint8)
    palette = RNG.integers(0, 256, (4, 3), dtype=np.uint8)
    bits = RNG.random((H, W)) > 0.5
    cmyk = u8.astype(np.float64)
    premultiplied = np.round(u8[..., :3].astype(np.float64) * alpha[..., None] / 255.0)

    p_image = Image.fromarray(index, mode="P")
    p_image.putpalette(palette.flatten().tolist())
    pa_image = Image.new("PA", (W, H))
    pa_image.putpalette(palette.flatten().tolist())
    pa_image.putdata(list(zip(index.flatten().tolist(), alpha.flatten().tolist(), strict=True)))
    rgba_premultiplied = np.dstack([premultiplied.astype(np.uint8), alpha])
    return {
        "RGB": (Image.fromarray(u8[..., :3]), u8[..., :3], 0),
        "RGBX": (Image.fromarray(u8, mode="RGBX"), u8[..., :3], 0),
        "RGBA": (Image.fromarray(u8, mode="RGBA"), u8[..., :3], 0),
        "RGBa": (
            Image.fromarray(rgba_premultiplied, mode="RGBa"),
            np.clip(np.round(premultiplied * 255.0 / alpha[..., None]), 0, 255),
            2,  # un-premultiplying 8-bit values loses up to 255 / alpha levels / 2
        ),
        "L": (Image.fromarray(u8[..., 0], mode="L"), grey_rgb(u8[..., 0]), 0),
        "LA": (Image.fromarray(u8[..., :2], mode="LA"), grey_rgb(u8[..., 0]), 0),
        "1": (Image.fromarray(bits), grey_rgb(bits * 255), 0),
        "P": (p_image, palette[index], 0),
        "PA": (pa_image, palette[index], 0),
        "CMYK": (
            Image.fromarray(u8, mode="CMYK"),
            np.round((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255.0),
            1,
        ),
        "YCbCr": (Image.fromarray(u8[..., :3], mode="YCbCr"), ycbcr_to_rgb(u8[..., :3]), 2),
        "HSV": (Image.fromarray(u8[..., :3], mode="HSV"), hsv_to_rgb(u8[..., :3]), 1),
        "I;16": (Image.fromarray(u16), expected_16_bit(u16), 0),
        "I": (Image.fromarray(u16.astype(np.int32)), expected_16_bit(u16), 0),
        "F": (Image.fromarray(floats), grey_rgb(np.round(floats.astype(np.float64) * 255)), 0),
    }


CASES = case_images()


@pytest.mark.parametrize("mode", list(CASES))
def test_every_mode_is_scaled_to_8_bit_rgb(mode: str) -> None:
    image, expected, tolerance = CASES[mode]
    assert image.mode == mode
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (W, H)
    difference = np.abs(np.asarray(rgb).astype(np.int64) - expected.astype(np.int64))
    assert difference.max() <= tolerance, f"{mode}: off by {difference.max()}"


def test_the_cases_cover_every_supported_mode() -> None:
    assert set(SUPPORTED_MODES) - set(CASES) <= {"I;16L", "I;16B", "I;16N", "La"}


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (Image.fromarray(np.array([[-1, 70000]], dtype=np.int32)), "values -1..70000"),
        (Image.fromarray(np.array([[0.0, 2.5]], dtype=np.float32)), "values 0..2.5"),
        (Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32)), "NaN"),
        (Image.new("LAB", (2, 2)), "mode LAB is not supported"),
    ],
    ids=["int32 out of 16-bit range", "float above 1", "float NaN", "LAB"],
)
def test_modes_without_a_faithful_conversion_are_refused(image: Image.Image, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        to_rgb(image)


def gradient_16_bit() -> np.ndarray:
    """A 0..65535 horizontal gradient, [16, 64] uint16."""
    return np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (16, 1))


def test_16_bit_png_is_not_white(tmp_path: Path) -> None:
    """The issue's input: a 16-bit PNG gradient used to be cached 99.6% pure white."""
    values = gradient_16_bit()
    path = tmp_path / "gradient16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as opened:
        assert opened.mode == "I;16"  # really a 16-bit file
    rgb = np.asarray(open_image(path))
    assert np.array_equal(rgb, expected_16_bit(values))
    assert (rgb == 255).mean() < 0.05


def write_mode_files(folder: Path) -> dict[str, tuple[Path, np.ndarray, int]]:
    """Real files of the modes each format can hold -> (path, expected RGB, tolerance)."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[Path, np.ndarray, int]] = {}
    values = gradient_16_bit()
    for name, (mode, suffix) in {
        "png_I16": ("I;16", ".png"),
        "tiff_I16": ("I;16", ".tiff"),
        "pgm_16": ("I;16", ".pgm"),
        "tiff_I": ("I", ".tiff"),
    }.items():
        array = values if mode == "I;16" else values.astype(np.int32)
        path = folder / f"{name}{suffix}"
        Image.fromarray(array).save(path)
        files[name] = (path, expected_16_bit(values), 0)
    floats = (values / 65535.0).astype(np.float32)
    Image.fromarray(floats).save(folder / "tiff_F.tiff")
    files["tiff_F"] = (folder / "tiff_F.tiff", grey_rgb(np.round(floats * 255.0)), 0)
    for mode, suffix in {"L": ".png", "LA": ".png", "RGBA": ".png", "P": ".png",
                         "1": ".png", "CMYK": ".tiff"}.items():  # fmt: skip
        image, expected, tolerance = CASES[mode]
        path = folder / f"{mode.lower()}_{mode}{suffix}"
        image.save(path)
        files[mode] = (path, expected, tolerance)
    return files


def test_real_files_of_every_format_read_right(tmp_path: Path) -> None:
    files = write_mode_files(tmp_path / "files")
    modes = {}
    for name, (path, expected, tolerance) in files.items():
        with Image.open(path) as opened:
            modes[name] = opened.mode
        rgb = np.asarray(open_image(path)).astype(np.int64)
        assert np.abs(rgb - expected).max() <= tolerance, f"{name} ({modes[name]})"
    # the formats really hold the wide modes (else the test would prove nothing)
    assert modes["pgm_16"] in ("I", "I;16", "I;16B") and modes["tiff_F"] == "F"
    assert modes["png_I16"] == "I;16" and modes["tiff_I"] == "I" and modes["CMYK"] == "CMYK"


def test_refused_file_names_the_file_and_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "hdr.tiff"
    Image.fromarray(np.array([[0.0, 4.0]], dtype=np.float32)).save(path)
    with pytest.raises(UnreadableImageError, match=r"hdr\.tiff.*mode F.*\[0, 1\]") as caught:
        open_image(path)
    assert caught.value.path == str(path)


class TinyTeacher:
    """A cache teacher whose activations are the 32x32 input pixels themselves."""

    n_layers, d_model, tokens_per_image = 1, 3, 16

    def identity(self) -> dict:
        return {"name": "pixels"}

    def capture(self, images: torch.Tensor):
        x = images[:, :, ::8, ::8].flatten(2).transpose(1, 2)[:, :, None, :]  # [N, 16, 1, 3]
        return type("Capture", (), {"x": x, "y": x * 2})()


def _transform(image: Image.Image) -> torch.Tensor:
    return (
        torch.from_numpy(np.asarray(image.resize((32, 32), Image.NEAREST)).copy())
        .permute(2, 0, 1)
        .float()
        / 255.0
    )


def test_cache_of_a_16_bit_image_equals_its_numpy_scaled_copy(tmp_path: Path) -> None:
    """`write_cache` over an imagefolder: a 16-bit PNG and its numpy-scaled 8-bit RGB copy
    give the same activations; an image with no faithful conversion is skipped with its
    reason in the manifest (on_bad_image='skip')."""
    root = tmp_path / "images"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
    values = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 1))
    Image.fromarray(values).save(root / "train" / "a" / "0_wide.png")
    Image.fromarray(expected_16_bit(values)).save(root / "train" / "a" / "1_eight.png")
    Image.fromarray(np.full((32, 32), 3.0, np.float32)).save(root / "train" / "a" / "2_hdr.tiff")
    dataset = build_dataset(DatasetConfig(name="imagefolder", root=str(root)), "train", _transform)
    out = write_cache(TinyTeacher(), dataset, tmp_path / "cache", dtype="fp32",
                      images_per_shard=4, batch_size=4, on_bad_image="skip", progress=False)  # fmt: skip
    cache = open_cache(out)
    shard = cache.load_shard(0)
    assert shard["image_id"].tolist() == [0, 1]
    assert torch.equal(shard["x"][0], shard["x"][1])
    want = torch.from_numpy(expected_16_bit(values)[::8, ::8].reshape(16, 3) / 255.0).float()
    assert torch.allclose(shard["x"][0, :, 0], want)  # the gradient, not white
    manifest = json.loads((out / "manifest.json").read_text())
    [skipped] = manifest["skipped"]
    assert skipped["image_id"] == 2
    assert "2_hdr.tiff" in skipped["reason"] and "mode F" in skipped["reason"]
