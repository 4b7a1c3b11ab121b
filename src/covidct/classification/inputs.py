"""What the classifier sees of a crop. COVID-CT's classes come from different places, and
CC-CCII from other hospitals again: the page around the lungs and each source's CT window tell
sources apart, not disease. So the lung can be shown alone (outside the mask a constant) and its
grey levels standardised inside the mask. Training and the registered pipeline both call
:func:`classifier_view`, so a scan is scored on the pixels the classifier trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from covidct.classification.data import resize_for_classifier
from covidct.images import read_grayscale, read_mask

#: Standardised lung grey levels: mean 128, SD 40 (so +-3 SD fits in uint8).
STANDARD_MEAN, STANDARD_SD = 128.0, 40.0
#: Fewer lung pixels than this at the classifier's size (an empty or failed mask): the whole image
#: stands in for the lung, as the crop stage keeps the whole image then.
MIN_LUNG_PIXELS = 64


def classifier_view(
    image: np.ndarray, mask: np.ndarray | None, size: int, lung_mask: bool, standardise: bool, equalise: bool
) -> np.ndarray:
    """uint8 HxW crop and its bool lung mask (same shape) -> uint8 ``size`` x ``size``.
    ``equalise``: the grey levels histogram-equalised, whatever window the source used."""
    small = resize_for_classifier(image, size)
    if equalise:
        small = cv2.equalizeHist(small)
    if not (lung_mask or standardise):
        return small
    if mask is None:
        raise ValueError("classifier_view: lung_mask or standardise needs the crop's lung mask")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"classifier_view: mask shape {mask.shape} differs from the image's {image.shape[:2]}")
    lung = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
    if lung.sum() < MIN_LUNG_PIXELS:
        lung = np.ones_like(lung)
    out = small.astype(np.float32)
    if standardise:
        values = out[lung]
        out = STANDARD_MEAN + STANDARD_SD * (out - values.mean()) / max(float(values.std()), 1.0)
    if lung_mask:
        out[~lung] = 0.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def load_views(
    paths: Sequence[Path],
    masks: Sequence[Path] | None,
    size: int,
    lung_mask: bool,
    standardise: bool,
    equalise: bool,
    progress: str | None = "decode",
) -> np.ndarray:
    """uint8 (N, size, size) classifier inputs, decoded once; ``masks`` only when a view needs them."""
    out = np.empty((len(paths), size, size), dtype=np.uint8)
    for i, path in enumerate(tqdm(paths, desc=progress, unit="img", disable=progress is None)):
        image = read_grayscale(path)
        mask = read_mask(masks[i], image.shape) if masks is not None else None
        out[i] = classifier_view(image, mask, size, lung_mask, standardise, equalise)
    return out
