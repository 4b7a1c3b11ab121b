"""Tests for covidct.segmentation.inputs: the one normalisation every segmenter input goes through."""

from __future__ import annotations

import numpy as np
import pytest

from covidct.images import read_grayscale
from covidct.segmentation.inputs import segmenter_input
from helpers.paths import DATA

pytestmark = pytest.mark.data  # reads the real data (skipped without it)


@pytest.mark.parametrize("shape", [(100, 70), (70, 100), (20, 48), (48, 20), (24, 100)])
@pytest.mark.parametrize("clip", [0.0, 7.0])
def test_shape_and_dtype(shape: tuple[int, int], clip: float) -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(30, 200, size=shape, dtype=np.uint8)
    out = segmenter_input(gray, 32, clip)
    assert out.shape == (32, 32)
    assert out.dtype == np.uint8
    if clip == 0:
        # min-max scaling reaches both ends of the range
        assert out.min() == 0 and out.max() == 255


@pytest.mark.parametrize("value", [0, 17, 255])
@pytest.mark.parametrize("clip", [0.0, 7.0])
def test_constant_image(value: int, clip: float) -> None:
    gray = np.full((40, 30), value, dtype=np.uint8)
    out = segmenter_input(gray, 16, clip)
    assert out.shape == (16, 16) and out.dtype == np.uint8
    assert np.isfinite(out.astype(np.float64)).all()
    assert len(np.unique(out)) == 1  # still constant
    if clip == 0:
        assert (out == 0).all()


def test_min_max_without_clahe_is_exact() -> None:
    # 4x4 gradient 10, 12, ..., 40 (no resize needed): out = rint((v - 10) * 255 / 30)
    gray = (10 + 2 * np.arange(16)).reshape(4, 4).astype(np.uint8)
    out = segmenter_input(gray, 4, 0.0)
    expected = np.array(
        [
            [0, 17, 34, 51],
            [68, 85, 102, 119],
            [136, 153, 170, 187],
            [204, 221, 238, 255],
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(out, expected)


def test_min_max_rounds_half_to_even() -> None:
    # 0, 1, 2 -> 0, 127.5, 255; rint(127.5) = 128
    gray = np.array([[0, 1], [2, 2]], dtype=np.uint8)
    np.testing.assert_array_equal(segmenter_input(gray, 2, 0.0), np.array([[0, 128], [255, 255]], dtype=np.uint8))
    gray = np.array([[100, 103], [106, 109]], dtype=np.uint8)  # steps of 255 / 3 = 85
    np.testing.assert_array_equal(segmenter_input(gray, 2, 0.0), np.array([[0, 85], [170, 255]], dtype=np.uint8))


def test_downscale_uses_area_average() -> None:
    # 4x4 -> 2x2 with INTER_AREA averages 2x2 blocks: 0, 40, 80, 120 -> min-max 0, 85, 170, 255
    gray = np.kron(np.array([[0, 40], [80, 120]], dtype=np.uint8), np.ones((2, 2), dtype=np.uint8))
    gray[0, 0] = 4  # block mean (4 + 0 + 0 + 0) / 4 = 1
    out = segmenter_input(gray, 2, 0.0)
    # block means 1, 40, 80, 120 -> (v - 1) * 255 / 119
    expected = np.rint((np.array([[1, 40], [80, 120]]) - 1) * 255 / 119).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_clahe_changes_a_real_slice_but_keeps_shape() -> None:
    path = next(iter(sorted((DATA / "covid-ct" / "CT_NonCOVID").iterdir())))
    gray = read_grayscale(path)
    plain = segmenter_input(gray, 64, 0.0)
    enhanced = segmenter_input(gray, 64, 7.0)
    assert plain.shape == enhanced.shape == (64, 64)
    assert plain.min() == 0 and plain.max() == 255
    assert not np.array_equal(plain, enhanced)


def test_input_not_modified() -> None:
    gray = (np.arange(64, dtype=np.uint8) * 3).reshape(8, 8)
    before = gray.copy()
    segmenter_input(gray, 16, 7.0)
    np.testing.assert_array_equal(gray, before)
