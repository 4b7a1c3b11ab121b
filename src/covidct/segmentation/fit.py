"""What the train_segmenter and train_lesion stages do: an Attention U-Net on the lung set's
training patients, with their lung masks (``segmenter``) or their infection masks (``lesion``),
the best validation epoch's weights, its history and curves, logged to the stage's MLflow run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import mlflow

from covidct.atomic import write_text_atomic
from covidct.checkpoints import clear_stage_resume, load_checkpoint, resume_dir
from covidct.config import ConfigError, LesionConfig, PreprocessConfig, SegmenterConfig
from covidct.paths import LESION, LESION_REPORTS, SEGMENTER, SEGMENTER_REPORTS
from covidct.plots import plot_training_curves
from covidct.runtime import configure_threads, select_device
from covidct.segmentation.data import load_lung_split
from covidct.segmentation.train import segmenter_meta, train_segmenter
from covidct.tracking import log_epoch, stage_run
from covidct.training_loop import tracked_history

#: params.yaml section -> (stage, weights, reports, figure title)
NETS = {
    "segmenter": (SegmenterConfig, "train_segmenter", SEGMENTER, SEGMENTER_REPORTS, "Lung segmenter"),
    "lesion": (LesionConfig, "train_lesion", LESION, LESION_REPORTS, "Lesion segmenter"),
}


def fit_network(params: dict[str, Any], root: Path, net: Literal["segmenter", "lesion"]) -> None:
    kind, stage, model, reports, title = NETS[net]
    pre, config = PreprocessConfig.of(params), kind.of(params)
    device, threads = select_device(), configure_threads()
    lesions = net == "lesion"
    initial = None
    if lesions and config.init == "segmenter":
        initial, lung_meta = load_checkpoint(root / SEGMENTER, device, "train_segmenter")
        if list(lung_meta["channels"]) != list(config.channels):
            raise ConfigError(
                f"params.yaml: lesion.channels must equal the lung segmenter's {lung_meta['channels']} "
                f"when lesion.init is segmenter, got {list(config.channels)}"
            )
    _, train_images, train_lung, train_lesion = load_lung_split(root, "train", pre, lesions)
    _, val_images, val_lung, val_lesion = load_lung_split(root, "val", pre, lesions)
    train_masks, val_masks = (train_lesion, val_lesion) if lesions else (train_lung, val_lung)
    meta = segmenter_meta(pre, config)
    logged = {"preprocess": pre.model_dump(), net: config.model_dump()}
    with stage_run(stage, logged):
        mlflow.log_params(
            {"device": str(device), "threads": threads, "n_train": len(train_images), "n_val": len(val_images)}
        )
        history = train_segmenter(
            (train_images, train_masks),
            (val_images, val_masks),
            config,
            device,
            root / model,
            meta,
            on_epoch=log_epoch,
            resume_dir=resume_dir(root, stage),  # a killed run carries on from its last finished epoch
            initial=initial,
        )
        write_text_atomic(root / reports / "train_history.csv", tracked_history(history).to_csv(index=False))
        plot_training_curves(tracked_history(history), root / reports / "training_curves.png", title)
        best = history.loc[history["val_dice"].idxmax()]
        mlflow.log_metrics({"best_val_dice": float(best["val_dice"]), "best_epoch": int(best["epoch"])})
        for path in (model, reports / "train_history.csv", reports / "training_curves.png"):
            mlflow.log_artifact(str(root / path))
    clear_stage_resume(root, stage)  # every output is written: nothing left to resume
    print(f"best validation Dice {best['val_dice']:.4f} at epoch {int(best['epoch'])}; weights in {model}")
