"""Recipe levers measured one at a time: each lever is a params.yaml override, trained on the
images of the last ``dvc repro`` as its own MLflow run, scored on validation (which also
chooses the threshold) and test with bootstrap CIs, and compared with the baseline by a
paired bootstrap on the same test images. Every lever is also scored with test-time
augmentation, which needs no training of its own.

A lever's row is reproduced in the full pipeline by ``dvc exp run -S key=value ...``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from covidct.atomic import write_text_atomic
from covidct.checkpoints import clear_stage_resume, resume_dir
from covidct.classification.data import load_resized
from covidct.classification.model import load_classifier
from covidct.classification.train import fit_and_predict, predict_scores
from covidct.config import ConfigError, read_yaml_mapping, section
from covidct.metrics import flatten_metrics, metrics_with_ci, paired_auc_difference, threshold_for_recall
from covidct.plots import plot_lever_forest
from covidct.stages.crop_images import SPLIT
from covidct.stages.train_classifier import VARIANTS, image_paths
from covidct.sweep.cache import cache_key
from covidct.sweep.space import with_overrides
from covidct.tracking import child_run

BASELINE = "baseline"
SCORINGS = {"": False, "+tta": True}  # row suffix -> test-time augmentation


@dataclass(frozen=True)
class LeverStudy:
    study: str
    variant: str  # cropped (the segmented pipeline) or raw
    levers: dict[str, dict[str, Any]]  # name -> dotted params overrides; "baseline" has none
    base: dict[str, Any]  # overrides under every lever, baseline included: pins the study's starting recipe


def load_levers(path: str | Path) -> LeverStudy:
    raw = read_yaml_mapping(path, "lever study")
    levers = raw.get("levers")
    if not isinstance(levers, dict) or BASELINE not in levers:
        raise ConfigError(f"{path}: levers: must be a mapping of name -> overrides that includes {BASELINE!r}")
    if raw.get("variant", "cropped") not in VARIANTS:
        raise ConfigError(f"{path}: variant: must be one of {', '.join(VARIANTS)}, got {raw.get('variant')!r}")
    for name, overrides in levers.items():
        if not isinstance(overrides, dict) or (name == BASELINE and overrides):
            raise ConfigError(f"{path}: levers.{name}: must be a mapping of dotted keys (baseline: {{}}; common settings go under base:)")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: base: must be a mapping of dotted keys")
    return LeverStudy(str(raw.get("study", Path(path).stem)), raw.get("variant", "cropped"), {str(k): dict(v) for k, v in levers.items()}, dict(base))


def lever_dir(root: Path, study: str, name: str) -> Path:
    return root / "levers" / study / name


def _fingerprint(params: dict[str, Any], images: np.ndarray) -> str:
    """The lever's settings and its input pixels: a finished lever is reused only while both hold."""
    return cache_key({"classifier": params["classifier"], "evaluate": params["evaluate"], "images": hashlib.sha256(images.tobytes()).hexdigest()})


def score_lever(predictions: pd.DataFrame, evaluate: Any) -> dict[str, Any]:
    """Validation-chosen threshold, then val and test metrics with CIs at it."""
    val = predictions[predictions["split"] == "val"]
    threshold = (
        threshold_for_recall(val["label"].to_numpy(), val["score"].to_numpy(), evaluate.val_recall_floor)
        if evaluate.val_recall_floor > 0
        else evaluate.threshold
    )
    out: dict[str, Any] = {"threshold": threshold}
    for split in ("val", "test"):
        part = predictions[predictions["split"] == split]
        out[split] = metrics_with_ci(part["label"].to_numpy(), part["score"].to_numpy(), threshold, evaluate.n_bootstrap, evaluate.seed)
    return out


def run_lever(root: Path, base: dict[str, Any], study: LeverStudy, name: str, device: torch.device) -> dict[str, Any]:
    """Train (or reuse) one lever; returns its record, also written to ``<lever_dir>/metrics.json``."""
    overrides = study.levers[name]
    params = with_overrides(base, study.base | overrides)
    config, evaluate = section(params, "classifier"), section(params, "evaluate")
    table = pd.read_csv(root / SPLIT)
    images = load_resized(image_paths(root, table, study.variant), config.image_size, progress=f"decode {study.variant} images")
    out, key = lever_dir(root, study.study, name), _fingerprint(params, images)
    if (out / "metrics.json").is_file():
        record = json.loads((out / "metrics.json").read_text())
        if record.get("fingerprint") == key:
            print(f"lever {name}: reused ({out})")
            return record
    tags = {"covidct.role": "lever", "covidct.lever": name, "covidct.levers": study.study}
    with child_run(
        {"covidct.levers": study.study, "covidct.role": "levers"},
        f"levers {study.study}",
        name,
        {"classifier": params["classifier"], "evaluate": params["evaluate"]},
        tags,
    ):
        mlflow.log_params({f"override.{k}": v for k, v in overrides.items()} | {"variant": study.variant, "device": str(device)})
        history, predictions, meta = fit_and_predict(
            images,
            table,
            config,
            device,
            out / "model.pt",
            {"model": config.model, "image_size": config.image_size, "variant": study.variant},
            on_epoch=lambda row: mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"]),
            resume_dir=resume_dir(root, f"levers/{study.study}/{name}"),  # a killed lever carries on from its last epoch
        )
        model, chosen = load_classifier(out / "model.pt", device)
        keep = table["split"].isin(["val", "test"]).to_numpy()
        scored = {}
        for suffix, tta in SCORINGS.items():
            scores = (
                predictions["score"].to_numpy()
                if tta == chosen.get("tta", False)
                else predict_scores(model, images[keep], device, chosen["mean"], chosen["std"], tta=tta)
            )
            scored[suffix] = predictions.assign(score=scores)
            write_text_atomic(out / f"predictions{suffix}.csv", scored[suffix].to_csv(index=False))
        record = {
            "lever": name,
            "overrides": overrides,
            "fingerprint": key,
            "best_epoch": int(meta["epoch"]),
            "train_seconds": float(history["epoch_seconds"].sum()),
            "scorings": {suffix: score_lever(part, evaluate) for suffix, part in scored.items()},
        }
        for suffix, result in record["scorings"].items():
            prefix = "tta_" if suffix else ""
            mlflow.log_metrics(
                {f"{prefix}threshold": result["threshold"]}
                | {f"{prefix}{split}_{k}": v for split in ("val", "test") for k, v in flatten_metrics(result[split]).items()}
            )
        write_text_atomic(out / "history.csv", history.to_csv(index=False))
        write_text_atomic(out / "metrics.json", json.dumps(record, indent=2))
        mlflow.log_artifacts(str(out), artifact_path="lever")
    clear_stage_resume(root, f"levers/{study.study}/{name}")
    return record


def lever_table(root: Path, study: LeverStudy, records: dict[str, dict[str, Any]], n_boot: int, seed: int) -> pd.DataFrame:
    """One row per lever and scoring, with the paired test-AUC difference from the baseline."""
    rows = []
    for name, record in records.items():
        for suffix, result in record["scorings"].items():
            row: dict[str, Any] = {"lever": name + suffix, "overrides": as_overrides(record["overrides"]) or "(the base)"}
            row["threshold"] = result["threshold"]
            for split in ("val", "test"):
                row |= {f"{split}_{k}": v for k, v in flatten_metrics(result[split]).items()}
            if BASELINE in records and (name != BASELINE or suffix):
                base = pd.read_csv(lever_dir(root, study.study, BASELINE) / "predictions.csv")
                this = pd.read_csv(lever_dir(root, study.study, name) / f"predictions{suffix}.csv")
                for split in ("val", "test"):
                    a, b = base[base["split"] == split], this[this["split"] == split]
                    if not (a["relpath"].to_numpy() == b["relpath"].to_numpy()).all():
                        raise ValueError(f"lever {name}: {split} images differ from the baseline's; re-run both")
                    delta = paired_auc_difference(a["label"].to_numpy(), a["score"].to_numpy(), b["score"].to_numpy(), n_boot, seed)
                    row |= {f"{split}_auc_delta": delta["value"], f"{split}_auc_delta_ci_low": delta["ci_low"], f"{split}_auc_delta_ci_high": delta["ci_high"]}
            row |= {"best_epoch": record["best_epoch"], "train_minutes": record["train_seconds"] / 60}
            rows.append(row)
    return pd.DataFrame(rows)


def _cell(row: pd.Series, key: str) -> str:
    return f"{100 * row[key]:.1f} ({100 * row[key + '_ci_low']:.1f}–{100 * row[key + '_ci_high']:.1f})"


def _delta(row: pd.Series, split: str) -> str:
    key = f"{split}_auc_delta"
    if key not in row or pd.isna(row[key]):
        return "—"
    real = row[key + "_ci_low"] > 0 or row[key + "_ci_high"] < 0
    return f"{100 * row[key]:+.1f} ({100 * row[key + '_ci_low']:+.1f} to {100 * row[key + '_ci_high']:+.1f}){' **real**' if real else ''}"


def lever_markdown(table: pd.DataFrame, study: LeverStudy) -> str:
    header = "| lever | overrides | val AUC | Δ val AUC | test AUC | Δ test AUC | test acc | test recall | test F1 | threshold | epoch | min |"
    lines = [
        f"# Levers: study {study.study} ({study.variant} images)",
        "",
        f"Baseline: params.yaml with `{as_overrides(study.base) or 'nothing changed'}`. Each lever changes the baseline by its overrides alone;",
        "`+tta` rows score the same weights with the mirror averaged in.",
        "Threshold: the highest with validation recall >= evaluate.val_recall_floor, chosen on validation. 95 % stratified bootstrap CIs;",
        "Δ AUC: paired bootstrap against the baseline on the same images (**real**: the interval excludes 0).",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for _, row in table.iterrows():
        cells = [
            row["lever"],
            f"`{row['overrides']}`",
            _cell(row, "val_auc"),
            _delta(row, "val"),
            _cell(row, "test_auc"),
            _delta(row, "test"),
            _cell(row, "test_accuracy"),
            _cell(row, "test_recall"),
            _cell(row, "test_f1"),
            f"{row['threshold']:.3f}",
            str(int(row["best_epoch"])),
            f"{row['train_minutes']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarise(root: Path, study: LeverStudy, base: dict[str, Any]) -> Path:
    """reports/levers/<study>.{md,csv,png} from every finished lever."""
    evaluate = section(base, "evaluate")
    records = {}
    for name in study.levers:
        path = lever_dir(root, study.study, name) / "metrics.json"
        if path.is_file():
            records[name] = json.loads(path.read_text())
    table = lever_table(root, study, records, evaluate.n_bootstrap, evaluate.seed)
    out = root / "reports" / "levers"
    write_text_atomic(out / f"{study.study}.csv", table.to_csv(index=False))
    write_text_atomic(out / f"{study.study}.md", lever_markdown(table, study))
    plot_lever_forest(table, out / f"{study.study}.png", f"Levers ({study.study}, {study.variant} images)")
    return out / f"{study.study}.md"


def run_levers(root: Path, base: dict[str, Any], study: LeverStudy, only: list[str] | None, device: torch.device) -> Path:
    unknown = sorted(set(only or []) - set(study.levers))
    if unknown:
        raise ConfigError(f"--only: no lever named {unknown[0]!r} (levers: {', '.join(study.levers)})")
    names = only or list(study.levers)
    for name in names:  # every override checked before the first lever trains
        with_overrides(base, study.base | study.levers[name])
    for name in names:
        run_lever(root, base, study, name, device)
    return summarise(root, study, base)


def as_overrides(overrides: dict[str, Any]) -> str:
    """The `dvc exp run` arguments that put a lever into the full pipeline."""
    return " ".join(f"-S {k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items())
