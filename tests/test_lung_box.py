"""Tests for covidct.lung_box (lung box, the paper's r-shrink, crop+resize, mask cleaning) and covidct.overlays (figures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidct.lung_box import CropResult, clean_lung_mask, crop_to_lung_bbox, lung_bbox, resize_mask, shrink_box
from covidct.overlays import BOX_COLOR, MASK_COLOR, draw_overlay, save_gallery


def _bilinear_half_pixel(crop: np.ndarray, height: int, width: int) -> np.ndarray:
    """Reference bilinear resize (half-pixel centres, edge clamp), the rule cv2.INTER_LINEAR uses."""
    ch, cw = crop.shape
    src = crop.astype(np.float64)
    out = np.empty((height, width))
    for i in range(height):
        sy = min(max((i + 0.5) * ch / height - 0.5, 0.0), ch - 1.0)
        y0 = int(np.floor(sy))
        y1 = min(y0 + 1, ch - 1)
        fy = sy - y0
        for j in range(width):
            sx = min(max((j + 0.5) * cw / width - 0.5, 0.0), cw - 1.0)
            x0 = int(np.floor(sx))
            x1 = min(x0 + 1, cw - 1)
            fx = sx - x0
            top = src[y0, x0] * (1 - fx) + src[y0, x1] * fx
            bottom = src[y1, x0] * (1 - fx) + src[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


# --------------------------------------------------------------------------- lung_bbox


def test_lung_bbox_hand_made_masks() -> None:
    m = np.zeros((10, 12), dtype=bool)
    assert lung_bbox(m) is None
    m[4, 7] = True
    assert lung_bbox(m) == (7, 4, 7, 4)
    m[2:6, 1:4] = True  # rows 2..5, cols 1..3
    box = lung_bbox(m)
    assert box == (1, 2, 7, 5)
    assert all(type(v) is int for v in box)
    m[:] = False
    m[0, 0] = m[9, 11] = True
    assert lung_bbox(m) == (0, 0, 11, 9)
    assert lung_bbox(np.array([[0, 255], [0, 0]], dtype=np.uint8)) == (1, 0, 1, 0)


# --------------------------------------------------------------------------- shrink_box


def test_shrink_box_paper_rule_and_edges() -> None:
    # Interior box: plain (x_min + r, y_min + r, x_max - r, y_max - r).
    assert shrink_box((20, 30, 60, 70), 5, 100, 80) == (25, 35, 55, 65)
    # Box touching every image edge: the shrunk box stays inside.
    assert shrink_box((0, 0, 99, 79), 5, 100, 80) == (5, 5, 94, 74)
    # r = 0 keeps the box.
    assert shrink_box((3, 4, 50, 60), 0, 100, 80) == (3, 4, 50, 60)
    # Box partly outside the image (e.g. from a bigger mask) is clipped to it.
    assert shrink_box((-20, -3, 130, 90), 5, 100, 80) == (0, 2, 99, 79)


def test_shrink_box_negative_r_grows_and_clips() -> None:
    assert shrink_box((20, 30, 60, 70), -5, 100, 80) == (15, 25, 65, 75)
    assert shrink_box((2, 3, 97, 78), -5, 100, 80) == (0, 0, 99, 79)


def test_shrink_box_degenerate_keeps_unshrunk() -> None:
    # 6 px wide: shrinking by 5 on both sides would give x_max < x_min.
    assert shrink_box((10, 10, 15, 40), 5, 100, 80) == (10, 10, 15, 40)
    # Height degenerate only: still falls back to the whole unshrunk box.
    assert shrink_box((10, 10, 60, 12), 5, 100, 80) == (10, 10, 60, 12)
    # Exactly one pixel left is not degenerate.
    assert shrink_box((10, 10, 20, 40), 5, 100, 80) == (15, 15, 15, 35)
    # Single-pixel box in a corner.
    assert shrink_box((0, 0, 0, 0), 5, 100, 80) == (0, 0, 0, 0)


def test_shrink_box_rejects_invalid_input() -> None:
    with pytest.raises(ValueError):
        shrink_box((10, 10, 5, 20), 5, 100, 80)
    with pytest.raises(ValueError):
        shrink_box((200, 10, 220, 20), 5, 100, 80)
    with pytest.raises(ValueError):
        shrink_box((0, 0, 1, 1), 5, 0, 80)


# --------------------------------------------------------------------------- crop_to_lung_bbox


def test_empty_mask_fallback() -> None:
    img = np.arange(30 * 40, dtype=np.uint32).reshape(30, 40).astype(np.uint8)
    res = crop_to_lung_bbox(img, np.zeros((30, 40), dtype=bool), r=5)
    assert isinstance(res, CropResult)
    assert res.fallback == "empty_mask"
    assert res.box == (0, 0, 39, 29)
    assert res.lung_fraction == 0.0
    np.testing.assert_array_equal(res.image, img)
    assert res.image is not img


def test_small_mask_fallback_and_threshold() -> None:
    img = np.random.default_rng(1).integers(0, 256, (50, 50), dtype=np.uint8)
    mask = np.zeros((50, 50), dtype=bool)
    mask[10:14, 10:14] = True  # 16 / 2500 = 0.0064
    res = crop_to_lung_bbox(img, mask, r=5)
    assert res.fallback == "small_mask"
    assert res.box == (0, 0, 49, 49)
    assert res.lung_fraction == pytest.approx(16 / 2500)
    np.testing.assert_array_equal(res.image, img)
    # The same mask passes a lower threshold and is cropped (degenerate shrink -> unshrunk box).
    res2 = crop_to_lung_bbox(img, mask, r=5, min_lung_fraction=0.005)
    assert res2.fallback is None
    assert res2.box == (10, 10, 13, 13)
    # Exactly at the threshold counts as enough lung.
    res3 = crop_to_lung_bbox(img, mask, r=0, min_lung_fraction=16 / 2500)
    assert res3.fallback is None


def test_crop_matches_hand_computed_2x2_upsample() -> None:
    # img[y, x] = 30 + 10x + 20y on a 4x4 grid; mask covers all of it; r = 1 -> box (1, 1, 2, 2),
    # crop [[60, 70], [80, 90]] resized bilinearly (half-pixel centres) to 4x4.
    ys, xs = np.mgrid[0:4, 0:4]
    img = (30 + 10 * xs + 20 * ys).astype(np.float32)
    res = crop_to_lung_bbox(img, np.ones((4, 4), dtype=bool), r=1)
    assert res.box == (1, 1, 2, 2) and res.fallback is None and res.lung_fraction == 1.0
    w = np.array([0.0, 0.25, 0.75, 1.0])  # source offsets after clamping at the borders
    expected = 60 + 10 * w[None, :] + 20 * w[:, None]
    assert res.image.shape == (4, 4) and res.image.dtype == np.float32
    np.testing.assert_allclose(res.image, expected, atol=1e-5)

    res_u8 = crop_to_lung_bbox(img.astype(np.uint8), np.ones((4, 4), dtype=bool), r=1)
    assert res_u8.image.dtype == np.uint8
    np.testing.assert_allclose(res_u8.image, expected, atol=0.51)


def test_crop_gradient_image_matches_reference_resize() -> None:
    h, w = 40, 60
    ys, xs = np.mgrid[0:h, 0:w]
    img = ((xs * 4 + ys * 3) % 256).astype(np.uint8)
    mask = np.zeros((h, w), dtype=bool)
    mask[8:30, 12:50] = True  # lung box (12, 8, 49, 29)
    res = crop_to_lung_bbox(img, mask, r=5)
    assert res.fallback is None
    assert res.box == (17, 13, 44, 24)
    assert res.image.shape == img.shape and res.image.dtype == np.uint8
    x0, y0, x1, y1 = res.box
    expected = _bilinear_half_pixel(img[y0 : y1 + 1, x0 : x1 + 1], h, w)
    assert np.abs(res.image.astype(np.float64) - expected).max() <= 1.0
    # float input: exact
    res_f = crop_to_lung_bbox(img.astype(np.float32), mask, r=5)
    np.testing.assert_allclose(res_f.image, expected, atol=1e-3)


def test_crop_color_and_single_channel_images() -> None:
    h, w = 30, 20
    ys, xs = np.mgrid[0:h, 0:w]
    gray = (xs * 5 + ys * 2).astype(np.uint8)
    rgb = np.stack([gray, 255 - gray, gray // 2], axis=2)
    mask = np.zeros((h, w), dtype=bool)
    mask[3:27, 2:18] = True
    ref = crop_to_lung_bbox(gray, mask, r=5)
    res = crop_to_lung_bbox(rgb, mask, r=5)
    assert res.image.shape == (h, w, 3) and res.image.dtype == np.uint8
    assert res.box == ref.box == (7, 8, 12, 21)
    np.testing.assert_array_equal(res.image[..., 0], ref.image)
    single = crop_to_lung_bbox(gray[..., None], mask, r=5)
    assert single.image.shape == (h, w, 1)
    np.testing.assert_array_equal(single.image[..., 0], ref.image)


def test_crop_whole_image_box_is_identity() -> None:
    img = np.random.default_rng(2).integers(0, 256, (16, 24), dtype=np.uint8)
    res = crop_to_lung_bbox(img, np.ones((16, 24), dtype=bool), r=0)
    assert res.box == (0, 0, 23, 15) and res.fallback is None
    np.testing.assert_array_equal(res.image, img)


def test_crop_rejects_mismatched_mask() -> None:
    with pytest.raises(ValueError, match="mask shape"):
        crop_to_lung_bbox(np.zeros((10, 10), dtype=np.uint8), np.ones((5, 5), dtype=bool), r=5)


def test_crop_result_is_frozen() -> None:
    res = crop_to_lung_bbox(np.zeros((4, 4), dtype=np.uint8), np.zeros((4, 4), dtype=bool), r=5)
    with pytest.raises(AttributeError):
        res.fallback = None  # type: ignore[misc]


# --------------------------------------------------------------------------- resize_mask


def test_resize_mask_nearest() -> None:
    m = np.array([[1, 0], [0, 1]], dtype=bool)
    up = resize_mask(m, 4, 6)
    assert up.dtype == np.bool_ and up.shape == (4, 6)
    np.testing.assert_array_equal(up, np.kron(m, np.ones((2, 3), dtype=bool)))
    down = resize_mask(up, 2, 2)
    np.testing.assert_array_equal(down, m)
    values = resize_mask(np.array([[0, 255, 0]], dtype=np.uint8), 1, 9)
    np.testing.assert_array_equal(values[0], [False] * 3 + [True] * 3 + [False] * 3)


# --------------------------------------------------------------------------- clean_lung_mask


def test_clean_lung_mask_keeps_two_largest_and_fills_hole() -> None:
    m = np.zeros((40, 60), dtype=bool)
    m[5:30, 5:20] = True  # left lung, 25x15 = 375
    m[15, 12] = False  # hole in it
    m[5:35, 35:55] = True  # right lung, 30x20 = 600
    m[36:39, 1:4] = True  # small blob (burnt-in text), 9 px
    m[0:2, 57:60] = True  # another small blob, 6 px
    out = clean_lung_mask(m)
    expected = np.zeros_like(m)
    expected[5:30, 5:20] = True
    expected[5:35, 35:55] = True
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, expected)

    kept_hole = clean_lung_mask(m, fill_holes=False)
    assert not kept_hole[15, 12]
    assert not kept_hole[37, 2] and kept_hole[20, 40]

    one = clean_lung_mask(m, keep_components=1)
    assert one[20, 40] and not one[20, 10]

    with pytest.raises(ValueError):
        clean_lung_mask(m, keep_components=0)


def test_clean_lung_mask_diagonal_pixels_are_one_component() -> None:
    m = np.zeros((10, 10), dtype=bool)
    for i in range(6):
        m[i, i] = True  # 6-px diagonal line (8-connected)
    m[8, 1] = m[8, 2] = True  # 2-px blob
    m[1, 8] = True  # 1-px blob
    out = clean_lung_mask(m, keep_components=1, fill_holes=False)
    np.testing.assert_array_equal(out, np.eye(10, dtype=bool) & (np.arange(10) < 6)[:, None])


def test_clean_lung_mask_empty() -> None:
    out = clean_lung_mask(np.zeros((5, 5), dtype=np.uint8))
    assert out.dtype == np.bool_ and not out.any()


# --------------------------------------------------------------------------- figures


def test_draw_overlay_shape_dtype_and_colours() -> None:
    gray = np.full((50, 60), 100, dtype=np.uint8)
    mask = np.zeros((50, 60), dtype=bool)
    mask[10:40, 10:30] = True
    out = draw_overlay(gray, mask, (5, 5, 54, 44))
    assert out.shape == (50, 60, 3) and out.dtype == np.uint8
    assert tuple(out[5, 30]) == BOX_COLOR  # top edge of the box
    assert tuple(out[44, 54]) == BOX_COLOR  # inclusive bottom-right corner
    assert tuple(out[10, 20]) == MASK_COLOR  # contour pixel
    inner = out[25, 20]
    assert inner[1] > inner[0] and inner[1] > 100  # translucent green fill
    assert tuple(out[2, 2]) == (100, 100, 100)  # untouched background stays gray

    plain = draw_overlay(gray, None, None)
    np.testing.assert_array_equal(plain, np.repeat(gray[..., None], 3, axis=2))
    with pytest.raises(ValueError):
        draw_overlay(gray, np.zeros((5, 5), dtype=bool), None)


def test_save_gallery_writes_png_without_temp_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (80, 120), dtype=np.uint8)
    mask = np.zeros((80, 120), dtype=bool)
    mask[20:60, 30:90] = True
    res = crop_to_lung_bbox(gray, mask, r=5)
    rows = [
        [gray, draw_overlay(gray, mask, res.box), res.image],
        [gray[:40], draw_overlay(gray[:40], None, None)],  # shorter row, different size
    ]
    out = tmp_path / "figs" / "gallery.png"
    save_gallery(rows, ["input", "mask + box", "crop"], out, max_side=64)
    assert out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["gallery.png"]
    with Image.open(out) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert 3 * 64 * 0.9 <= w <= 3 * 64 * 1.1
    assert 2 * 64 <= h <= 2 * 64 + 60

    with pytest.raises(ValueError, match="titles"):
        save_gallery(rows, ["only one"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
