"""Loading the lung set for the segmenter stages, normalised like every segmenter input.

Every lung-set mask has lung in it (data/raw/lung-seg/PROVENANCE.md: minimum lung fraction
0.0027), so an empty lung mask is a damaged or wrong file and stops the stage, naming it, rather
than teaching the segmenter that a lung slice has no lung. An empty infection mask is a
lesion-free slice, which a lesion segmenter must learn too.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from covidct.config import PreprocessConfig
from covidct.datasets import LUNG_SEG, DatasetError
from covidct.images import read_grayscale, read_mask
from covidct.paths import LUNG_SPLIT, raw
from covidct.segmentation.inputs import segmenter_input

LUNG_ROOT = raw(LUNG_SEG)
LUNG_MASK_SHAPE = (256, 256)
INFECTION = "infection"  # the radiologists' lesion masks: infection/<id>.png beside images/ and masks/


def _read_target(path: Path, size: int, must_have_pixels: bool) -> np.ndarray:
    mask = read_mask(path, LUNG_MASK_SHAPE)
    if must_have_pixels and not mask.any():
        raise DatasetError(
            f"{path}: lung mask is empty (no pixel is 255); every lung-set mask has lung, so this file is damaged"
        )
    if mask.shape != (size, size):
        mask = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
    return mask


def first_per_patient(table: pd.DataFrame, n: int) -> np.ndarray:
    """Rows to keep for a budget of ``n`` slices per patient (0: all), as prepare_data thins the split."""
    return (table.groupby("patient_id").cumcount() < n).to_numpy() if n else np.ones(len(table), bool)


def load_lung_split(
    root: Path, split: str, pre: PreprocessConfig, lesions: bool = False
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray | None]:
    """Rows of one split, their preprocessed images (N, S, S) uint8, lung masks (N, S, S) bool
    and, with ``lesions``, the infection masks (N, S, S) bool (else None)."""
    table = pd.read_csv(root / LUNG_SPLIT)
    table = table[table["split"] == split].reset_index(drop=True)
    images = np.empty((len(table), pre.size, pre.size), dtype=np.uint8)
    masks = np.empty((len(table), pre.size, pre.size), dtype=bool)
    infection = np.empty((len(table), pre.size, pre.size), dtype=bool) if lesions else None
    for i, row in enumerate(tqdm(table.itertuples(), total=len(table), desc=f"load lung {split}", unit="slice")):
        images[i] = segmenter_input(read_grayscale(root / LUNG_ROOT / row.image), pre.size, pre.clahe_clip)
        masks[i] = _read_target(root / LUNG_ROOT / row.mask, pre.size, must_have_pixels=True)
        if infection is not None:
            infection[i] = _read_target(
                root / LUNG_ROOT / INFECTION / f"{row.id}.png", pre.size, must_have_pixels=False
            )
    return table, images, masks, infection
