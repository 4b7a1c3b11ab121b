"""Leave-one-source-out folds: does a recipe carry to a hospital it never saw?

A lever study with ``holdout:`` trains each lever, per seed, once per declared source held out:
on every other source (balanced by source and class; checkpoint and threshold from their
validation splits pooled), then scores every slice of the held-out source. Intervals resample
that source's patients (its scans where it has no patient ids); a lever is compared with the
baseline per fold, paired: both scored on the same resampled patients, every seed's model at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from covidct.atomic import write_text_atomic
from covidct.config import EvaluateConfig, classifier_recipe, crop_settings, declared_sources
from covidct.experiments.overrides import as_overrides, with_overrides
from covidct.levers.plan import BASELINE, LeverStudy, lever_dir
from covidct.metrics import flatten_metrics, paired_auc_difference, patient_metrics_with_ci
from covidct.plots import plot_holdout
from covidct.reports import format_delta, markdown_table
from covidct.thresholds import decision_threshold

#: Per-fold figures kept for each run (slices of the held-out source, at the validation threshold).
FIGURES = ("auc", "recall", "specificity")
#: + a non-COVID sub-class of the held-out source: its COVID slices' AUC against that sub-class alone.
AGAINST = "auc_against_"


def held_out_rows(predictions: pd.DataFrame, fold: str) -> pd.DataFrame:
    return predictions[predictions["source"] == fold].sort_values("relpath").reset_index(drop=True)


def score_fold(predictions: pd.DataFrame, fold: str, evaluate: Any) -> dict[str, Any]:
    """The threshold chosen on the trained sources' validation rows (pooled), then the held-out
    source's figures at it, with patient-level bootstrap intervals."""
    val = predictions[(predictions["split"] == "val") & predictions["trained"].astype(bool)]
    threshold = decision_threshold(val, evaluate)
    held = held_out_rows(predictions, fold)
    if held["label"].nunique() < 2:
        raise ValueError(f"holdout: source {fold!r} holds one class only; a fold needs both to give an AUC")
    figures = patient_metrics_with_ci(
        held["label"], held["score"], held["patient"].astype(str), threshold, evaluate.n_bootstrap, evaluate.seed
    )
    return {
        "fold": fold,
        "threshold": threshold,
        "slices": len(held),
        "patients": int(held["patient"].nunique()),
    } | {k: v for k, v in flatten_metrics(figures).items() if k.split("_ci")[0] in FIGURES}


def _held_out(root: Path, study: LeverStudy, run_name: str, fold: str) -> pd.DataFrame:
    return held_out_rows(pd.read_csv(lever_dir(root, study.study, run_name) / "predictions.csv"), fold)


def trained_test_aucs(predictions: pd.DataFrame) -> dict[str, float]:
    """AUC on the test split of each source the fold trained on: what a source's own test split
    says, beside what the held-out source says (and what adding a source costs the others)."""
    test = predictions[(predictions["split"] == "test") & predictions["trained"].astype(bool)]
    return {
        f"test_auc.{name}": float(roc_auc_score(part["label"], part["score"])) for name, part in test.groupby("source")
    }


def held_out_subclass_aucs(predictions: pd.DataFrame, fold: str) -> dict[str, float]:
    """COVID against each non-COVID sub-class of the held-out source (CC-CCII: common pneumonia,
    normal lungs): whether a fold tells COVID from other disease, or only from healthy lungs.
    Empty for a source with one non-COVID class (its AUC says it already)."""
    held = held_out_rows(predictions, fold)
    negative, covid = held[held["label"] == 0], held[held["label"] == 1]
    if "subclass" not in held or negative["subclass"].nunique() < 2:
        return {}
    aucs = {}
    for name, part in negative.groupby("subclass"):
        both = pd.concat([covid, part])
        aucs[f"{AGAINST}{name}"] = float(roc_auc_score(both["label"], both["score"]))
    return aucs


def holdout_runs(root: Path, study: LeverStudy, records: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per finished run: its fold's figures, the trained sources' test AUCs, epoch and time."""
    rows = []
    for run in study.runs(sources=list(study.folds)):
        if run.name in records:
            record = records[run.name]
            predictions = pd.read_csv(lever_dir(root, study.study, run.name) / "predictions.csv")
            rows.append(
                {"lever": run.lever, "fold": run.fold, "seed": run.seed, "run": run.name}
                | {k: v for k, v in record["holdout"].items() if k != "fold"}
                | trained_test_aucs(predictions)
                | held_out_subclass_aucs(predictions, run.fold)
                | {"best_epoch": record["best_epoch"], "train_minutes": record["train_seconds"] / 60}
            )
    return pd.DataFrame(rows)


def holdout_summary(root: Path, study: LeverStudy, runs: pd.DataFrame, evaluate: Any) -> pd.DataFrame:
    """One row per lever and fold with a finished run: seed mean and SD of each figure over the
    seeds finished so far (``seeds``), and the paired AUC difference from the baseline on the seeds
    both have finished (every seed's model scored on the same resamples)."""
    rows = []
    for lever in study.levers:
        for fold in study.folds:
            part = runs[(runs["lever"] == lever) & (runs["fold"] == fold)] if len(runs) else runs
            if part.empty:
                continue
            row: dict[str, Any] = {"lever": lever, "fold": fold, "seeds": len(part)}
            for key in FIGURES:
                row |= {f"{key}_mean": part[key].mean(), f"{key}_sd": part[key].std(ddof=1) if len(part) > 1 else 0.0}
            row |= {
                f"{c}_mean": part[c].mean() for c in part.columns if c.startswith(AGAINST) and part[c].notna().any()
            }
            row["train_minutes"] = part["train_minutes"].sum()
            base = runs[(runs["lever"] == BASELINE) & (runs["fold"] == fold)]
            common = [s for s in part["seed"] if s in set(base["seed"])]
            if lever != BASELINE and common:
                mine = [_held_out(root, study, study.run_name(lever, s, fold), fold) for s in common]
                before = [_held_out(root, study, study.run_name(BASELINE, s, fold), fold) for s in common]
                if not all(np.array_equal(f["relpath"], before[0]["relpath"]) for f in mine + before):
                    raise ValueError(
                        f"holdout: lever {lever} scored other {fold} slices than the baseline; re-run both"
                    )
                delta = paired_auc_difference(
                    before[0]["label"].to_numpy(),
                    np.stack([f["score"].to_numpy() for f in before]),
                    np.stack([f["score"].to_numpy() for f in mine]),
                    evaluate.n_bootstrap,
                    evaluate.seed,
                    groups=before[0]["patient"].astype(str).to_numpy(),
                )
                row |= {
                    "auc_delta": delta["value"],
                    "auc_delta_ci_low": delta["ci_low"],
                    "auc_delta_ci_high": delta["ci_high"],
                    "delta_seeds": len(common),
                }
            rows.append(row)
    return pd.DataFrame(rows)


def holdout_metrics(
    study: LeverStudy,
    summary: pd.DataFrame,
    recipes: dict[str, dict[str, Any]],
    crops: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """What ``dvc metrics`` and the registry read: per lever with every run finished, each fold's
    seed-mean figures, the mean over folds and the worst fold, with the classifier settings the lever
    trained with (``recipes``; sources and seed left out) and the crop settings its runs' pixels came
    from (``crops``), so a registered recipe finds its own figures."""
    out: dict[str, Any] = {"study": study.study, "folds": list(study.folds), "levers": {}}
    seeds = len(study.seeds) or 1
    for lever in study.levers:  # only a lever with every seed of every fold: no figure from part of a study
        part = summary[summary["lever"] == lever] if len(summary) else summary
        if len(part) != len(study.folds) or (part["seeds"] != seeds).any():
            continue
        folds = {
            row["fold"]: {
                k: float(row[k])
                for k in summary.columns
                if k.endswith(("_mean", "_sd", "_delta", "_ci_low", "_ci_high")) and pd.notna(row[k])
            }
            | {"seeds": int(row["seeds"])}
            for row in part.to_dict("records")  # sub-class names need not be identifiers
        }
        worst = part.loc[part["auc_mean"].idxmin()]
        out["levers"][lever] = {
            "folds": folds,
            "mean_auc": float(part["auc_mean"].mean()),
            "worst_auc": float(worst["auc_mean"]),
            "worst_fold": str(worst["fold"]),
            "classifier": recipes.get(lever, {}),
            "crops": crops.get(lever),
        }
    return out


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _with_ci(row: Any, key: str) -> str:
    return f"{_pct(row[key])} ({_pct(row[key + '_ci_low'])}–{_pct(row[key + '_ci_high'])})"


def _over_seeds(row: dict[str, Any], key: str) -> str:
    """Mean ± SD over seeds; one seed has no SD to show."""
    spread = f" ± {_pct(row[key + '_sd'])}" if row["seeds"] > 1 else ""
    return _pct(row[key + "_mean"]) + spread


def _mean_sd_cell(part: pd.DataFrame, key: str) -> str:
    if key not in part or part[key].isna().all():
        return "—"
    values = part[key].dropna()
    spread = f" ± {_pct(values.std(ddof=1))}" if len(values) > 1 else ""
    return f"{_pct(values.mean())}{spread} ({len(values)})"


def _delta_cell(row: Any) -> str:
    if "auc_delta" not in row or pd.isna(row["auc_delta"]):
        return "—"
    return format_delta(
        {"value": row["auc_delta"], "ci_low": row["auc_delta_ci_low"], "ci_high": row["auc_delta_ci_high"]}
    )


def _subclass_section(runs: pd.DataFrame, titles: dict[str, str]) -> list[str]:
    columns = sorted(c for c in runs.columns if c.startswith(AGAINST))
    if not columns:
        return []
    cells = [
        [lever, titles.get(fold, fold), column.removeprefix(AGAINST), _mean_sd_cell(part, column)]
        for (lever, fold), part in runs.groupby(["lever", "fold"], sort=False)
        for column in columns
        if part[column].notna().any()
    ]
    return [
        "## COVID against each non-COVID sub-class of the held-out source",
        "",
        "AUC of the held-out source's COVID slices against one of its non-COVID sub-classes at a time (mean ± SD "
        "over seeds, slices): does a fold tell COVID from other disease, or only from healthy lungs?",
        "",
        markdown_table(["lever", "held out", "COVID against", "AUC"], cells),
        "",
    ]


def holdout_markdown(
    study: LeverStudy,
    runs: pd.DataFrame,
    summary: pd.DataFrame,
    metrics: dict[str, Any],
    titles: dict[str, str],
    elsewhere: list[str] | None = None,
) -> str:
    seeds = ", ".join(map(str, study.seeds)) or "the recipe's"
    lines = [
        f"# Leave-one-source-out: study {study.study} ({study.variant} images)",
        "",
        f"Each lever, with seeds {seeds}, is trained once per source held out: on every other declared source (balanced "
        "by source and class; checkpoint and threshold chosen on their validation splits pooled), then scored on **every "
        "slice** of the source it never saw. Sensitivity and specificity are at that validation threshold. Intervals resample "
        "the held-out source's patients (SARS-CoV-2 CT: its scans). Δ AUC: the lever against the baseline on the same fold, "
        "on the seeds both have finished, every one's model scored on the same resampled patients; **real** when the interval excludes 0. The interval holds "
        "patient sampling, not training noise: read it beside the seed SD.",
        "",
        f"Base: params.yaml with `{as_overrides(study.base) or 'nothing changed'}`.",
        "",
        *(
            [
                "Left out, finished on other crops than params.yaml's (another lung segmenter), so not comparable: "
                f"{', '.join(elsewhere)}.",
                "",
            ]
            if elsewhere
            else []
        ),
        "## Per fold, over seeds",
        "",
    ]
    cells = [
        [
            row.lever,
            titles.get(row.fold, row.fold),
            str(int(row.seeds)),
            *(_over_seeds(row._asdict(), key) for key in FIGURES),
            _delta_cell(row._asdict()),
            f"{row.train_minutes:.0f}",
        ]
        for row in summary.itertuples()
    ]
    header = ["lever", "held out", "seeds", "AUC", "sensitivity", "specificity", "Δ AUC vs baseline", "train min"]
    lines += [markdown_table(header, cells), "", "## Over folds", ""]
    lines += [
        markdown_table(
            ["lever", "mean AUC over folds", "worst fold", "its AUC"] + [f"{titles.get(f, f)}" for f in study.folds],
            [
                [lever, _pct(m["mean_auc"]), titles.get(m["worst_fold"], m["worst_fold"]), _pct(m["worst_auc"])]
                + [_pct(m["folds"][f]["auc_mean"]) for f in study.folds]
                for lever, m in metrics["levers"].items()
            ],
        ),
        "",
        *_subclass_section(runs, titles),
        "## The trained sources' own test splits",
        "",
        "What each fold's model scores on the test split of each source it trained on (mean ± SD over seeds, "
        "slices): a source's own test split against the held-out figures above, and what adding a source costs "
        "the others (the fold without SARS-CoV-2 CT is the two-source recipe).",
        "",
        markdown_table(
            ["lever", "held out", *(f"{titles.get(f, f)} test AUC" for f in study.folds)],
            [
                [lever, titles.get(fold, fold)] + [_mean_sd_cell(part, f"test_auc.{name}") for name in study.folds]
                for (lever, fold), part in (runs.groupby(["lever", "fold"], sort=False) if len(runs) else [])
            ],
        ),
        "",
        "## Every run",
        "",
        markdown_table(
            ["run", "AUC", "sensitivity", "specificity", "threshold", "slices (patients)", "epoch", "min"],
            [
                [
                    row["run"],
                    *(_with_ci(row, k) for k in FIGURES),
                    f"{row['threshold']:.3f}",
                    f"{int(row['slices'])} ({int(row['patients'])})",
                    str(int(row["best_epoch"])),
                    f"{row['train_minutes']:.1f}",
                ]
                for _, row in runs.iterrows()
            ],
        ),
        "",
        f"Reproduce: `covidct levers pipelines/levers/{study.study}.yaml` (finished runs are reused); "
        f"`dvc metrics show reports/levers/{study.study}.json`.",
        "",
    ]
    return "\n".join(lines)


def summarise_holdout(root: Path, study: LeverStudy, base: dict[str, Any]) -> Path:
    """reports/levers/<study>.{md,csv,json,png} from every finished fold run on the crops its
    settings make today: a run on another lung segmenter's crops saw other pixels, so pairing it
    with today's would compare crops as much as levers (it stays on disk, and is named in the report)."""
    evaluate = EvaluateConfig.of(base)
    settings = {lever: with_overrides(base, study.base | overrides) for lever, overrides in study.levers.items()}
    crops = {lever: crop_settings(params) for lever, params in settings.items()}  # as the runner records them
    records, elsewhere = {}, []
    for run in study.runs(sources=list(study.folds)):
        path = lever_dir(root, study.study, run.name) / "metrics.json"
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("crops") == crops[run.lever]:
                records[run.name] = record
            else:
                elsewhere.append(run.name)
    runs = holdout_runs(root, study, records)
    summary = holdout_summary(root, study, runs, evaluate)
    recipes = {lever: classifier_recipe(params) for lever, params in settings.items()}
    metrics = holdout_metrics(study, summary, recipes, crops)
    titles = {name: source.title for name, source in declared_sources(base).items()}
    out = root / "reports" / "levers"
    write_text_atomic(out / f"{study.study}.csv", runs.to_csv(index=False))
    write_text_atomic(out / f"{study.study}.json", json.dumps(metrics, indent=2) + "\n")
    write_text_atomic(out / f"{study.study}.md", holdout_markdown(study, runs, summary, metrics, titles, elsewhere))
    if len(runs):
        plot_holdout(runs, [titles.get(f, f) for f in study.folds], list(study.folds), out / f"{study.study}.png")
    return out / f"{study.study}.md"
