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
from covidct.images import read_grayscale, write_png
from covidct.lung_box import CropResult, clean_lung_mask, crop_to_lung_bbox, resize_mask
from covidct.paths import crop_relpath
from covidct.segmentation.inference import predict_probabilities, segmenter_dtype
from covidct.segmentation.inputs import segmenter_input


@dataclass(frozen=True)
class LungCrop:
    mask: np.ndarray  # bool, the original image's HxW, after cleaning
    crop: CropResult

    @property
    def lung(self) -> np.ndarray:
        """The mask cropped and resized as the image was: aligned with ``crop.image``."""
        x0, y0, x1, y1 = self.crop.box
        return resize_mask(self.mask[y0 : y1 + 1, x0 : x1 + 1], *self.mask.shape)


def segment_and_crop(
    originals: Sequence[np.ndarray], model: torch.nn.Module, meta: dict, config: CropConfig, device: torch.device
) -> list[LungCrop]:
    """uint8 grayscale images of any size -> their lung masks and crops, one segmenter batch."""
    inputs = np.stack([segmenter_input(image, meta["size"], meta["clahe_clip"]) for image in originals])
    dtype = segmenter_dtype(device, meta.get("precision", "auto"))
    probabilities = predict_probabilities(model, inputs, device, batch_size=len(inputs), dtype=dtype)
    results = []
    for image, probability in zip(originals, probabilities, strict=True):
        mask = clean_lung_mask(probability > 0.5, config.keep_components)
        mask = resize_mask(mask, *image.shape[:2])
        results.append(LungCrop(mask, crop_to_lung_bbox(image, mask, config.margin, config.min_lung_fraction)))
    return results


def crop_dataset(
    table: pd.DataFrame,
    image_root: Path,
    out_dir: Path,
    model: torch.nn.Module,
    meta: dict,
    config: CropConfig,
    device: torch.device,
    source: str = "covid-ct",
) -> pd.DataFrame:
    """Segment and crop every ``table.relpath`` under ``image_root``; write crops to
    ``out_dir/images``, whole-image masks to ``out_dir/masks`` and the crops' own masks to
    ``out_dir/lung``; return one row of box facts per image."""
    rows = []
    for start in tqdm(range(0, len(table), config.batch_size), desc=f"segment + crop {source}", unit="batch"):
        chunk = table.iloc[start : start + config.batch_size]
        originals = [read_grayscale(image_root / relpath) for relpath in chunk["relpath"]]
        for row, image, result in zip(
            chunk.itertuples(), originals, segment_and_crop(originals, model, meta, config, device), strict=True
        ):
            out = crop_relpath(row.relpath, source)
            write_png(out_dir / "images" / out, result.crop.image)
            write_png(out_dir / "masks" / out, result.mask.astype(np.uint8) * 255)
            write_png(out_dir / "lung" / out, result.lung.astype(np.uint8) * 255)
            x_min, y_min, x_max, y_max = result.crop.box
            rows.append(
                {
                    "source": source,
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
    area = (
        (cropped["x_max"] - cropped["x_min"] + 1)
        * (cropped["y_max"] - cropped["y_min"] + 1)
        / (cropped["height"] * cropped["width"])
    )
    return {
        "n_images": len(boxes),
        "n_fallback_empty_mask": int((boxes["fallback"] == "empty_mask").sum()),
        "n_fallback_small_mask": int((boxes["fallback"] == "small_mask").sum()),
        "box_area_fraction_mean": float(area.mean()) if len(cropped) else 0.0,
        "lung_fraction_median": float(boxes["lung_fraction"].median()) if len(boxes) else 0.0,
    }
