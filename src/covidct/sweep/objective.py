"""One trial: (reused or trained) segmenter -> (reused or made) crops -> classifier, reporting
its validation score each epoch so the pruner can stop it early.

The objective is a validation score; test metrics are logged for the record, never returned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
import pandas as pd

from covidct.catalog import load_source
from covidct.classification.inputs import load_views
from covidct.classification.table import checkpoint_meta, classifier_table, load_classifier_inputs
from covidct.classification.train import fit_and_predict
from covidct.config import ClassifierConfig, CropConfig, DataConfig, PreprocessConfig, SegmenterConfig, declared_sources
from covidct.datasets import COVID_CT, take_per_group
from covidct.experiments.cache import CACHE, cache_key, get_or_build
from covidct.experiments.crops import crops_for
from covidct.experiments.overrides import with_overrides
from covidct.lung_crop import crop_dataset
from covidct.metrics import binary_metrics
from covidct.paths import RAW
from covidct.runtime import select_device
from covidct.segmentation.data import first_per_patient, load_lung_split
from covidct.segmentation.model import load_segmenter
from covidct.segmentation.train import segmenter_meta, train_segmenter
from covidct.sweep.config import SweepConfig
from covidct.sweep.space import suggest
from covidct.tracking import child_run, log_epoch


def study_parent(config: SweepConfig) -> tuple[dict[str, str], str]:
    """The MLflow parent run of a study: every trial of every worker nests under it."""
    return {"covidct.verdicts": config.study, "covidct.role": "study"}, f"study {config.study}"


class TrialObjective:
    def __init__(self, root: Path, base_params: dict[str, Any], config: SweepConfig, worker: str) -> None:
        self.root, self.base, self.config, self.worker = root, base_params, config, worker
        self.cache = root / CACHE
        self.device = select_device()

    def segmenter(self, params: dict[str, Any]) -> tuple[Path, str, bool, float]:
        pre, seg = PreprocessConfig.of(params), SegmenterConfig.of(params)
        per_patient = DataConfig.of(params).lung_subset_per_patient
        key = cache_key(
            {
                "preprocess": pre.model_dump(),
                "segmenter": seg.model_dump(),
                "lung_split": params["lung_split"],
                "per_patient": per_patient,
            }
        )

        def build(out: Path) -> None:
            meta = segmenter_meta(pre, seg)
            train_segmenter(*self.lung_sets(params), seg, self.device, out / "model.safetensors", meta)

        entry, reused, seconds = get_or_build(self.cache, "segmenter", key, build)
        return entry, key, reused, seconds

    def crops(self, params: dict[str, Any], segmenter: Path, segmenter_key: str) -> tuple[Path, bool, float]:
        crop, subset = CropConfig.of(params), DataConfig.of(params).subset_per_class
        key = cache_key({"segmenter": segmenter_key, "crop": crop.model_dump(), "subset": subset})

        def build(out: Path) -> None:
            model, meta = load_segmenter(segmenter / "model.safetensors", self.device)
            table = take_per_group(load_source(self.root, COVID_CT), ["split", "label"], subset)
            boxes = crop_dataset(table, self.root / RAW / COVID_CT, out, model, meta, crop, self.device)
            boxes.to_csv(out / "boxes.csv", index=False)

        entry, reused, seconds = get_or_build(self.cache, "crops", key, build)
        return entry, reused, seconds

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", self.worker)  # first: a journal tells a live trial from an orphan by it
        suggested = suggest(trial, self.config.space)
        params = with_overrides(self.base, {**self.config.budget, **suggested})
        parent_key, parent_name = study_parent(self.config)
        tags = {
            "covidct.role": "trial",
            "covidct.verdicts": self.config.study,
            "optuna.trial_number": str(trial.number),
            "covidct.worker": self.worker,
        }
        trains = self.config.trains
        run, logged = {
            "pipeline": (self.pipeline_trial, ("data", "preprocess", "segmenter", "crop", "classifier")),
            "segmenter": (self.segmenter_trial, ("data", "lung_split", "preprocess", "segmenter")),
            "classifier": (self.classifier_trial, ("data", "crop", "classifier")),
        }[trains]
        pruned = False
        with child_run(parent_key, parent_name, f"trial {trial.number}", {k: params[k] for k in logged}, tags):
            mlflow.log_params({f"suggested.{k}": v for k, v in suggested.items()})
            try:
                value = run(trial, params)
            except optuna.TrialPruned:
                pruned = True
                mlflow.set_tag("optuna.state", "PRUNED")
        if pruned:
            raise optuna.TrialPruned()
        return value

    def segmenter_trial(self, trial: optuna.Trial, params: dict[str, Any]) -> float:
        """Train the lung segmenter alone; its best validation Dice, reported every epoch for pruning."""
        pre, seg = PreprocessConfig.of(params), SegmenterConfig.of(params)
        train, val = self.lung_sets(params)
        out, on_epoch = self.trial_dir(trial), reporter(trial, "val_dice", "segmenter_seconds")
        meta = segmenter_meta(pre, seg)
        history = train_segmenter(train, val, seg, self.device, out / "model.safetensors", meta, on_epoch)
        best = history.loc[history["val_dice"].idxmax()]
        mlflow.log_metrics({"objective": float(best["val_dice"]), "chosen_epoch": int(best["epoch"])})
        return float(best["val_dice"])

    def lung_sets(self, params: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The lung set's training and validation slices (the test patients are never read)."""
        pre, per_patient = PreprocessConfig.of(params), DataConfig.of(params).lung_subset_per_patient
        sets = []
        for split in ("train", "val"):
            table, images, masks, _ = load_lung_split(self.root, split, pre)
            keep = first_per_patient(table, per_patient)
            sets.append((images[keep], masks[keep]))
        return sets

    def pipeline_trial(self, trial: optuna.Trial, params: dict[str, Any]) -> float:
        """(Reused or trained) segmenter, (reused or made) crops, then the classifier."""
        segmenter, segmenter_key, seg_reused, seg_seconds = self.segmenter(params)
        crops, crops_reused, crop_seconds = self.crops(params, segmenter, segmenter_key)
        timing = {
            "segmenter_reused": seg_reused,
            "segmenter_seconds": seg_seconds,
            "crops_reused": crops_reused,
            "crops_seconds": crop_seconds,
        }
        for name, value in timing.items():
            trial.set_user_attr(name, value)
        mlflow.log_metrics({k: float(v) for k, v in timing.items()})
        return self.classifier(trial, params, crops)

    def classifier(self, trial: optuna.Trial, params: dict[str, Any], crops: Path) -> float:
        # a trial crops COVID-CT for its own segmenter and margin, so it trains on COVID-CT alone
        config = ClassifierConfig.of(params).replace(sources=("covid-ct",))
        boxes = pd.read_csv(crops / "boxes.csv")
        views = config.lung_mask or config.standardise  # the trial sees crops as the pipeline would show them
        masks = [crops / "lung" / c for c in boxes["crop"]] if views else None
        images = load_views(
            [crops / "images" / c for c in boxes["crop"]],
            masks,
            config.image_size,
            config.lung_mask,
            config.standardise,
            config.equalise,
            progress=None,
        )
        return self.fit_classifier(trial, images, boxes, config)

    def classifier_trial(self, trial: optuna.Trial, params: dict[str, Any]) -> float:
        """The classifier on every source it trains on (``classifier.sources``), on crops by the
        crop stage's segmenter: its objective is the validation score pooled over those sources,
        the score the pipeline chooses its checkpoint on."""
        config = ClassifierConfig.of(params)
        crops, reused, seconds = crops_for(self.root, self.base, params, self.device)
        trial.set_user_attr("crops_reused", reused)
        mlflow.log_metrics({"crops_reused": float(reused), "crops_seconds": seconds})
        table = classifier_table(self.root, config, declared_sources(params))
        images = load_classifier_inputs(self.root, table, "cropped", config, progress=None, crops=crops)
        return self.fit_classifier(trial, images, table, config)

    def trial_dir(self, trial: optuna.Trial) -> Path:
        return self.root / "optuna" / "trials" / self.config.study / str(trial.number)

    def fit_classifier(
        self, trial: optuna.Trial, images: np.ndarray, table: pd.DataFrame, config: ClassifierConfig
    ) -> float:
        """Train, reporting the objective every epoch; the chosen epoch's validation score."""
        objective = self.config.objective
        on_epoch = reporter(trial, objective, "classifier_seconds")
        out = self.trial_dir(trial)
        history, predictions, meta = fit_and_predict(
            images, table, config, self.device, out / "model.safetensors", checkpoint_meta(config, "cropped"), on_epoch
        )
        chosen = history.loc[history["epoch"] == meta["epoch"]].iloc[0]
        trained = predictions["trained"].astype(bool) if "trained" in predictions else True
        test = predictions[(predictions["split"] == "test") & trained]
        # Logged for the record only: the study never sees a test metric.
        test_metrics = binary_metrics(test["label"].to_numpy(), test["score"].to_numpy())
        mlflow.log_metrics(
            {f"test_{k}": v for k, v in test_metrics.items()}
            | {"objective": float(chosen[objective]), "chosen_epoch": int(meta["epoch"])}
        )
        trial.set_user_attr("test_auc", test_metrics["auc"])
        return float(chosen[objective])


def reporter(trial: optuna.Trial, objective: str, seconds: str) -> Callable[[dict], None]:
    """The per-epoch callback: log the row, report the objective, stop the trial if the pruner says so."""
    started = time.perf_counter()

    def on_epoch(row: dict) -> None:
        log_epoch(row)
        trial.report(row[objective], row["epoch"])
        trial.set_user_attr("epochs_run", row["epoch"])
        trial.set_user_attr(seconds, time.perf_counter() - started)
        if trial.should_prune():
            raise optuna.TrialPruned(f"epoch {row['epoch']}: {objective} {row[objective]:.4f}")

    return on_epoch
