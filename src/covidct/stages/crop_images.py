"""Stage crop_images: segment every COVID-CT image, crop to the lung box, save crops, masks,
a CSV of boxes and a gallery like the paper's Fig. 6."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from covidct.atomic import write_text_atomic
from covidct.config import section
from covidct.cropping import draw_overlay, save_gallery
from covidct.images import read_grayscale, write_png
from covidct.lung_crop import segment_and_crop
from covidct.runtime import configure_threads, select_device
from covidct.segmentation.model import load_segmenter
from covidct.stages.train_segmenter import MODEL
from covidct.tracking import stage_run

RAW = Path("data/raw/covid-ct")
SPLIT = Path("data/splits/covid_ct.csv")
CROPS = Path("data/crops")
REPORTS = Path("reports/crop")
GALLERY_ROWS = 8


def crop_relpath(relpath: str) -> str:
    """Crops are lossless PNG whatever the source format (stems are unique per class folder)."""
    return str(Path(relpath).with_suffix(".png"))


def run(params: dict[str, Any], root: Path) -> None:
    config = section(params, "crop")
    device = select_device()
    configure_threads()
    model, meta = load_segmenter(root / MODEL, device)
    table = pd.read_csv(root / SPLIT)
    rows, gallery = [], []
    gallery_picks = set(table.groupby(["split", "label"]).head(1).index[:GALLERY_ROWS // 2])
    with stage_run("crop_images", {"crop": dataclasses.asdict(config)}):
        for start in tqdm(range(0, len(table), config.batch_size), desc="segment + crop COVID-CT", unit="batch"):
            chunk = table.iloc[start : start + config.batch_size]
            originals = [read_grayscale(root / RAW / relpath) for relpath in chunk["relpath"]]
            for (index, row), image, result in zip(chunk.iterrows(), originals, segment_and_crop(originals, model, meta, config, device), strict=True):
                out = crop_relpath(row["relpath"])
                write_png(root / CROPS / "images" / out, result.crop.image)
                write_png(root / CROPS / "masks" / out, result.mask.astype(np.uint8) * 255)
                x0, y0, x1, y1 = result.crop.box
                rows.append({"relpath": row["relpath"], "crop": out, "split": row["split"], "label": row["label"], "height": image.shape[0], "width": image.shape[1],
                             "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1, "lung_fraction": result.crop.lung_fraction, "fallback": result.crop.fallback or ""})
                if index in gallery_picks or (result.crop.fallback and len(gallery) < GALLERY_ROWS):
                    gallery.append([image, draw_overlay(image, result.mask, result.crop.box), result.crop.image])
        boxes = pd.DataFrame(rows)
        write_text_atomic(root / REPORTS / "boxes.csv", boxes.to_csv(index=False))
        save_gallery(gallery[:GALLERY_ROWS], ["input", "lung mask and crop box", "cropped, resized back"], root / REPORTS / "gallery.png")
        box_area = (boxes["x_max"] - boxes["x_min"] + 1) * (boxes["y_max"] - boxes["y_min"] + 1) / (boxes["height"] * boxes["width"])
        metrics = {
            "n_images": len(boxes),
            "n_fallback_empty_mask": int((boxes["fallback"] == "empty_mask").sum()),
            "n_fallback_small_mask": int((boxes["fallback"] == "small_mask").sum()),
            "box_area_fraction_mean": float(box_area[boxes["fallback"] == ""].mean()) if (boxes["fallback"] == "").any() else 0.0,
            "lung_fraction_median": float(boxes["lung_fraction"].median()),
        }
        write_text_atomic(root / REPORTS / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        for name in ("boxes.csv", "gallery.png", "metrics.json"):
            mlflow.log_artifact(str(root / REPORTS / name))
    print(f"cropped {metrics['n_images']} images; kept whole: {metrics['n_fallback_empty_mask']} empty masks, {metrics['n_fallback_small_mask']} implausibly small")
