"""Stage evaluate_segmenter: Dice on held-out patients and overlays like the paper's Fig. 5.

``dice_mean`` averages each slice's Dice, so a small apical slice counts as much as a large
one; ``dice_pooled`` is one Dice over every test pixel (large slices weigh more). The paper does
not say which it reports, so both are given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from covidct.atomic import write_text_atomic
from covidct.config import CropConfig, PreprocessConfig
from covidct.lung_box import clean_lung_mask
from covidct.metrics import dice_score
from covidct.overlays import draw_overlay, save_gallery
from covidct.paths import SEGMENTER as MODEL
from covidct.paths import SEGMENTER_REPORTS as REPORTS
from covidct.runtime import configure_threads, select_device
from covidct.segmentation.data import load_lung_split
from covidct.segmentation.inference import predict_probabilities, segmenter_dtype
from covidct.segmentation.model import load_segmenter
from covidct.tracking import log_pipeline_metrics, stage_run

GALLERY_ROWS = 6


def run(params: dict[str, Any], root: Path) -> None:
    pre, crop = PreprocessConfig.of(params), CropConfig.of(params)
    device = select_device()
    configure_threads()
    model, meta = load_segmenter(root / MODEL, device)
    table, images, masks, _ = load_lung_split(root, "test", pre)
    with stage_run(
        "evaluate_segmenter",
        {
            "preprocess": {"size": pre.size, "clahe_clip": pre.clahe_clip},
            "crop": {"keep_components": crop.keep_components},
        },
    ):
        dtype = segmenter_dtype(device, meta.get("precision", "auto"))
        probabilities = predict_probabilities(model, images, device, progress="segment test slices", dtype=dtype)
        predicted = probabilities > 0.5
        cleaned = np.stack([clean_lung_mask(p, crop.keep_components) for p in predicted])
        table["dice"] = [dice_score(p, m) for p, m in zip(predicted, masks, strict=True)]
        table["dice_cleaned"] = [dice_score(p, m) for p, m in zip(cleaned, masks, strict=True)]
        per_patient = table.groupby("patient_id")[["dice", "dice_cleaned"]].mean()
        metrics = {
            "dice_mean": float(table["dice"].mean()),
            "dice_std": float(table["dice"].std(ddof=0)),
            "dice_median": float(table["dice"].median()),
            "dice_pooled": dice_score(predicted, masks),
            "dice_cleaned_mean": float(table["dice_cleaned"].mean()),
            "dice_patient_min": float(per_patient["dice"].min()),
            "n_slices": len(table),
            "n_patients": int(table["patient_id"].nunique()),
            "checkpoint_epoch": int(meta["epoch"]),
        }
        write_text_atomic(root / REPORTS / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        write_text_atomic(root / REPORTS / "dice_per_slice.csv", table.to_csv(index=False))
        write_text_atomic(root / REPORTS / "dice_per_patient.csv", per_patient.to_csv())
        # Fig. 5: input, ground truth, prediction; slices from the worst to the best Dice, evenly spaced by rank.
        order = np.argsort(table["dice"].to_numpy())
        picks = order[np.linspace(0, len(order) - 1, min(GALLERY_ROWS, len(order))).astype(int)]
        rows = [
            [images[i], draw_overlay(images[i], masks[i], None), draw_overlay(images[i], predicted[i], None)]
            for i in picks
        ]
        save_gallery(rows, ["input (preprocessed)", "ground truth", "prediction"], root / REPORTS / "overlays.png")
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        log_pipeline_metrics({f"segmenter.{k}": metrics[k] for k in ("dice_mean", "dice_pooled")})
        for name in ("metrics.json", "dice_per_slice.csv", "dice_per_patient.csv", "overlays.png"):
            mlflow.log_artifact(str(root / REPORTS / name))
    print(
        f"test Dice {metrics['dice_mean']:.4f} +- {metrics['dice_std']:.4f} per slice, {metrics['dice_pooled']:.4f} pooled, on {metrics['n_slices']} slices of {metrics['n_patients']} patients"
    )
    print(per_patient.to_string(float_format=lambda v: f"{v:.4f}"))
