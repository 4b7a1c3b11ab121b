"""Stage train_classifier: EfficientNet on the cropped images ("cropped", with segmentation)
or on the original ones ("raw", without), the paper's Table 1 ablation; on the sources that
``classifier.sources`` names, with every other declared source scored whole, held out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from covidct.atomic import write_text_atomic
from covidct.checkpoints import clear_stage_resume, resume_dir
from covidct.classification.table import checkpoint_meta, classifier_table, load_classifier_inputs
from covidct.classification.train import fit_and_predict
from covidct.config import ClassifierConfig, declared_sources
from covidct.paths import classifier_dir as model_dir
from covidct.plots import plot_training_curves
from covidct.runtime import configure_threads, select_device
from covidct.schema import ConfigError
from covidct.tracking import log_epoch, stage_run
from covidct.training_loop import tracked_history


def run(params: dict[str, Any], root: Path, variant: str) -> None:
    config = ClassifierConfig.of(params)
    if config.source_batchnorm:  # the registered pipeline scores a scan on the statistics it was saved with
        raise ConfigError(
            "params.yaml: classifier.source_batchnorm is a lever-study candidate (docs/levers.md): the "
            "registered pipeline does not estimate BatchNorm statistics per site, so it must be false here"
        )
    device, threads = select_device(), configure_threads()
    table = classifier_table(root, config, declared_sources(params))
    images = load_classifier_inputs(root, table, variant, config, progress=f"decode {variant} images")
    out = root / model_dir(variant)
    stage = f"train_classifier_{variant}"
    with stage_run(stage, {"classifier": config.model_dump(), "variant": variant}):
        counts = table[table["trained"]].groupby("split").size()
        mlflow.log_params(
            {
                "device": str(device),
                "threads": threads,
                **{f"n_{s}": int(counts.get(s, 0)) for s in ("train", "val", "test")},
            }
        )
        history, predictions, meta = fit_and_predict(
            images,
            table,
            config,
            device,
            out / "model.safetensors",
            checkpoint_meta(config, variant),
            on_epoch=log_epoch,
            resume_dir=resume_dir(root, stage),  # a killed run carries on from its last finished epoch
        )
        write_text_atomic(out / "predictions.csv", predictions.to_csv(index=False))
        write_text_atomic(out / "history.csv", tracked_history(history).to_csv(index=False))
        plot_training_curves(
            history[["epoch", "train_loss", "val_loss", "val_auc", "val_accuracy"]],
            out / "training_curves.png",
            f"Classifier ({variant})",
        )
        best = history.loc[history["epoch"] == meta["epoch"]].iloc[0]
        mlflow.log_metrics(
            {
                "best_epoch": int(meta["epoch"]),
                **{f"best_{k}": float(v) for k, v in best.items() if k.startswith("val_")},
            }
        )
        for name in ("model.safetensors", "predictions.csv", "history.csv", "training_curves.png"):
            mlflow.log_artifact(str(out / name))
    clear_stage_resume(root, stage)  # every output is written: nothing left to resume
    print(
        f"{variant}: best epoch {meta['epoch']}, val AUC {best['val_auc']:.3f}, median {history['train_images_per_s'].median():.1f} train images/s"
    )
