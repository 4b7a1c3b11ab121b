"""The lever table as Markdown, CSV and a forest plot under reports/levers/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from covidct.atomic import write_text_atomic
from covidct.config import EvaluateConfig
from covidct.experiments.overrides import as_overrides
from covidct.levers.plan import LeverStudy, lever_dir
from covidct.levers.statistics import lever_table, seed_table
from covidct.plots import plot_lever_forest
from covidct.reports import markdown_table


def _cell(row: pd.Series, key: str) -> str:
    if key not in row or pd.isna(row[key]):
        return "—"
    return f"{100 * row[key]:.1f} ({100 * row[key + '_ci_low']:.1f}–{100 * row[key + '_ci_high']:.1f})"


def _delta(row: pd.Series, split: str, name: str = "auc_delta") -> str:
    key = f"{split}_{name}"
    if key not in row or pd.isna(row[key]):
        return "—"
    real = row[key + "_ci_low"] > 0 or row[key + "_ci_high"] < 0
    return f"{100 * row[key]:+.1f} ({100 * row[key + '_ci_low']:+.1f} to {100 * row[key + '_ci_high']:+.1f}){' **real**' if real else ''}"


def _mean_sd(row: pd.Series, key: str) -> str:
    if key + "_mean" not in row or pd.isna(row[key + "_mean"]):
        return "—"
    return f"{100 * row[key + '_mean']:.1f} ± {100 * row[key + '_sd']:.1f}"


def _run_cells(row: pd.Series) -> list[str]:
    return [
        row["lever"],
        f"`{row['overrides']}`" if row["kind"] == "run" else row["overrides"],
        _cell(row, "val_auc"),
        _delta(row, "val"),
        _cell(row, "test_auc"),
        _delta(row, "test"),
        _cell(row, "test_accuracy"),
        _cell(row, "test_recall"),
        _cell(row, "test_f1"),
        _cell(row, "cc_val_auc"),
        _delta(row, "cc_val"),
        _cell(row, "cc_val_specificity"),
        f"{row['threshold']:.3f}",
        "—" if pd.isna(row["best_epoch"]) else str(int(row["best_epoch"])),
        f"{row['train_minutes']:.1f}",
    ]


def _seed_cells(row: pd.Series) -> list[str]:
    better = "—" if pd.isna(row.get("seeds_better")) else f"{int(row['seeds_better'])} of {int(row['seeds'])}"
    return [
        row["lever"],
        str(int(row["seeds"])),
        _mean_sd(row, "val_auc"),
        _mean_sd(row, "test_auc"),
        _delta(row, "val"),
        _delta(row, "test"),
        better,
        _delta(row, "val", "ensemble_gain"),
        _delta(row, "test", "ensemble_gain"),
        *(_mean_sd(row, k) for k in ("test_accuracy", "test_recall", "test_f1")),
        _mean_sd(row, "cc_val_auc"),
        _delta(row, "cc_val"),
        _mean_sd(row, "cc_val_specificity"),
    ]


def lever_markdown(table: pd.DataFrame, study: LeverStudy, seeds: pd.DataFrame) -> str:
    lines = [
        f"# Levers: study {study.study} ({study.variant} images)",
        "",
        f"Baseline: params.yaml with `{as_overrides(study.base) or 'nothing changed'}`. Each lever changes the baseline by its overrides alone;",
        "`+tta` rows score the same weights with the mirror averaged in.",
        "Threshold: the highest with validation recall >= evaluate.val_recall_floor, chosen on validation. 95 % stratified bootstrap CIs;",
        "Δ AUC: paired bootstrap against the baseline with the same seed, scored the same way (`baseline+tta` against `baseline`:",
        "the effect of TTA); **real**: the interval excludes 0. It holds test-image sampling only, not training noise.",
        "val / test: COVID-CT's official split. CC-CCII val: its validation patients, held out unless the lever trains on",
        "CC-CCII (`classifier.sources`); its Δ intervals resample whole patients (its per-run CIs resample slices: too narrow).",
        "",
    ]
    header = [
        "lever",
        "overrides",
        "val AUC",
        "Δ val AUC",
        "test AUC",
        "Δ test AUC",
        "test acc",
        "test recall",
        "test F1",
    ]
    header += ["CC-CCII val AUC", "Δ CC-CCII val AUC", "CC-CCII val spec.", "threshold", "epoch", "min"]
    lines += [markdown_table(header, [_run_cells(row) for _, row in table.iterrows()])]
    if len(seeds):
        lines += [
            "",
            f"## Over seeds {', '.join(map(str, study.seeds))}",
            "",
            "Mean ± SD over the seeds: the SD is training noise. Δ: the mean of the per-seed paired differences (each seed against",
            "the baseline's same seed), its CI from resampling the images with every seed's models scored on the same resamples.",
            "Ensemble gain: the AUC of the seeds' averaged scores minus their mean AUC, paired the same way.",
            "",
        ]
        header = ["lever", "seeds", "val AUC", "test AUC", "Δ val AUC", "Δ test AUC", "seeds with Δ test > 0"]
        header += ["ensemble gain, val", "ensemble gain, test", "test acc", "test recall", "test F1"]
        header += ["CC-CCII val AUC", "Δ CC-CCII val AUC", "CC-CCII val spec."]
        lines += [markdown_table(header, [_seed_cells(row) for _, row in seeds.iterrows()])]
    return "\n".join(lines) + "\n"


def summarise(root: Path, study: LeverStudy, base: dict[str, Any]) -> Path:
    """reports/levers/<study>.{md,csv,png} (and <study>_over_seeds.csv) from every finished run."""
    evaluate = EvaluateConfig.of(base)
    records = {}
    for run in study.runs():
        path = lever_dir(root, study.study, run.name) / "metrics.json"
        if path.is_file():
            records[run.name] = json.loads(path.read_text())
    table = lever_table(root, study, records, evaluate)
    seeds = seed_table(root, study, table, evaluate)
    out = root / "reports" / "levers"
    write_text_atomic(out / f"{study.study}.csv", table.to_csv(index=False))
    if len(seeds):
        write_text_atomic(out / f"{study.study}_over_seeds.csv", seeds.to_csv(index=False))
    write_text_atomic(out / f"{study.study}.md", lever_markdown(table, study, seeds))
    plot_lever_forest(table, out / f"{study.study}.png", f"Levers ({study.study}, {study.variant} images)")
    return out / f"{study.study}.md"
