"""Stage train_segmenter: Attention U-Net on the lung set's training patients."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import mlflow

from covidct.atomic import write_text_atomic
from covidct.checkpoints import clear_stage_resume, resume_dir
from covidct.config import section
from covidct.paths import SEGMENTER, SEGMENTER_REPORTS
from covidct.plots import plot_training_curves
from covidct.runtime import configure_threads, select_device
from covidct.segmentation.data import load_lung_split
from covidct.segmentation.train import train_segmenter
from covidct.tracking import stage_run
from covidct.training import tracked_history

STAGE = "train_segmenter"
MODEL, REPORTS = SEGMENTER, SEGMENTER_REPORTS


def run(params: dict[str, Any], root: Path) -> None:
    pre, config = section(params, "preprocess"), section(params, "segmenter")
    device, threads = select_device(), configure_threads()
    _, train_images, train_masks = load_lung_split(root, "train", pre)
    _, val_images, val_masks = load_lung_split(root, "val", pre)
    meta = {
        "channels": list(config.channels),
        "size": pre.size,
        "clahe_clip": pre.clahe_clip,
        "precision": config.precision,
    }
    logged = {"preprocess": dataclasses.asdict(pre), "segmenter": dataclasses.asdict(config)}
    with stage_run(STAGE, logged):
        mlflow.log_params(
            {"device": str(device), "threads": threads, "n_train": len(train_images), "n_val": len(val_images)}
        )
        history = train_segmenter(
            (train_images, train_masks),
            (val_images, val_masks),
            config,
            device,
            root / MODEL,
            meta,
            on_epoch=lambda row: mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"]),
            resume_dir=resume_dir(root, STAGE),  # a killed run carries on from its last finished epoch
        )
        write_text_atomic(root / REPORTS / "train_history.csv", tracked_history(history).to_csv(index=False))
        plot_training_curves(tracked_history(history), root / REPORTS / "training_curves.png", "Lung segmenter")
        best = history.loc[history["val_dice"].idxmax()]
        mlflow.log_metrics({"best_val_dice": float(best["val_dice"]), "best_epoch": int(best["epoch"])})
        for path in (MODEL, REPORTS / "train_history.csv", REPORTS / "training_curves.png"):
            mlflow.log_artifact(str(root / path))
    clear_stage_resume(root, STAGE)  # every output is written: nothing left to resume
    print(f"best validation Dice {best['val_dice']:.4f} at epoch {int(best['epoch'])}; weights in {MODEL}")
