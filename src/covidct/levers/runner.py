"""Train (or reuse) each run of a lever study as its own MLflow run, then write the table."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from covidct.atomic import write_text_atomic
from covidct.checkpoints import clear_stage_resume, resume_dir
from covidct.classification.model import load_classifier
from covidct.classification.table import checkpoint_meta, classifier_table, load_classifier_inputs
from covidct.classification.train import fit_and_predict, predict_scores
from covidct.config import ClassifierConfig, EvaluateConfig, crop_settings, declared_sources
from covidct.experiments.cache import cache_key
from covidct.experiments.crops import crops_for
from covidct.experiments.overrides import with_overrides
from covidct.levers.holdout import score_fold, summarise_holdout
from covidct.levers.plan import LeverRun, LeverStudy, lever_dir
from covidct.levers.report import summarise
from covidct.levers.statistics import PARTS, SCORINGS, score_lever
from covidct.metrics import flatten_metrics
from covidct.paths import CROPS
from covidct.tracking import child_run, log_epoch


def _fingerprint(params: dict[str, Any], images: np.ndarray) -> str:
    """The lever's settings and its input pixels: a finished lever is reused only while both hold.

    ``ema_decay: 0``, ``precision: auto``, ``source_batchnorm: false`` and augmentations that are off
    train exactly as runs from before the options did, so they are left out and those runs keep
    their fingerprints.
    """
    before = {"ema_decay": 0, "precision": "auto", "source_batchnorm": False}
    classifier = {k: v for k, v in params["classifier"].items() if not (k in before and v == before[k])}
    off = {"downscale": 0.0, "jpeg_quality": 0, "mixup": 0.0, "cutmix": 0.0}
    classifier["augment"] = {k: v for k, v in classifier["augment"].items() if not (k in off and v == off[k])}
    return cache_key(
        {
            "classifier": classifier,
            "evaluate": params["evaluate"],
            "images": hashlib.sha256(images.tobytes()).hexdigest(),
        }
    )


def _reuse(root: Path, out: Path, key: str, run: LeverRun, crops: dict[str, Any]) -> dict[str, Any] | None:
    """A finished run with these settings and pixels: this one, or another study's (copied here).
    Its record is stamped with the crop settings at hand: the pixels matched, so they made them."""
    mine = out / "metrics.json"
    for path in [mine, *sorted((root / "levers").glob("*/*/metrics.json"))]:
        if not path.is_file() or json.loads(path.read_text()).get("fingerprint") != key:
            continue
        record = json.loads(path.read_text())
        if ("holdout" in record) != (run.fold is not None):  # a fold is scored on its held-out source
            continue
        if path != mine:
            shutil.copytree(path.parent, out, ignore=shutil.ignore_patterns("metrics.json"), dirs_exist_ok=True)
            record |= {"lever": run.lever, "run": run.name, "seed": run.seed, "overrides": run.overrides}
        if path != mine or record.get("crops") != crops:
            record["crops"] = crops
            write_text_atomic(mine, json.dumps(record, indent=2))  # last: a half-copied run is not a finished one
        print(f"lever {run.name}: reused ({path.parent})")
        return record
    return None


def run_lever(
    root: Path, base: dict[str, Any], study: LeverStudy, run: LeverRun, device: torch.device
) -> dict[str, Any]:
    """Train (or reuse) one lever run; returns its record, also written to ``<lever_dir>/metrics.json``."""
    params = with_overrides(base, study.base | run.overrides)
    config, evaluate = ClassifierConfig.of(params), EvaluateConfig.of(params)
    table = classifier_table(root, config, declared_sources(params))
    crops = crops_for(root, base, params, device)[0] if study.variant == "cropped" else CROPS  # a margin lever's own
    images = load_classifier_inputs(root, table, study.variant, config, f"decode {study.variant} images", crops)
    out, key = lever_dir(root, study.study, run.name), _fingerprint(params, images)
    record = _reuse(root, out, key, run, crop_settings(params))
    if record is not None:
        return record
    tags = {"covidct.role": "lever", "covidct.lever": run.lever, "covidct.levers": study.study}
    tags |= {"covidct.seed": str(run.seed)} if run.seed is not None else {}
    with child_run(
        {"covidct.levers": study.study, "covidct.role": "levers"},
        f"levers {study.study}",
        run.name,
        {"classifier": params["classifier"], "evaluate": params["evaluate"]},
        tags,
    ):
        mlflow.log_params(
            {f"override.{k}": v for k, v in run.overrides.items()} | {"variant": study.variant, "device": str(device)}
        )
        history, predictions, meta = fit_and_predict(
            images,
            table,
            config,
            device,
            out / "model.safetensors",
            checkpoint_meta(config, study.variant),
            on_epoch=log_epoch,
            resume_dir=resume_dir(
                root, f"levers/{study.study}/{run.name}"
            ),  # a killed lever carries on from its last epoch
        )
        record = {
            "lever": run.lever,
            "run": run.name,
            "seed": run.seed,
            "overrides": run.overrides,
            "fingerprint": key,
            "crops": crop_settings(params),
            "best_epoch": int(meta["epoch"]),
            "train_seconds": float(history["epoch_seconds"].sum()),
        }
        if run.fold is not None:  # a leave-one-source-out fold: the held-out source is what counts
            write_text_atomic(out / "predictions.csv", predictions.to_csv(index=False))
            record["holdout"] = score_fold(predictions, run.fold, evaluate)
            mlflow.log_metrics({f"held_out_{k}": v for k, v in record["holdout"].items() if k != "fold"})
        else:
            record["scorings"] = _scorings(out, table, images, predictions, evaluate, device)
        write_text_atomic(out / "history.csv", history.to_csv(index=False))
        write_text_atomic(out / "metrics.json", json.dumps(record, indent=2))
        mlflow.log_artifacts(str(out), artifact_path="lever")
    clear_stage_resume(root, f"levers/{study.study}/{run.name}")
    return record


def _scorings(
    out: Path, table: Any, images: np.ndarray, predictions: Any, evaluate: Any, device: torch.device
) -> dict[str, Any]:
    """The chosen weights scored without and with test-time augmentation, each part with CIs."""
    model, chosen = load_classifier(out / "model.safetensors", device)
    keep = table["split"].isin(["val", "test"]).to_numpy()
    part = predictions[predictions["split"].isin(["val", "test"])]  # the same rows as images[keep], in order
    scored, results = {}, {}
    for suffix, tta in SCORINGS.items():
        scores = (
            part["score"].to_numpy()
            if tta == chosen.get("tta", False)
            else predict_scores(model, images[keep], device, chosen["mean"], chosen["std"], tta=tta)
        )
        scored[suffix] = part.assign(score=scores)
        write_text_atomic(out / f"predictions{suffix}.csv", scored[suffix].to_csv(index=False))
        results[suffix] = score_lever(scored[suffix], evaluate)
        prefix = "tta_" if suffix else ""
        mlflow.log_metrics(
            {f"{prefix}threshold": results[suffix]["threshold"]}
            | {
                f"{prefix}{split}_{k}": v
                for split in PARTS
                if split in results[suffix]
                for k, v in flatten_metrics(results[suffix][split]).items()
            }
        )
    return results


def run_levers(root: Path, base: dict[str, Any], study: LeverStudy, runs: list[LeverRun], device: torch.device) -> Path:
    """``runs``: ``study.checked_runs(base, ...)``, validated before anything trains."""
    summary = summarise_holdout if study.folds else summarise
    report = None
    for run in runs:
        run_lever(root, base, study, run, device)
        report = summary(root, study, base)  # after every run: a study stopped part-way has its table
    return report if report is not None else summary(root, study, base)
