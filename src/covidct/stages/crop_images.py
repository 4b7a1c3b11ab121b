"""Stage crop_images: segment every slice of every declared source (a classifier trains on some
and is scored on the others, held out), crop to the lung box, save crops, masks, a CSV of boxes
and a gallery like the paper's Fig. 6.

The crops are written to a fresh folder that replaces ``data/crops`` only once every image is
done, so an unreadable image met half-way leaves the previous crops as they were.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from covidct.atomic import atomic_dir, write_text_atomic
from covidct.catalog import load_source
from covidct.config import CropConfig, declared_sources
from covidct.images import read_grayscale, read_mask
from covidct.lung_crop import crop_dataset, crop_summary
from covidct.overlays import draw_overlay, save_gallery
from covidct.paths import CROP_REPORTS, CROPS, SEGMENTER, raw
from covidct.runtime import configure_threads, select_device
from covidct.segmentation.model import load_segmenter
from covidct.tracking import stage_run

REPORTS, MODEL = CROP_REPORTS, SEGMENTER
GALLERY_ROWS = 8


def gallery(root: Path, boxes: pd.DataFrame) -> list[list]:
    """One image per source and class, then every whole-image fallback, as Fig. 6 rows."""
    picks = pd.concat(
        [boxes.groupby(["source", "label"]).head(1).head(GALLERY_ROWS // 2), boxes[boxes["fallback"] != ""]]
    ).head(GALLERY_ROWS)
    rows = []
    for row in picks.itertuples():
        image = read_grayscale(root / raw(row.source) / row.relpath)
        mask = read_mask(root / CROPS / "masks" / row.crop, image.shape)
        box = (row.x_min, row.y_min, row.x_max, row.y_max)
        rows.append([image, draw_overlay(image, mask, box), read_grayscale(root / CROPS / "images" / row.crop)])
    return rows


def run(params: dict[str, Any], root: Path) -> None:
    config = CropConfig.of(params)
    device = select_device()
    configure_threads()
    model, meta = load_segmenter(root / MODEL, device)
    tables = {name: load_source(root, name) for name in declared_sources(params)}
    with stage_run("crop_images", {"crop": config.model_dump()}):
        with atomic_dir(root / CROPS) as crops:
            crops.mkdir()
            boxes = pd.concat(
                [
                    crop_dataset(table, root / raw(source), crops, model, meta, config, device, source)
                    for source, table in tables.items()
                ],
                ignore_index=True,
            )
        write_text_atomic(root / REPORTS / "boxes.csv", boxes.to_csv(index=False))
        save_gallery(
            gallery(root, boxes),
            ["input", "lung mask and crop box", "cropped, resized back"],
            root / REPORTS / "gallery.png",
        )
        metrics = crop_summary(boxes)  # over every source, then each on its own
        for name in tables:
            metrics |= {f"{name}.{k}": v for k, v in crop_summary(boxes[boxes["source"] == name]).items()}
        write_text_atomic(root / REPORTS / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        for name in ("boxes.csv", "gallery.png", "metrics.json"):
            mlflow.log_artifact(str(root / REPORTS / name))
    print(
        f"cropped {metrics['n_images']} images; kept whole: {metrics['n_fallback_empty_mask']} empty masks, {metrics['n_fallback_small_mask']} implausibly small"
    )
