"""Stage evaluate_lesion: the lesion segmenter on held-out lung-set patients, and the lesion
burden it gives against the radiologists' masks.

Dice per slice (mean, with a slice and a patient bootstrap interval: neighbouring slices of one
patient are not independent, and three test patients make the patient interval coarse), pooled
Dice, per patient. The burden is lesion inside the lung over lung (:mod:`covidct.lesions`):
predicted = the lesion net's mask inside the lung segmenter's cleaned mask; true = the infection
mask inside the radiologists' lung mask. Its error is a share of the lung (0.01: one percentage
point), per slice and per patient (the patient's burden summed over its slices, as a study's
is). Overlays like the paper's Fig. 5: lesion (magenta) over the lung outline (green).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from covidct.atomic import write_text_atomic
from covidct.config import CropConfig, EvaluateConfig, PreprocessConfig
from covidct.gate import body_midline
from covidct.lesions import lesion_burden, study_burden
from covidct.lung_box import clean_lung_mask
from covidct.metrics import dice_score, flatten_metrics, mean_with_ci
from covidct.overlays import draw_lesion, draw_overlay, save_gallery
from covidct.paths import LESION, LESION_REPORTS, SEGMENTER
from covidct.runtime import configure_threads, select_device
from covidct.segmentation.data import load_lung_split
from covidct.segmentation.inference import predict_probabilities, segmenter_dtype
from covidct.segmentation.model import load_segmenter
from covidct.tracking import log_pipeline_metrics, stage_run

GALLERY_ROWS = 6


def _probabilities(path: Path, images: np.ndarray, device: Any, what: str) -> np.ndarray:
    model, meta = load_segmenter(path, device)
    dtype = segmenter_dtype(device, meta.get("precision", "auto"))
    return predict_probabilities(model, images, device, progress=f"{what} test slices", dtype=dtype)


def run(params: dict[str, Any], root: Path) -> None:
    pre, crop, evaluate = PreprocessConfig.of(params), CropConfig.of(params), EvaluateConfig.of(params)
    device = select_device()
    configure_threads()
    table, images, lungs, lesions = load_lung_split(root, "test", pre, lesions=True)
    with stage_run(
        "evaluate_lesion",
        {
            "preprocess": {"size": pre.size, "clahe_clip": pre.clahe_clip},
            "crop": {"keep_components": crop.keep_components},
        },
    ):
        predicted = _probabilities(root / LESION, images, device, "lesion") > 0.5
        lung_predicted = np.stack(
            [
                clean_lung_mask(p > 0.5, crop.keep_components)
                for p in _probabilities(root / SEGMENTER, images, device, "lung")
            ]
        )
        table["dice"] = [dice_score(p, m) for p, m in zip(predicted, lesions, strict=True)]
        table["dice_in_lung"] = [
            dice_score(p & lung, m) for p, lung, m in zip(predicted, lung_predicted, lesions, strict=True)
        ]
        midlines = [body_midline(image) for image in images]
        true = [lesion_burden(m, lung, x) for m, lung, x in zip(lesions, lungs, midlines, strict=True)]
        found = [lesion_burden(p, lung, x) for p, lung, x in zip(predicted, lung_predicted, midlines, strict=True)]
        table["burden_true"] = [b.fraction for b in true]
        table["burden_predicted"] = [b.fraction if b.fraction is not None else 0.0 for b in found]
        table["burden_error"] = table["burden_predicted"] - table["burden_true"]
        patients = []
        for patient, rows in table.groupby("patient_id", sort=True):
            t = study_burden(true[i] for i in rows.index)
            f = study_burden(found[i] for i in rows.index)
            patients.append(
                {
                    "patient_id": patient,
                    "slices": len(rows),
                    "dice": rows["dice"].mean(),
                    "dice_in_lung": rows["dice_in_lung"].mean(),
                    "burden_true": t.fraction,
                    "burden_predicted": f.fraction,
                    "burden_error": f.fraction - t.fraction,
                    "left_error": (f.left or 0.0) - (t.left or 0.0),
                    "right_error": (f.right or 0.0) - (t.right or 0.0),
                }
            )
        per_patient = pd.DataFrame(patients)
        dice = table["dice"].to_numpy()
        groups = table["patient_id"].to_numpy()
        boot = {"n_boot": evaluate.n_bootstrap, "seed": evaluate.seed}
        errors = table["burden_error"].abs().to_numpy()
        metrics = flatten_metrics(
            {
                "dice_mean": mean_with_ci(dice, **boot),  # slices resampled
                "dice_mean_patients": mean_with_ci(dice, groups, **boot),  # patients resampled: coarse with 3
                "burden_error_slice_mae": mean_with_ci(errors, groups, **boot),
            }
        ) | {
            "dice_median": float(np.median(dice)),
            "dice_pooled": dice_score(predicted, lesions),
            "dice_in_lung_mean": float(table["dice_in_lung"].mean()),
            "dice_patient_min": float(per_patient["dice"].min()),
            "burden_error_slice_bias": float(table["burden_error"].mean()),
            "burden_error_patient_mae": float(per_patient["burden_error"].abs().mean()),
            "burden_error_patient_max": float(per_patient["burden_error"].abs().max()),
            "burden_true_mean": float(table["burden_true"].mean()),
            "n_slices": len(table),
            "n_patients": int(table["patient_id"].nunique()),
        }
        reports = root / LESION_REPORTS
        write_text_atomic(reports / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        write_text_atomic(reports / "dice_per_slice.csv", table.to_csv(index=False))
        write_text_atomic(reports / "per_patient.csv", per_patient.to_csv(index=False))
        order = np.argsort(dice)  # worst to best, evenly spaced by rank
        picks = order[np.linspace(0, len(order) - 1, min(GALLERY_ROWS, len(order))).astype(int)]
        rows = [
            [
                images[i],
                draw_lesion(draw_overlay(images[i], lungs[i], None), lesions[i]),
                draw_lesion(draw_overlay(images[i], lung_predicted[i], None), predicted[i]),
            ]
            for i in picks
        ]
        save_gallery(
            rows,
            ["input (preprocessed)", "radiologists: lung, lesion", "predicted: lung, lesion"],
            reports / "overlays.png",
        )
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        log_pipeline_metrics(
            {
                "lesion.dice_mean": metrics["dice_mean"],
                "lesion.burden_error_slice_mae": metrics["burden_error_slice_mae"],
            }
        )
        for name in ("metrics.json", "dice_per_slice.csv", "per_patient.csv", "overlays.png"):
            mlflow.log_artifact(str(reports / name))
    m = metrics
    print(
        f"lesion Dice {m['dice_mean']:.4f} ({m['dice_mean_ci_low']:.4f}-{m['dice_mean_ci_high']:.4f}) per slice, {metrics['dice_pooled']:.4f} pooled, "
        f"burden error {100 * m['burden_error_slice_mae']:.2f} pp per slice, {100 * m['burden_error_patient_mae']:.2f} pp per patient"
    )
    print(per_patient.to_string(float_format=lambda v: f"{v:.4f}"))
