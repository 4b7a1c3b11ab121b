"""What a lever run scores and how runs compare: the threshold chosen on validation, metrics with
CIs per scored part, paired AUC differences from the baseline, seed means and seed ensembles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidct.datasets import CC_CCII, COVID_CT
from covidct.experiments.overrides import as_overrides
from covidct.levers.plan import BASELINE, LeverStudy, lever_dir
from covidct.metrics import flatten_metrics, metrics_with_ci, paired_auc_difference
from covidct.thresholds import decision_threshold

SCORINGS = {"": False, "+tta": True}  # row suffix -> test-time augmentation
#: What each run is scored on: COVID-CT's official validation and test splits (the paper's), and
#: CC-CCII's validation patients, held out unless the lever trains on CC-CCII.
PARTS = {"val": (COVID_CT, "val"), "test": (COVID_CT, "test"), "cc_val": (CC_CCII, "val")}


def part_rows(predictions: pd.DataFrame, part: str) -> pd.DataFrame:
    """One scored part: a source's split."""
    source, split = PARTS[part]
    return predictions[(predictions["split"] == split) & (predictions["source"] == source)]


def score_lever(predictions: pd.DataFrame, evaluate: Any) -> dict[str, Any]:
    """Threshold chosen on the validation rows of the trained sources (pooled), then each
    part's metrics with CIs at it."""
    val = predictions[predictions["split"] == "val"]
    val = val[val["trained"].astype(bool)]
    threshold = decision_threshold(val, evaluate)
    out: dict[str, Any] = {"threshold": threshold}
    for name in PARTS:
        part = part_rows(predictions, name)
        if part["label"].nunique() == 2:
            out[name] = metrics_with_ci(
                part["label"].to_numpy(), part["score"].to_numpy(), threshold, evaluate.n_bootstrap, evaluate.seed
            )
    return out


def _predictions(root: Path, study: LeverStudy, run_name: str, suffix: str) -> pd.DataFrame:
    return pd.read_csv(lever_dir(root, study.study, run_name) / f"predictions{suffix}.csv", dtype={"patient": str})


def _reference(lever: str, suffix: str) -> tuple[str, str] | None:
    """What a row is compared with: the baseline scored the same way; the baseline's own
    ``+tta`` row with the baseline without TTA (the effect of TTA itself)."""
    if lever == BASELINE:
        return (BASELINE, "") if suffix else None
    return BASELINE, suffix


def _paired(
    reference: list[pd.DataFrame], this: list[pd.DataFrame], n_boot: int, seed: int, label: str
) -> dict[str, float]:
    """Paired AUC differences per scored part; each list holds one frame per seed."""
    row: dict[str, float] = {}
    for split in PARTS:
        a, b = [part_rows(f, split) for f in reference], [part_rows(f, split) for f in this]
        if any(f["label"].nunique() < 2 for f in a + b):
            continue
        if not all(np.array_equal(f["relpath"].to_numpy(), a[0]["relpath"].to_numpy()) for f in a + b):
            raise ValueError(f"lever {label}: {split} images differ from the baseline's; re-run both")
        stack = lambda frames: np.stack([f["score"].to_numpy() for f in frames])  # noqa: E731
        groups = (
            a[0]["patient"].to_numpy() if split == "cc_val" and "patient" in a[0] else None
        )  # CC-CCII: whole patients
        delta = paired_auc_difference(a[0]["label"].to_numpy(), stack(a), stack(b), n_boot, seed, groups=groups)
        row |= {
            f"{split}_auc_delta": delta["value"],
            f"{split}_auc_delta_ci_low": delta["ci_low"],
            f"{split}_auc_delta_ci_high": delta["ci_high"],
        }
    return row


def _metrics_row(
    label: str, lever: str, seed: int | None, suffix: str, overrides: str, result: dict[str, Any]
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "lever": label,
        "arm": lever,
        "seed": seed,
        "scoring": suffix,
        "overrides": overrides,
        "threshold": result["threshold"],
    }
    for split in PARTS:
        row |= {f"{split}_{k}": v for k, v in flatten_metrics(result.get(split, {})).items()}
    return row


def _averaged(frames: list[pd.DataFrame], lever: str) -> pd.DataFrame:
    """The seeds' predictions as one model's: their scores averaged, image by image."""
    if not all(np.array_equal(f["relpath"].to_numpy(), frames[0]["relpath"].to_numpy()) for f in frames):
        raise ValueError(f"lever {lever}: its seeds scored different images; re-run them")
    return frames[0].assign(score=np.mean([f["score"].to_numpy() for f in frames], axis=0))


def _ensemble(
    root: Path, study: LeverStudy, records: dict[str, dict[str, Any]], lever: str, suffix: str
) -> pd.DataFrame | None:
    """The lever's seeds as one model; None until every seed is finished."""
    names = [study.run_name(lever, s) for s in study.seeds]
    if len(names) < 2 or any(name not in records for name in names):
        return None
    return _averaged([_predictions(root, study, name, suffix) for name in names], lever)


def lever_table(root: Path, study: LeverStudy, records: dict[str, dict[str, Any]], evaluate: Any) -> pd.DataFrame:
    """One row per finished run and scoring, then one per seed ensemble, each with its paired
    AUC difference from the baseline (same seed, same scoring)."""
    rows = []
    for run in study.runs():
        if run.name not in records:
            continue
        record = records[run.name]
        for suffix, result in record["scorings"].items():
            row = _metrics_row(
                run.name + suffix, run.lever, run.seed, suffix, as_overrides(run.overrides) or "(the base)", result
            )
            reference = _reference(run.lever, suffix)
            if reference and study.run_name(reference[0], run.seed) in records:
                before = _predictions(root, study, study.run_name(reference[0], run.seed), reference[1])
                row |= _paired(
                    [before],
                    [_predictions(root, study, run.name, suffix)],
                    evaluate.n_bootstrap,
                    evaluate.seed,
                    run.name,
                )
            rows.append(
                row | {"kind": "run", "best_epoch": record["best_epoch"], "train_minutes": record["train_seconds"] / 60}
            )
    for lever in study.levers:
        for suffix in SCORINGS:
            mine = _ensemble(root, study, records, lever, suffix)
            if mine is None:
                continue
            seeds = ", ".join(map(str, study.seeds))
            row = _metrics_row(
                f"{lever}_ensemble{suffix}",
                lever,
                None,
                suffix,
                f"scores averaged over seeds {seeds}",
                score_lever(mine, evaluate),
            )
            reference = _reference(lever, suffix)
            before = _ensemble(root, study, records, *reference) if reference else None
            if before is not None:
                row |= _paired([before], [mine], evaluate.n_bootstrap, evaluate.seed, lever)
            minutes = sum(records[study.run_name(lever, s)]["train_seconds"] for s in study.seeds) / 60
            rows.append(row | {"kind": "ensemble", "best_epoch": np.nan, "train_minutes": minutes})
    return pd.DataFrame(rows)


def seed_table(root: Path, study: LeverStudy, table: pd.DataFrame, evaluate: Any) -> pd.DataFrame:
    """Each lever over its seeds: mean and SD of the per-seed figures, the mean paired
    difference from the baseline with every seed's model scored on the same resamples, and
    what averaging the seeds' scores gains over their mean AUC."""
    if table.empty or not study.seeds:
        return pd.DataFrame()
    rows = []
    runs = table[table["kind"] == "run"]
    for lever in study.levers:
        for suffix in SCORINGS:
            part = runs[(runs["arm"] == lever) & (runs["scoring"] == suffix)]
            if len(part) < 2 or len(part) != len(study.seeds):
                continue
            row: dict[str, Any] = {"lever": lever + suffix, "seeds": len(part)}
            for key in (
                "val_auc",
                "test_auc",
                "test_accuracy",
                "test_recall",
                "test_f1",
                "cc_val_auc",
                "cc_val_specificity",
            ):
                if key in part:
                    row |= {f"{key}_mean": part[key].mean(), f"{key}_sd": part[key].std(ddof=1)}
            seeds = [_predictions(root, study, study.run_name(lever, s), suffix) for s in study.seeds]
            reference = _reference(lever, suffix)
            if reference and "test_auc_delta" in part and part["test_auc_delta"].notna().all():
                before = [_predictions(root, study, study.run_name(reference[0], s), reference[1]) for s in study.seeds]
                row |= _paired(before, seeds, evaluate.n_bootstrap, evaluate.seed, lever)
                row["seeds_better"] = int((part["test_auc_delta"] > 0).sum())
            gain = _paired(seeds, [_averaged(seeds, lever)], evaluate.n_bootstrap, evaluate.seed, lever)
            rows.append(row | {k.replace("auc_delta", "ensemble_gain"): v for k, v in gain.items()})
    return pd.DataFrame(rows)
