"""Stage evaluate_sources: the two-stage pipeline, exactly as register_model will register it
(segmenter, cropped classifier, validation threshold, input gate), on every labelled source:
the test split of each source the classifier trained on, every slice of each it never saw,
and the lung set's held-out patients. Per source, per CC-CCII class and per CC-CCII scan.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from covidct.atomic import write_text_atomic
from covidct.config import section
from covidct.datasets import CC_CCII, COVID_CT, LUNG_SEG
from covidct.metrics import flatten_metrics, patient_metrics_with_ci, roc_points
from covidct.paths import METRICS, SEGMENTER, SOURCE_REPORTS
from covidct.paths import classifier_dir as model_dir
from covidct.plots import plot_roc_curves
from covidct.predict import predict_files
from covidct.registry.pipeline_model import TwoStagePipeline
from covidct.reports import format_cell, markdown_table
from covidct.runtime import configure_threads
from covidct.sources import (
    CC_CCII_CONTRASTS,
    SOURCES,
    choose_top_k,
    figure_rows,
    rows_to_score,
    source_figures,
    source_table,
    study_scores,
)
from covidct.thresholds import decision_threshold
from covidct.tracking import log_pipeline_metrics, stage_run

REPORTS, MODEL = SOURCE_REPORTS, SEGMENTER
NAMES = {COVID_CT: "COVID-CT", CC_CCII: "CC-CCII", LUNG_SEG: "lung set"}
CLASS_NAMES = {"Normal": "Normal", "CP": "common pneumonia (CP)"}


def score(pipeline: TwoStagePipeline, root: Path, trained_on: tuple[str, ...]) -> pd.DataFrame:
    """Every slice to score, with its probability (NaN where the gate refused it) and error."""
    parts = []
    for name in SOURCES:
        rows = rows_to_score(source_table(root, name), name, trained_on)
        predictions = predict_files(pipeline, [Path(p) for p in rows["path"]])
        parts.append(
            rows.assign(
                source=name, probability=[p.probability for p in predictions], error=[p.error for p in predictions]
            )
        )
    scored = pd.concat(parts, ignore_index=True)
    scored["probability"] = scored["probability"].astype(float)
    return scored


def _cell(figures: dict[str, float], metric: str) -> str:
    if f"{metric}_ci_low" in figures:
        return format_cell(
            {"value": figures[metric], "ci_low": figures[f"{metric}_ci_low"], "ci_high": figures[f"{metric}_ci_high"]}
        )
    return f"{100 * figures[metric]:.1f}" if metric in figures else "–"


def _within(figures: dict[str, float], prefix: str) -> dict[str, float]:
    return {k.split(".", 1)[1]: v for k, v in figures.items() if k.startswith(f"{prefix}.")}


def report(figures: dict[str, dict[str, float]], threshold: float, top_k: int, trained_on: tuple[str, ...]) -> str:
    trained = " + ".join(NAMES[s] for s in trained_on)
    rows = []
    for name in SOURCES:
        f = figures[name]
        if name in trained_on:
            scored_on = f"{NAMES[name]}, its test split"
        else:
            scored_on = f"{NAMES[name]}, {'held-out patients' if name == LUNG_SEG else 'all'} (held out)"
        rows.append(
            [trained, scored_on, f"{f['slices']} ({f['patients']})", str(f["refused"])]
            + [_cell(f, m) for m in ("auc", "recall", "specificity")]
        )
    lines = [
        "# Results by source",
        "",
        f"The registered pipeline (segmenter, lung crop, classifier, threshold {threshold:.4f} chosen on the validation split of {trained}, "
        "input gate) on every labelled source. 95 % intervals resample **patients** (slices of one patient are not independent). "
        "`refused`: slices the input gate turned away (no score).",
        "",
        "## Source-held-out table",
        "",
        markdown_table(
            ["trained on", "scored on", "slices (patients)", "refused", "AUC", "sensitivity", "specificity"], rows
        ),
        "",
        "## CC-CCII by class",
        "",
        markdown_table(
            ["contrast", "AUC", "specificity (at the threshold)"],
            [
                [
                    f"NCP (COVID-19) vs {CLASS_NAMES[negative]}",
                    _cell(_within(figures[CC_CCII], contrast), "auc"),
                    _cell(_within(figures[CC_CCII], contrast), "specificity"),
                ]
                for contrast, (_, negative) in CC_CCII_CONTRASTS.items()
            ],
        ),
        "",
        "## CC-CCII studies (scans)",
        "",
        f"A scan's score is the mean of {f'its {top_k} highest slice scores' if top_k else 'all its slice scores'} (chosen on CC-CCII's "
        f"validation scans among the top 1, 3, 5, 10 and all, by AUC); scored on the {figures['cc-ccii.studies']['studies']:.0f} test scans. "
        f"Sensitivity and specificity are at the study threshold {figures['cc-ccii.studies']['threshold']:.4f}, chosen on the "
        "validation scans by the slice threshold's rule (evaluate.val_recall_floor).",
        "",
        markdown_table(
            ["studies", "AUC", "sensitivity", "specificity"],
            [
                [
                    f"{figures['cc-ccii.studies']['studies']:.0f}",
                    *(_cell(figures["cc-ccii.studies"], m) for m in ("auc", "recall", "specificity")),
                ]
            ],
        ),
        "",
        "## Lung set, held-out patients (all COVID-19)",
        "",
        markdown_table(
            ["patient", "share called COVID"],
            [[patient, f"{100 * v:.1f}"] for patient, v in _within(figures[LUNG_SEG], "recall").items()],
        ),
        "",
        "Reproduce: `dvc repro evaluate_sources`; `dvc metrics show reports/sources/metrics.json`.",
        "",
    ]
    return "\n".join(lines)


def run(params: dict[str, Any], root: Path) -> None:
    config, crop, gate = section(params, "evaluate"), section(params, "crop"), section(params, "gate")
    threshold = float(json.loads((root / METRICS).read_text())["cropped"]["threshold"])
    configure_threads()
    pipeline = TwoStagePipeline(root / MODEL, root / model_dir("cropped") / "model.safetensors", crop, threshold, gate)
    trained_on = tuple(
        pipeline.classifier_meta.get("sources", [COVID_CT])
    )  # checkpoints from before the option: COVID-CT's
    with stage_run(
        "evaluate_sources",
        {"evaluate": dataclasses.asdict(config), "gate": dataclasses.asdict(gate), "trained_on": ",".join(trained_on)},
    ):
        scored = score(pipeline, root, trained_on)
        figures = {
            name: {"held_out": int(name not in trained_on)}
            | source_figures(figure_rows(scored, name, trained_on), name, threshold, config.n_bootstrap, config.seed)
            for name in SOURCES
        }
        cc = scored[scored["source"] == CC_CCII]
        top_k = choose_top_k(cc[cc["split"] == "val"])
        study_threshold = decision_threshold(
            study_scores(cc[cc["split"] == "val"], top_k).rename(columns={"probability": "score"}), config
        )
        studies = study_scores(cc[cc["split"] == "test"], top_k)
        figures["cc-ccii.studies"] = {
            "studies": len(studies),
            "top_k": top_k,
            "threshold": study_threshold,
        } | flatten_metrics(
            patient_metrics_with_ci(
                studies["label"],
                studies["probability"],
                studies["patient"],
                study_threshold,
                config.n_bootstrap,
                config.seed,
            )
        )
        refusals = scored.loc[scored["error"] != "", ["source", "relpath", "error"]]
        figures["gate"] = {"refused": len(refusals), "scored": len(scored)}
        curves = {}
        for name in (COVID_CT, CC_CCII):
            part = figure_rows(scored, name, trained_on).dropna(subset=["probability"])
            roc = roc_points(part["label"], part["probability"])
            curves[f"{NAMES[name]} ({'held out' if name not in trained_on else 'test split'})"] = (
                roc["fpr"],
                roc["tpr"],
                figures[name]["auc"],
            )
        write_text_atomic(root / REPORTS / "metrics.json", json.dumps(figures, indent=2) + "\n")
        write_text_atomic(root / REPORTS / "report.md", report(figures, threshold, top_k, trained_on))
        write_text_atomic(root / REPORTS / "scores.csv", scored.drop(columns=["path"]).to_csv(index=False))
        write_text_atomic(root / REPORTS / "refused.csv", refusals.to_csv(index=False))
        plot_roc_curves(curves, root / REPORTS / "roc.png")
        mlflow.log_metrics({f"{name}.{k}": float(v) for name, f in figures.items() for k, v in f.items()})
        headline = {
            f"{name}.{k}": figures[name][k]
            for name in (CC_CCII, LUNG_SEG)
            for k in ("auc", "recall", "specificity")
            if k in figures[name]
        }
        log_pipeline_metrics(headline | {"cc-ccii.studies.auc": figures["cc-ccii.studies"]["auc"]})
        for name in ("metrics.json", "report.md", "roc.png", "refused.csv"):
            mlflow.log_artifact(str(root / REPORTS / name))
    print(report(figures, threshold, top_k, trained_on))
