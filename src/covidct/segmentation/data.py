"""Loading the lung set for the segmenter stages, normalised like every segmenter input.

Every lung-set mask has lung in it (data/raw/lung-seg/PROVENANCE.md: minimum lung fraction
0.0027), so an empty mask is a damaged or wrong file and stops the stage, naming it, rather
than teaching the segmenter that a lung slice has no lung.
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
from covidct.preprocessing import segmenter_input

LUNG_ROOT = raw(LUNG_SEG)
LUNG_MASK_SHAPE = (256, 256)


def load_lung_split(root: Path, split: str, pre: PreprocessConfig) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Rows of one split, their preprocessed images (N, S, S) uint8 and masks (N, S, S) bool."""
    table = pd.read_csv(root / LUNG_SPLIT)
    table = table[table["split"] == split].reset_index(drop=True)
    images = np.empty((len(table), pre.size, pre.size), dtype=np.uint8)
    masks = np.empty((len(table), pre.size, pre.size), dtype=bool)
    for i, row in enumerate(tqdm(table.itertuples(), total=len(table), desc=f"load lung {split}", unit="slice")):
        images[i] = segmenter_input(read_grayscale(root / LUNG_ROOT / row.image), pre.size, pre.clahe_clip)
        mask = read_mask(root / LUNG_ROOT / row.mask, LUNG_MASK_SHAPE)
        if not mask.any():
            raise DatasetError(
                f"{root / LUNG_ROOT / row.mask}: lung mask is empty (no pixel is 255); every lung-set mask has lung, so this file is damaged"
            )
        if mask.shape != (pre.size, pre.size):
            mask = cv2.resize(mask.astype(np.uint8), (pre.size, pre.size), interpolation=cv2.INTER_NEAREST).astype(bool)
        masks[i] = mask
    return table, images, masks
