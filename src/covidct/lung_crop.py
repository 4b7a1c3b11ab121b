"""Stage 1 + 2 of the method on original images: segment the lungs, then crop to the lung box.

Shared by the crop stage and, later, by inference on new scans, so both crop identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from covidct.config import CropConfig
from covidct.cropping import CropResult, clean_lung_mask, crop_to_lung_bbox, resize_mask
from covidct.images import read_grayscale, write_png
from covidct.paths import crop_relpath
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


def crop_dataset(
    table: pd.DataFrame, image_root: Path, out_dir: Path, model: torch.nn.Module, meta: dict, config: CropConfig, device: torch.device
) -> pd.DataFrame:
    """Segment and crop every ``table.relpath`` under ``image_root``; write crops to
    ``out_dir/images`` and masks to ``out_dir/masks``; return one row of box facts per image."""
    rows = []
    for start in tqdm(range(0, len(table), config.batch_size), desc="segment + crop", unit="batch"):
        chunk = table.iloc[start : start + config.batch_size]
        originals = [read_grayscale(image_root / relpath) for relpath in chunk["relpath"]]
        for row, image, result in zip(chunk.itertuples(), originals, segment_and_crop(originals, model, meta, config, device), strict=True):
            out = crop_relpath(row.relpath)
            write_png(out_dir / "images" / out, result.crop.image)
            write_png(out_dir / "masks" / out, result.mask.astype(np.uint8) * 255)
            x_min, y_min, x_max, y_max = result.crop.box
            rows.append(
                {
                    "relpath": row.relpath,
                    "crop": out,
                    "split": row.split,
                    "label": row.label,
                    "height": image.shape[0],
                    "width": image.shape[1],
                    "x_min": x_min,
                    "y_min": y_min,
                    "x_max": x_max,
                    "y_max": y_max,
                    "lung_fraction": result.crop.lung_fraction,
                    "fallback": result.crop.fallback or "",
                }
            )
    return pd.DataFrame(rows)


def crop_summary(boxes: pd.DataFrame) -> dict[str, float]:
    """Counts of whole-image fallbacks and the typical box, for metrics and the report."""
    cropped = boxes[boxes["fallback"] == ""]
    area = (cropped["x_max"] - cropped["x_min"] + 1) * (cropped["y_max"] - cropped["y_min"] + 1) / (cropped["height"] * cropped["width"])
    return {
        "n_images": len(boxes),
        "n_fallback_empty_mask": int((boxes["fallback"] == "empty_mask").sum()),
        "n_fallback_small_mask": int((boxes["fallback"] == "small_mask").sum()),
        "box_area_fraction_mean": float(area.mean()) if len(cropped) else 0.0,
        "lung_fraction_median": float(boxes["lung_fraction"].median()),
    }
