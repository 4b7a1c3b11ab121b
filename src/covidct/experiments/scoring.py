"""A segmentation checkpoint's Dice on every slice: what the comparisons of two nets (a sweep's
confirmation, the epoch budgets, two lesion checkpoints) pair slice by slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from covidct.metrics import dice_score
from covidct.segmentation.inference import predict_probabilities, segmenter_dtype
from covidct.segmentation.model import load_segmenter


def slice_dice(checkpoint: Path, images: np.ndarray, masks: np.ndarray, device: torch.device) -> np.ndarray:
    """Dice per slice of the checkpoint's mask (probability > 0.5), cast as it was trained."""
    model, meta = load_segmenter(checkpoint, device)
    dtype = segmenter_dtype(device, meta.get("precision", "auto"))
    predicted = predict_probabilities(model, images, device, dtype=dtype) > 0.5
    return np.array([dice_score(p, m) for p, m in zip(predicted, masks, strict=True)])
