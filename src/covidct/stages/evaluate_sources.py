"""Stage evaluate_sources: the two-stage pipeline, exactly as register_model will register it
(segmenter, cropped classifier, validation threshold, input gate), on every declared source and
the lung set: the test split of each source the classifier trained on, every slice of each it
never saw, and the lung set's held-out patients. Per source, per subclass and per scan.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from covidct.atomic import write_text_atomic
from covidct.config import CropConfig, EvaluateConfig, GateConfig, SourceConfig, StudyConfig, declared_sources
from covidct.datasets import LUNG_SEG
from covidct.metrics import flatten_metrics, patient_metrics_with_ci, roc_points
from covidct.paths import LESION, METRICS, SEGMENTER, SOURCE_REPORTS
from covidct.paths import classifier_dir as model_dir
from covidct.plots import plot_roc_curves
from covidct.predict import predict_files
from covidct.registry.pipeline_model import TwoStagePipeline
from covidct.reports import format_cell, markdown_table
from covidct.runtime import configure_threads
from covidct.source_figures import (
    TEST_SEED_OFFSET,
    TOP_SLICES_CANDIDATES,
    choose_top_slices,
    contrasts,
    diluted_at,
    figure_rows,
    rows_to_score,
    source_figures,
    source_table,
    study_scores,
    with_diluted,
)
from covidct.thresholds import decision_threshold
from covidct.tracking import log_pipeline_metrics, stage_run
from covidct.verdicts import TopSlices

REPORTS, MODEL = SOURCE_REPORTS, SEGMENTER
LUNG_TITLE = "lung set"


def score(pipeline: TwoStagePipeline, root: Path, names: list[str], trained_on: tuple[str, ...]) -> pd.DataFrame:
    """Every slice to score, with its probability (NaN where the gate refused it), error, segmented
    lung, whether a series would count it outside the lungs, and its lesion and lung pixels."""
    parts = []
    for name in names:
        rows = rows_to_score(source_table(root, name), name, trained_on)
        predictions = predict_files(pipeline, [Path(p) for p in rows["path"]])
        burdens = [p.burden for p in predictions]
        parts.append(
            rows.assign(
                source=name,
                probability=[p.probability for p in predictions],
                error=[p.error for p in predictions],
                lung_fraction=[p.lung_fraction for p in predictions],
                outside_lungs=[p.outside_lungs(pipeline.outside_lungs) for p in predictions],
                lung_pixels=[b.lung if b else None for b in burdens],
                lesion_pixels=[b.lesion if b else None for b in burdens],
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


def report(
    figures: dict[str, dict[str, float]],
    titles: dict[str, str],
    threshold: float,
    trained_on: tuple[str, ...],
    subclasses: dict[str, dict[str, tuple[str, str]]],
    dilution: tuple[float, ...],
) -> str:
    trained = " + ".join(titles[s] for s in trained_on)
    rows = []
    for name, title in titles.items():
        f = figures[name]
        if name in trained_on:
            scored_on = f"{title}, its test split"
        else:
            scored_on = f"{title}, {'held-out patients' if name == LUNG_SEG else 'all'} (held out)"
        rows.append(
            [trained, scored_on, f"{f['slices']} ({f['patients']})", str(f["refused"])]
            + [_cell(f, m) for m in ("auc", "recall", "specificity")]
        )
    studies = figures["studies"]
    aggregate = TopSlices.from_settings(studies).describe()
    counts = ", ".join(str(t.count) for t in TOP_SLICES_CANDIDATES if t.count)
    shares = ", ".join(f"{100 * t.share:g}" for t in TOP_SLICES_CANDIDATES if t.share)
    candidates = f"{counts} slice scores, the top {shares} % of a scan's slices, and all"
    lines = [
        "# Results by source",
        "",
        f"The registered pipeline (segmenter, lung crop, classifier, threshold {threshold:.4f} chosen on the validation split of {trained}, "
        "input gate) on every labelled source. 95 % intervals resample **patients** (slices of one patient are not independent; "
        "SARS-CoV-2 CT has no patient ids: its scans stand in). `refused`: slices the input gate turned away (no score).",
        "",
        "## Source-held-out table",
        "",
        markdown_table(
            ["trained on", "scored on", "slices (patients)", "refused", "AUC", "sensitivity", "specificity"], rows
        ),
        "",
        "Whether the recipe carries to a source it never saw is measured by the leave-one-source-out folds "
        "(`reports/levers/holdout.md`), where each source in turn is held out.",
        "",
        "## By class",
        "",
        markdown_table(
            ["source", "contrast", "AUC", "specificity (at the threshold)"],
            [
                [titles[name], f"{positive} (COVID-19) vs {negative}"]
                + [_cell(_within(figures[name], contrast), m) for m in ("auc", "specificity")]
                for name, pairs in subclasses.items()
                for contrast, (positive, negative) in pairs.items()
            ],
        ),
        "",
        "## Studies (scans)",
        "",
        f"A scan's score is the mean of {aggregate}, over its slices with lung (under {100 * studies['outside_lungs']:g} % of "
        f"the image is outside the lungs: left out). The aggregation was chosen among the top {candidates} by AUC on the "
        "validation scans of the sources trained on and on series diluted from them (each scan only "
        f"{', '.join(f'{100 * s:g}' for s in dilution)} % of a series, the rest other scans' Normal slices, as in a whole chest CT), "
        f"pooled; sensitivity and specificity at the study threshold {studies['threshold']:.4f}, chosen on the same series by "
        "the slice threshold's rule (evaluate.val_recall_floor). Each source's test scans, as they are and diluted alike:",
        "",
        markdown_table(
            ["source", "series", "count", "AUC", "sensitivity", "specificity"],
            [
                [titles[name], kind, f"{figures[f'{name}.{key}']['studies']:.0f}"]
                + [_cell(figures[f"{name}.{key}"], m) for m in ("auc", "recall", "specificity")]
                for name in trained_on
                for key, kind in (("studies", "its scans"), ("diluted", "diluted"))
                if f"{name}.{key}" in figures
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


def _study_metrics(studies: pd.DataFrame, threshold: float, config: Any) -> dict[str, float]:
    return {"studies": len(studies)} | flatten_metrics(
        patient_metrics_with_ci(
            studies["label"], studies["probability"], studies["patient"], threshold, config.n_bootstrap, config.seed
        )
    )


def study_figures(
    scored: pd.DataFrame, trained_on: tuple[str, ...], config: Any, study: Any
) -> dict[str, dict[str, float]]:
    """Per-scan verdicts: the aggregation and study threshold chosen on the validation scans of the
    sources trained on and on series diluted from them (``study.dilution``: a whole chest CT is
    mostly slices without disease), pooled; then each such source's test scans, and its test
    series diluted alike (``<name>.diluted``), at them. Slices outside the lungs count in neither."""
    val = scored[scored["source"].isin(trained_on) & (scored["split"] == "val")]
    val = with_diluted(val.assign(study=val["source"] + "/" + val["study"].astype(str)), study.dilution, study.seed)
    top = choose_top_slices(val)
    threshold = decision_threshold(study_scores(val, top).rename(columns={"probability": "score"}), config)
    out: dict[str, dict[str, float]] = {
        "studies": top.settings() | {"threshold": threshold, "outside_lungs": study.outside_lungs}
    }
    for name in trained_on:
        test = scored[(scored["source"] == name) & (scored["split"] == "test")]
        studies = study_scores(test, top)
        if len(studies) == 0 or studies["label"].nunique() < 2:
            continue
        out[f"{name}.studies"] = _study_metrics(studies, threshold, config)
        diluted = study_scores(diluted_at(test, study.dilution, study.seed + TEST_SEED_OFFSET), top)
        if len(diluted) and diluted["label"].nunique() == 2:  # only a source with a Normal class is diluted
            out[f"{name}.diluted"] = _study_metrics(diluted, threshold, config)
    return out


def run(params: dict[str, Any], root: Path) -> None:
    config, crop, gate = EvaluateConfig.of(params), CropConfig.of(params), GateConfig.of(params)
    study = StudyConfig.of(params)
    declared: dict[str, SourceConfig] = declared_sources(params)
    titles = {name: source.title for name, source in declared.items()} | {LUNG_SEG: LUNG_TITLE}
    threshold = float(json.loads((root / METRICS).read_text())["cropped"]["threshold"])
    configure_threads()
    pipeline = TwoStagePipeline(
        root / MODEL,
        root / model_dir("cropped") / "model.safetensors",
        crop,
        threshold,
        gate,
        lesion_path=root / LESION,
        outside_lungs=study.outside_lungs,
    )
    trained_on = tuple(pipeline.classifier_meta["sources"])
    with stage_run(
        "evaluate_sources",
        {
            "evaluate": config.model_dump(),
            "gate": gate.model_dump(),
            "study": study.model_dump(),
            "trained_on": ",".join(trained_on),
        },
    ):
        scored = score(pipeline, root, list(titles), trained_on)
        figures = {
            name: {"held_out": int(name not in trained_on)}
            | source_figures(figure_rows(scored, name, trained_on), name, threshold, config.n_bootstrap, config.seed)
            for name in titles
        }
        figures |= study_figures(scored, trained_on, config, study)
        refusals = scored.loc[scored["error"] != "", ["source", "relpath", "error"]]
        figures["gate"] = {"refused": len(refusals), "scored": len(scored)}
        curves = {}
        for name in declared:
            part = figure_rows(scored, name, trained_on).dropna(subset=["probability"])
            roc = roc_points(part["label"], part["probability"])
            curves[f"{titles[name]} ({'held out' if name not in trained_on else 'test split'})"] = (
                roc["fpr"],
                roc["tpr"],
                figures[name]["auc"],
            )
        subclasses = {name: contrasts(figure_rows(scored, name, trained_on)) for name in declared}
        text = report(figures, titles, threshold, trained_on, subclasses, study.dilution)
        write_text_atomic(root / REPORTS / "metrics.json", json.dumps(figures, indent=2) + "\n")
        write_text_atomic(root / REPORTS / "report.md", text)
        write_text_atomic(root / REPORTS / "scores.csv", scored.drop(columns=["path"]).to_csv(index=False))
        write_text_atomic(root / REPORTS / "refused.csv", refusals.to_csv(index=False))
        plot_roc_curves(curves, root / REPORTS / "roc.png")
        mlflow.log_metrics({f"{name}.{k}": float(v) for name, f in figures.items() for k, v in f.items()})
        headline = {
            f"{name}.{k}": figures[name][k]
            for name in titles
            for k in ("auc", "recall", "specificity")
            if k in figures[name]
        }
        log_pipeline_metrics(headline | {k: v["auc"] for k, v in figures.items() if k.endswith(".studies")})
        for name in ("metrics.json", "report.md", "roc.png", "refused.csv"):
            mlflow.log_artifact(str(root / REPORTS / name))
    print(text)
