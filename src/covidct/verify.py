"""Check a registered pipeline against the evaluate stage: run it on the raw scans of a split,
as a user would on new scans, and compare its metrics with ``reports/metrics.json``. They must
match exactly, or the model in the registry is not the one the report describes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from covidct.catalog import load_source
from covidct.datasets import COVID_CT, LUNG_SEG
from covidct.metrics import binary_metrics
from covidct.paths import METRICS, classifier_dir
from covidct.predict import load_pipeline, predict_files
from covidct.source_figures import source_table

#: Metrics compared; the evaluate stage's CIs come from its bootstrap, not from the model.
COMPARED = ("accuracy", "precision", "recall", "specificity", "f1", "auc")


def score_split(model_uri: str, root: Path, split: str) -> pd.DataFrame:
    """The split's rows with the model's ``probability`` and ``threshold`` for each scan."""
    table = load_source(root, COVID_CT).query("split == @split").reset_index(drop=True)
    predictions = predict_files(load_pipeline(model_uri), [Path(p) for p in table["path"]])
    failed = [p for p in predictions if p.error]
    if failed:
        raise ValueError(
            f"{len(failed)} scans of the {split} split could not be scored, e.g. {failed[0].name}: {failed[0].error}"
        )
    return table.assign(probability=[p.probability for p in predictions], threshold=[p.threshold for p in predictions])


def compare_with_evaluate(scored: pd.DataFrame, root: Path, split: str) -> pd.DataFrame:
    """One row per metric: the model's value, the report's, and their difference."""
    reported = json.loads((root / METRICS).read_text())["cropped"][split]
    mine = binary_metrics(
        scored["label"].to_numpy(), scored["probability"].to_numpy(dtype=float), float(scored["threshold"].iloc[0])
    )
    rows = [
        {"metric": m, "registered_model": mine[m], "evaluate_stage": reported[m], "difference": mine[m] - reported[m]}
        for m in COMPARED
    ]
    return pd.DataFrame(rows)


def max_score_difference(scored: pd.DataFrame, root: Path) -> float:
    """Largest |probability - score| against the classifier stage's own predictions.csv."""
    stage = pd.read_csv(root / classifier_dir("cropped") / "predictions.csv").query("source == @COVID_CT")
    merged = scored.merge(stage[["relpath", "score"]], on="relpath", validate="one_to_one")
    if len(merged) != len(scored):
        raise ValueError(
            f"{len(scored) - len(merged)} scans are missing from models/classifier_cropped/predictions.csv"
        )
    return float((merged["probability"].astype(float) - merged["score"]).abs().max())


def external_recall(model_uri: str, root: Path) -> pd.DataFrame:
    """Sensitivity on scans no stage of this pipeline has trained or chosen on: the held-out
    patients of the lung set (another source, real CT volumes; every slice shows COVID-19
    infection, see its PROVENANCE.md). One row per patient, then ``all``."""
    table = source_table(root, LUNG_SEG).query("split == 'test'").reset_index(drop=True)
    predictions = predict_files(load_pipeline(model_uri), [Path(p) for p in table["path"]])
    table = table.assign(covid=[p.probability is not None and p.probability >= p.threshold for p in predictions])
    rows = [
        {"patient": patient, "slices": len(part), "recall": float(part["covid"].mean())}
        for patient, part in table.groupby("patient")
    ]
    rows.append({"patient": "all", "slices": len(table), "recall": float(table["covid"].mean())})
    return pd.DataFrame(rows)
