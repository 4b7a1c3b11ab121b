"""Lesion burden and the lesion masks behind it, on masks the tests draw (exact counts), and the
lung set's infection masks as the lesion stages load them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidct.images import ImageReadError
from covidct.lesions import LesionBurden, lesion_burden, segment_lesions, study_burden
from covidct.overlays import LESION_COLOR, draw_lesion
from covidct.segmentation.data import load_lung_split
from covidct.segmentation.model import load_segmenter
from helpers.configs import make_config
from helpers.paths import DATA
from helpers.tiny import save_tiny_lesion

pytestmark = pytest.mark.data  # reads the real data (skipped without it)

LUNG = DATA / "lung-seg"


def two_lungs() -> np.ndarray:
    """A 40 x 60 slice with a 10 x 10 lung either side of column 30."""
    lung = np.zeros((40, 60), bool)
    lung[10:20, 5:15] = True  # image left: 100 px
    lung[10:20, 40:50] = True  # image right: 100 px
    return lung


def test_burden_counts_lesion_inside_the_lung_per_side() -> None:
    lesion = np.zeros((40, 60), bool)
    lesion[10:15, 5:15] = True  # 50 px in the left lung
    lesion[30:40, 0:60] = True  # below both lungs: chest wall or abdomen, not burden
    burden = lesion_burden(lesion, two_lungs(), midline=30)
    assert burden == LesionBurden(lung=200, lesion=50, lung_left=100, lesion_left=50, lung_right=100, lesion_right=0)
    assert (burden.fraction, burden.left, burden.right) == (0.25, 0.5, 0.0)


def test_study_burden_is_pixels_over_pixels_not_a_mean_of_slice_shares() -> None:
    big = LesionBurden(lung=900, lesion=90, lung_left=450, lesion_left=90, lung_right=450, lesion_right=0)
    small = LesionBurden(lung=100, lesion=50, lung_left=50, lesion_left=0, lung_right=50, lesion_right=50)
    study = study_burden([big, None, small])  # None: a slice with no burden (refused, unreadable)
    assert study.fraction == pytest.approx(140 / 1000)  # a mean of the slices' shares would say 0.3
    assert (study.left, study.right) == (pytest.approx(90 / 500), pytest.approx(50 / 500))
    assert study_burden([None]) is None


def test_no_lung_means_no_burden_and_mismatched_masks_are_refused() -> None:
    empty = np.zeros((40, 60), bool)
    assert lesion_burden(empty, empty, 30).fraction is None
    with pytest.raises(ValueError, match="differ in size"):
        lesion_burden(np.zeros((40, 61), bool), empty, 30)


def test_draw_lesion_paints_only_the_lesion() -> None:
    rgb = np.full((40, 60, 3), 100, np.uint8)
    lesion = np.zeros((40, 60), bool)
    lesion[10:20, 10:20] = True
    out = draw_lesion(rgb, lesion)
    assert (out[~lesion] == 100).all()
    assert tuple(out[10, 10]) == LESION_COLOR  # the outline is solid
    assert out[15, 15, 1] < 100 < out[15, 15, 0]  # the inside is blended towards magenta
    with pytest.raises(ValueError, match="does not match"):
        draw_lesion(rgb, lesion[:, :30])


def test_segment_lesions_gives_a_mask_at_each_images_size(tmp_path: Path) -> None:
    model, meta = load_segmenter(save_tiny_lesion(tmp_path), torch.device("cpu"))
    images = [np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8) for shape in ((90, 70), (64, 64))]
    masks = segment_lesions(images, model, meta, torch.device("cpu"))
    assert [m.shape for m in masks] == [(90, 70), (64, 64)] and all(m.dtype == bool for m in masks)
    assert segment_lesions([], model, meta, torch.device("cpu")) == []


def lung_root(root: Path, ids: list[str]) -> Path:
    """``root`` holding the lung-set files of ``ids`` and a split table with them as the test split."""
    for folder in ("images", "masks", "infection"):
        (root / "data/raw/lung-seg" / folder).mkdir(parents=True)
        for slice_id in ids:
            shutil.copy2(LUNG / folder / f"{slice_id}.png", root / "data/raw/lung-seg" / folder / f"{slice_id}.png")
    (root / "data/splits").mkdir(parents=True)
    rows = [
        {"id": i, "patient_id": "p", "split": "test", "image": f"images/{i}.png", "mask": f"masks/{i}.png"} for i in ids
    ]
    pd.DataFrame(rows).to_csv(root / "data/splits/lung_seg.csv", index=False)
    return root


def test_lung_split_loads_the_radiologists_infection_masks(tmp_path: Path) -> None:
    ids = pd.read_csv(LUNG / "manifest.csv")["id"].head(2).tolist()
    pre = make_config("preprocess", size=128)
    table, images, lungs, lesions = load_lung_split(lung_root(tmp_path, ids), "test", pre, lesions=True)
    assert images.shape == lungs.shape == lesions.shape == (2, 128, 128)
    assert lesions.any(axis=(1, 2)).all()  # every lung-set slice has infection (PROVENANCE.md)
    assert (lesions & ~lungs).sum() < 0.05 * lesions.sum()  # and it lies in the lung
    assert load_lung_split(tmp_path, "test", pre)[3] is None


def test_lung_split_names_a_damaged_infection_mask(tmp_path: Path) -> None:
    ids = pd.read_csv(LUNG / "manifest.csv")["id"].head(1).tolist()
    root = lung_root(tmp_path, ids)
    bad = root / "data/raw/lung-seg/infection" / f"{ids[0]}.png"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(ImageReadError, match=str(bad)):
        load_lung_split(root, "test", make_config("preprocess", size=64), lesions=True)
