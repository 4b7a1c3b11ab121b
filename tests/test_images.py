"""Tests for covidct.images: real dataset samples plus broken files made on the fly."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from covidct.images import (
    DEFAULT_MAX_PIXELS,
    ImageReadError,
    decode_grayscale,
    read_grayscale,
    read_mask,
    write_png,
)
from helpers.images import png_header_only, write_ct_dicom
from helpers.paths import DATA

pytestmark = pytest.mark.data  # reads the real data (skipped without it)

COVID_DIR = DATA / "covid-ct" / "CT_COVID"
LUNG_DIR = DATA / "lung-seg"
# A CT_COVID ".png" that holds JPEG bytes (see covid-ct/PROVENANCE.md).
JPEG_AS_PNG = COVID_DIR / "2020.03.16.20035105-p6-64-1.png"
# A genuine PNG stored as RGBA.
RGBA_PNG = COVID_DIR / "2019-novel-Coronavirus-severe-adult-respiratory-dist_2020_International-Jour-p3-89%0.png"
LUNG_ID = "coronacases_001_000"


def _assert_read_error(path: Path, *fragments: str, reader=read_grayscale, **kwargs) -> ImageReadError:
    with pytest.raises(ImageReadError) as info:
        reader(path, **kwargs)
    msg = str(info.value)
    assert msg.startswith(str(path)), msg
    assert path.name in msg
    for frag in fragments:
        assert frag in msg.lower(), msg
    assert isinstance(info.value, ValueError)
    return info.value


# --------------------------------------------------------------------------- real samples


def test_real_png_holding_jpeg_bytes() -> None:
    with Image.open(JPEG_AS_PNG) as im:
        assert im.format == "JPEG"  # content, not the .png name
        expected = np.asarray(im.convert("L"))
    arr = read_grayscale(JPEG_AS_PNG)
    assert arr.dtype == np.uint8 and arr.ndim == 2
    assert arr.shape == expected.shape
    np.testing.assert_array_equal(arr, expected)


def test_real_rgba_png_is_luma_times_alpha() -> None:
    with Image.open(RGBA_PNG) as im:
        assert im.format == "PNG" and im.mode == "RGBA"
        rgba = np.asarray(im)
        luma = np.asarray(im.convert("RGB").convert("L"), dtype=np.float64)
    arr = read_grayscale(RGBA_PNG)
    assert arr.shape == rgba.shape[:2] and arr.dtype == np.uint8
    expected = np.rint(luma * rgba[..., 3] / 255.0).astype(np.uint8)
    np.testing.assert_array_equal(arr, expected)
    assert arr.max() > 100  # a real scan, not an all-black composite


def test_real_lung_seg_pair() -> None:
    img = read_grayscale(LUNG_DIR / "images" / f"{LUNG_ID}.png")
    assert img.shape == (256, 256) and img.dtype == np.uint8
    mask = read_mask(LUNG_DIR / "masks" / f"{LUNG_ID}.png", shape=img.shape)
    assert mask.shape == (256, 256) and mask.dtype == np.bool_
    with (LUNG_DIR / "manifest.csv").open(newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["id"] == LUNG_ID)
    assert mask.mean() == pytest.approx(float(row["lung_fraction"]), abs=1e-4)


def test_real_mask_expected_shape_mismatch() -> None:
    path = LUNG_DIR / "masks" / f"{LUNG_ID}.png"
    _assert_read_error(path, "256x256", "512x512", reader=read_mask, shape=(512, 512))


# --------------------------------------------------------------------------- conversions


def test_l_rgb_and_1_modes(tmp_path: Path) -> None:
    gray = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    Image.fromarray(gray).save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_grayscale(tmp_path / "l.png"), gray)

    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    rgb[1, :] = (200, 200, 200)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    out = read_grayscale(tmp_path / "rgb.png")
    # ITU-R 601-2 luma: L = 0.299 R + 0.587 G + 0.114 B
    np.testing.assert_allclose(out[0], [76, 150, 29], atol=1)
    np.testing.assert_array_equal(out[1], [200, 200, 200])

    bw = Image.new("1", (4, 2), 0)
    bw.putpixel((1, 0), 1)
    bw.save(tmp_path / "bw.png")
    np.testing.assert_array_equal(read_grayscale(tmp_path / "bw.png"), [[0, 255, 0, 0], [0, 0, 0, 0]])


def test_rgba_and_la_composite_over_black(tmp_path: Path) -> None:
    rgba = np.full((1, 3, 4), 200, dtype=np.uint8)
    rgba[0, :, 3] = (255, 128, 0)  # opaque, half, transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_grayscale(tmp_path / "rgba.png"), [[200, 100, 0]])

    la = Image.merge("LA", [Image.new("L", (2, 1), 255), Image.frombytes("L", (2, 1), bytes([255, 0]))])
    la.save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_grayscale(tmp_path / "la.png"), [[255, 0]])


def test_palette_image(tmp_path: Path) -> None:
    im = Image.new("P", (3, 1))
    palette = [0, 0, 0, 255, 255, 255, 255, 0, 0] + [0] * (256 * 3 - 9)
    im.putpalette(palette)
    im.putdata([0, 1, 2])
    im.save(tmp_path / "pal.png")
    with Image.open(tmp_path / "pal.png") as check:
        assert check.mode == "P"
    out = read_grayscale(tmp_path / "pal.png")
    assert out.dtype == np.uint8
    np.testing.assert_allclose(out, [[0, 255, 76]], atol=1)  # black, white, red -> luma


def test_16bit_png_is_min_max_scaled(tmp_path: Path) -> None:
    raw = np.array([[1000, 2000], [3000, 41000]], dtype=np.uint16)  # above 255: clipping would saturate
    Image.fromarray(raw).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as check:
        assert check.mode.startswith("I")
    out = read_grayscale(tmp_path / "deep.png")
    assert out.dtype == np.uint8
    expected = np.rint((raw.astype(float) - 1000) * 255 / 40000).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)
    assert out.min() == 0 and out.max() == 255
    assert out[0, 1] == 6  # (2000-1000)/40000*255 = 6.4, not 255 as clipping would give


def test_float_tiff_is_min_max_scaled(tmp_path: Path) -> None:
    raw = np.array([[-1.0, 0.0, 3.0]], dtype=np.float32)
    Image.fromarray(raw, "F").save(tmp_path / "f.tiff")
    np.testing.assert_array_equal(read_grayscale(tmp_path / "f.tiff"), [[0, 64, 255]])


def test_one_pixel_image_reads(tmp_path: Path) -> None:
    Image.new("L", (1, 1), 77).save(tmp_path / "one.png")
    out = read_grayscale(tmp_path / "one.png")
    assert out.shape == (1, 1) and out.dtype == np.uint8 and out[0, 0] == 77


def test_jpeg_bytes_behind_png_name_synthetic(tmp_path: Path) -> None:
    Image.new("L", (16, 8), 120).save(tmp_path / "fake.png", format="JPEG")
    out = read_grayscale(tmp_path / "fake.png")
    assert out.shape == (8, 16)
    assert abs(int(out.mean()) - 120) <= 2


# --------------------------------------------------------------------------- error cases


def _noise(h: int = 64, w: int = 64) -> np.ndarray:
    return (np.random.default_rng(0).random((h, w)) * 255).astype(np.uint8)


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_file(tmp_path: Path, fmt: str, suffix: str) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    full = tmp_path / f"full{suffix}"
    Image.fromarray(_noise()).save(full, format=fmt)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    _assert_read_error(cut, "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png_data(tmp_path: Path) -> None:
    full = tmp_path / "ok.png"
    Image.fromarray(_noise()).save(full)
    data = bytearray(full.read_bytes())
    start = data.index(b"IDAT") + 4 + 2  # past the zlib header
    data[start : start + 200] = b"\xff" * 200
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(bytes(data))
    _assert_read_error(bad, "corrupt")


def test_missing_file(tmp_path: Path) -> None:
    _assert_read_error(tmp_path / "nope.png", "not found")
    _assert_read_error(tmp_path / "nope_mask.png", "not found", reader=read_mask)


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    d = tmp_path / "dir.png"
    d.mkdir()
    _assert_read_error(d, "not a regular file")


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    _assert_read_error(p, "empty")


def test_text_file_named_png(tmp_path: Path) -> None:
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\nsecond line\n", encoding="utf-8")
    _assert_read_error(p, "text")


def test_unknown_binary_format(tmp_path: Path) -> None:
    p = tmp_path / "blob.png"
    p.write_bytes(bytes(range(256)) * 4)
    _assert_read_error(p, "unknown")


def test_zero_size_png(tmp_path: Path) -> None:
    p = tmp_path / "zero.png"
    p.write_bytes(png_header_only(0, 5))
    _assert_read_error(p, "png", "malformed")


def test_decompression_bomb_30000_squared(tmp_path: Path) -> None:
    p = tmp_path / "bomb.png"
    p.write_bytes(png_header_only(30000, 30000))
    assert p.stat().st_size < 100
    err = _assert_read_error(p, "too many pixels")
    assert isinstance(err, ImageReadError)
    # Pillow's own limit still applies even if the caller raises ours.
    _assert_read_error(p, "too many pixels", max_pixels=10**12)


def test_bomb_in_pillow_warning_range_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "warnbomb.png"
    p.write_bytes(png_header_only(10000, 10000))  # 1e8 px: Pillow would only warn
    _assert_read_error(p, "too many pixels", max_pixels=10**12)


def test_our_max_pixels_limit_checked_before_decoding(tmp_path: Path) -> None:
    p = tmp_path / "big.png"
    p.write_bytes(png_header_only(8000, 8000))  # 64 Mpx: under Pillow's limit, over ours
    assert 8000 * 8000 > DEFAULT_MAX_PIXELS
    _assert_read_error(p, "too many pixels", "64000000")  # refused from the header, no decode
    small = tmp_path / "small.png"
    Image.new("L", (20, 10)).save(small)
    _assert_read_error(small, "too many pixels", max_pixels=199)
    assert read_grayscale(small, max_pixels=200).shape == (10, 20)


def test_mask_wrong_size(tmp_path: Path) -> None:
    p = tmp_path / "mask_small.png"
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(p)
    _assert_read_error(p, "does not match", "10x12", "20x20", reader=read_mask, shape=(20, 20))


def test_mask_with_value_128(tmp_path: Path) -> None:
    arr = np.zeros((8, 8), dtype=np.uint8)
    arr[:2] = 255
    arr[5, 5] = 128
    p = tmp_path / "mask_128.png"
    Image.fromarray(arr).save(p)
    _assert_read_error(p, "values other than 0 and 255", "128", "1 pixel", reader=read_mask)


def test_mask_rgb_mode_refused(tmp_path: Path) -> None:
    p = tmp_path / "mask_rgb.png"
    Image.new("RGB", (4, 4)).save(p)
    _assert_read_error(p, "mode", reader=read_mask)


def test_mask_ok(tmp_path: Path) -> None:
    arr = np.zeros((5, 7), dtype=np.uint8)
    arr[1:3, 2:6] = 255
    p = tmp_path / "mask.png"
    Image.fromarray(arr).save(p)
    out = read_mask(p, shape=(5, 7))
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, arr == 255)


def test_truncated_mask(tmp_path: Path) -> None:
    full = tmp_path / "m.png"
    Image.fromarray((_noise() > 127).astype(np.uint8) * 255).save(full)
    data = full.read_bytes()
    cut = tmp_path / "m_cut.png"
    cut.write_bytes(data[: len(data) // 2])
    _assert_read_error(cut, "truncated", reader=read_mask)


# --------------------------------------------------------------------------- writing


def test_write_png_roundtrip_and_atomic(tmp_path: Path) -> None:
    gray = _noise(9, 11)
    rgb = np.stack([gray, 255 - gray, gray // 2], axis=2)
    write_png(tmp_path / "out" / "g.png", gray)
    write_png(tmp_path / "out" / "c.png", rgb)
    np.testing.assert_array_equal(read_grayscale(tmp_path / "out" / "g.png"), gray)
    with Image.open(tmp_path / "out" / "c.png") as im:
        assert im.format == "PNG" and im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), rgb)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c.png", "g.png"]


def test_write_png_rejects_bad_arrays(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "x.png", np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        write_png(tmp_path / "x.png", np.zeros((3, 3, 2), dtype=np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_ct_dicom_reads_like_the_png_it_was_made_from(tmp_path: Path) -> None:
    gray = read_grayscale(RGBA_PNG)
    write_ct_dicom(tmp_path / "slice", gray)  # no suffix: found by content
    assert np.array_equal(read_grayscale(tmp_path / "slice"), gray)
    write_ct_dicom(tmp_path / "inverted.dcm", 255 - gray, photometric="MONOCHROME1")
    assert np.array_equal(read_grayscale(tmp_path / "inverted.dcm"), gray)
    write_ct_dicom(tmp_path / "other.dcm", gray // 2, modality="OT")  # not CT: min-max, like 16-bit PNG
    out = read_grayscale(tmp_path / "other.dcm")
    assert out.min() == 0 and out.max() == 255


def test_bad_dicom_names_the_file(tmp_path: Path) -> None:
    gray = read_grayscale(RGBA_PNG)
    write_ct_dicom(tmp_path / "good.dcm", gray)
    data = (tmp_path / "good.dcm").read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(data[: len(data) // 2])
    _assert_read_error(tmp_path / "truncated.dcm", "truncated.dcm", "dicom")
    (tmp_path / "header_only.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    _assert_read_error(tmp_path / "header_only.dcm", "header_only.dcm", "dicom")
    with pytest.raises(ImageReadError, match="too many pixels"):
        decode_grayscale(data, "big.dcm", max_pixels=100)
