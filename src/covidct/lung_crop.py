"""Stage 1 + 2 of the method on original images: segment the lungs, then crop to the lung box.

Shared by the crop stage and, later, by inference on new scans, so both crop identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from covidct.config import CropConfig
from covidct.cropping import CropResult, clean_lung_mask, crop_to_lung_bbox, resize_mask
from covidct.preprocessing import segmenter_input
from covidct.segmentation.inference import predict_probabilities


@dataclass(frozen=True)
class LungCrop:
    mask: np.ndarray  # bool, the original image's HxW, after cleaning
    crop: CropResult


def segment_and_crop(originals: Sequence[np.ndarray], model: torch.nn.Module, meta: dict, config: CropConfig, device: torch.device) -> list[LungCrop]:
    """uint8 grayscale images of any size -> their lung masks and crops, one segmenter batch."""
    inputs = np.stack([segmenter_input(image, meta["size"], meta["clahe_clip"]) for image in originals])
    probabilities = predict_probabilities(model, inputs, device, batch_size=len(inputs))
    results = []
    for image, probability in zip(originals, probabilities, strict=True):
        mask = clean_lung_mask(probability > 0.5, config.keep_components)
        mask = resize_mask(mask, *image.shape[:2])
        results.append(LungCrop(mask, crop_to_lung_bbox(image, mask, config.margin, config.min_lung_fraction)))
    return results
