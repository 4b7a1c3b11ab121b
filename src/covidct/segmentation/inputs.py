"""One normalisation for every image the segmenter sees, lung set and COVID-CT alike.

The lung set was made by resizing to 256 px, min-max scaling and CLAHE (clip 7.0).
COVID-CT images come from paper figures of every size and contrast; putting them
through the same steps is what lets a segmenter trained on one work on the other
(without CLAHE, dense consolidation is left out of the mask).
"""

from __future__ import annotations

import cv2
import numpy as np


def segmenter_input(gray: np.ndarray, size: int, clahe_clip: float) -> np.ndarray:
    """uint8 HxW (any size) -> uint8 ``size`` x ``size``: area resize, min-max, CLAHE."""
    interpolation = cv2.INTER_AREA if min(gray.shape) >= size else cv2.INTER_CUBIC
    resized = cv2.resize(gray, (size, size), interpolation=interpolation).astype(np.float32)
    low, high = float(resized.min()), float(resized.max())
    scaled = np.zeros_like(resized) if high <= low else (resized - low) * (255.0 / (high - low))
    image = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if clahe_clip > 0:
        image = cv2.createCLAHE(clipLimit=clahe_clip, tileGridSize=(8, 8)).apply(image)
    return image
