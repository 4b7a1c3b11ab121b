"""Recipe levers measured one at a time: each lever is a params.yaml override, trained on the
images of the last ``dvc repro`` as its own MLflow run, scored on validation (which also
chooses the threshold) and test with bootstrap CIs, and compared with the baseline by a
paired bootstrap on the same test images. Every lever is also scored with test-time
augmentation, which needs no training of its own. A study with ``seeds`` trains every lever
once per seed, so a lever's effect can be told from training noise: it adds each lever's
mean over seeds and the ensemble of its seeds.

A lever's row is reproduced in the full pipeline by ``dvc exp run -S key=value ...``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from covidct.atomic import write_text_atomic
from covidct.checkpoints import clear_stage_resume, resume_dir
from covidct.classification.model import load_classifier
from covidct.classification.table import checkpoint_meta, classifier_table, load_classifier_inputs
from covidct.classification.train import fit_and_predict, predict_scores
from covidct.config import ConfigError, read_yaml_mapping, section
from covidct.datasets import CC_CCII, COVID_CT
from covidct.metrics import flatten_metrics, metrics_with_ci, paired_auc_difference
from covidct.paths import CC_CCII_SPLIT, VARIANTS
from covidct.plots import plot_lever_forest
from covidct.reports import markdown_table
from covidct.sweep.cache import cache_key
from covidct.sweep.space import with_overrides
from covidct.thresholds import decision_threshold
from covidct.tracking import child_run

BASELINE = "baseline"
SCORINGS = {"": False, "+tta": True}  # row suffix -> test-time augmentation
#: What each run is scored on: COVID-CT's official validation and test splits (the paper's), and
#: CC-CCII's validation patients, held out unless the lever trains on CC-CCII.
PARTS = {"val": (COVID_CT, "val"), "test": (COVID_CT, "test"), "cc_val": (CC_CCII, "val")}


def part_rows(predictions: pd.DataFrame, part: str) -> pd.DataFrame:
    """One scored part; predictions from before multi-source runs hold COVID-CT rows only."""
    source, split = PARTS[part]
    rows = predictions[predictions["split"] == split]
    return rows[rows["source"] == source] if "source" in rows else (rows if source == COVID_CT else rows.iloc[:0])


@dataclass(frozen=True)
class LeverRun:
    name: str  # its directory and MLflow run: the lever, or <lever>_seed<k> in a study with seeds
    lever: str
    seed: int | None  # None: the recipe's own classifier.seed
    overrides: dict[str, Any]


@dataclass(frozen=True)
class LeverStudy:
    study: str
    variant: str  # cropped (the segmented pipeline) or raw
    levers: dict[str, dict[str, Any]]  # name -> dotted params overrides; "baseline" has none
    base: dict[str, Any]  # overrides under every lever, baseline included: pins the study's starting recipe
    seeds: tuple[int, ...] = ()  # every lever once per seed; empty: once, with the recipe's seed

    def run_name(self, lever: str, seed: int | None) -> str:
        return lever if seed is None else f"{lever}_seed{seed}"

    def runs(self, levers: list[str] | None = None) -> list[LeverRun]:
        runs = []
        for lever in levers or list(self.levers):
            for seed in self.seeds or (None,):
                overrides = self.levers[lever] if seed is None else self.levers[lever] | {"classifier.seed": seed}
                runs.append(LeverRun(self.run_name(lever, seed), lever, seed, overrides))
        return runs


def load_levers(path: str | Path) -> LeverStudy:
    raw = read_yaml_mapping(path, "lever study")
    levers = raw.get("levers")
    if not isinstance(levers, dict) or BASELINE not in levers:
        raise ConfigError(f"{path}: levers: must be a mapping of name -> overrides that includes {BASELINE!r}")
    if raw.get("variant", "cropped") not in VARIANTS:
        raise ConfigError(f"{path}: variant: must be one of {', '.join(VARIANTS)}, got {raw.get('variant')!r}")
    for name, overrides in levers.items():
        if not isinstance(overrides, dict) or (name == BASELINE and overrides):
            raise ConfigError(
                f"{path}: levers.{name}: must be a mapping of dotted keys (baseline: {{}}; common settings go under base:)"
            )
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: base: must be a mapping of dotted keys")
    seeds = raw.get("seeds") or []
    if not isinstance(seeds, list) or any(type(s) is not int or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: seeds: must be a list of distinct integers >= 0, got {seeds!r}")
    if seeds and any("classifier.seed" in overrides for overrides in [base, *levers.values()]):
        raise ConfigError(f"{path}: classifier.seed: set by seeds:, not by a lever or base")
    return LeverStudy(
        str(raw.get("study", Path(path).stem)),
        raw.get("variant", "cropped"),
        {str(k): dict(v) for k, v in levers.items()},
        dict(base),
        tuple(seeds),
    )


def lever_dir(root: Path, study: str, name: str) -> Path:
    return root / "levers" / study / name


def _fingerprint(params: dict[str, Any], images: np.ndarray) -> str:
    """The lever's settings and its input pixels: a finished lever is reused only while both hold.

    ``ema_decay: 0`` and ``precision: auto`` train exactly as runs from before the options did, so
    they are left out and those runs keep their fingerprints.
    """
    before = {"ema_decay": 0, "precision": "auto"}
    classifier = {k: v for k, v in params["classifier"].items() if not (k in before and v == before[k])}
    return cache_key(
        {
            "classifier": classifier,
            "evaluate": params["evaluate"],
            "images": hashlib.sha256(images.tobytes()).hexdigest(),
        }
    )


def score_lever(predictions: pd.DataFrame, evaluate: Any) -> dict[str, Any]:
    """Threshold chosen on the validation rows of the trained sources (pooled), then each
    part's metrics with CIs at it."""
    val = predictions[predictions["split"] == "val"]
    val = val[val["trained"].astype(bool)] if "trained" in val else val
    threshold = decision_threshold(val, evaluate)
    out: dict[str, Any] = {"threshold": threshold}
    for name in PARTS:
        part = part_rows(predictions, name)
        if part["label"].nunique() == 2:
            out[name] = metrics_with_ci(
                part["label"].to_numpy(), part["score"].to_numpy(), threshold, evaluate.n_bootstrap, evaluate.seed
            )
    return out


def _reuse(root: Path, out: Path, key: str, run: LeverRun) -> dict[str, Any] | None:
    """A finished run with these settings and pixels: this one, or another study's (copied here)."""
    mine = out / "metrics.json"
    for path in [mine, *sorted((root / "levers").glob("*/*/metrics.json"))]:
        if not path.is_file() or json.loads(path.read_text()).get("fingerprint") != key:
            continue
        record = json.loads(path.read_text())
        if path != mine:
            shutil.copytree(path.parent, out, ignore=shutil.ignore_patterns("metrics.json"), dirs_exist_ok=True)
            record |= {"lever": run.lever, "run": run.name, "seed": run.seed, "overrides": run.overrides}
            write_text_atomic(mine, json.dumps(record, indent=2))  # last: a half-copied run is not a finished one
        print(f"lever {run.name}: reused ({path.parent})")
        return record
    return None


def run_lever(
    root: Path, base: dict[str, Any], study: LeverStudy, run: LeverRun, device: torch.device
) -> dict[str, Any]:
    """Train (or reuse) one lever run; returns its record, also written to ``<lever_dir>/metrics.json``."""
    params = with_overrides(base, study.base | run.overrides)
    config, evaluate = section(params, "classifier"), section(params, "evaluate")
    table = classifier_table(root, config)
    images = load_classifier_inputs(root, table, study.variant, config, progress=f"decode {study.variant} images")
    out, key = lever_dir(root, study.study, run.name), _fingerprint(params, images)
    record = _reuse(root, out, key, run)
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
            out / "model.pt",
            checkpoint_meta(config, study.variant),
            on_epoch=lambda row: mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"]),
            resume_dir=resume_dir(
                root, f"levers/{study.study}/{run.name}"
            ),  # a killed lever carries on from its last epoch
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
            "lever": run.lever,
            "run": run.name,
            "seed": run.seed,
            "overrides": run.overrides,
            "fingerprint": key,
            "best_epoch": int(meta["epoch"]),
            "train_seconds": float(history["epoch_seconds"].sum()),
            "scorings": {suffix: score_lever(part, evaluate) for suffix, part in scored.items()},
        }
        for suffix, result in record["scorings"].items():
            prefix = "tta_" if suffix else ""
            mlflow.log_metrics(
                {f"{prefix}threshold": result["threshold"]}
                | {
                    f"{prefix}{split}_{k}": v
                    for split in PARTS
                    if split in result
                    for k, v in flatten_metrics(result[split]).items()
                }
            )
        write_text_atomic(out / "history.csv", history.to_csv(index=False))
        write_text_atomic(out / "metrics.json", json.dumps(record, indent=2))
        mlflow.log_artifacts(str(out), artifact_path="lever")
    clear_stage_resume(root, f"levers/{study.study}/{run.name}")
    return record


def _predictions(root: Path, study: LeverStudy, run_name: str, suffix: str) -> pd.DataFrame:
    frame = pd.read_csv(lever_dir(root, study.study, run_name) / f"predictions{suffix}.csv")
    if "source" in frame and "patient" not in frame:  # runs from before the column: CC-CCII's patients from its split
        groups = pd.read_csv(root / CC_CCII_SPLIT).set_index("relpath")["patient_group"].astype(str)
        frame["patient"] = frame["relpath"].map(groups).where(frame["source"] == CC_CCII, frame["relpath"])
    return frame


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
    evaluate = section(base, "evaluate")
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


def run_levers(
    root: Path, base: dict[str, Any], study: LeverStudy, only: list[str] | None, device: torch.device
) -> Path:
    unknown = sorted(set(only or []) - set(study.levers))
    if unknown:
        raise ConfigError(f"--only: no lever named {unknown[0]!r} (levers: {', '.join(study.levers)})")
    runs = study.runs(only)
    for run in runs:  # every override checked before the first lever trains
        with_overrides(base, study.base | run.overrides)
    for run in runs:
        run_lever(root, base, study, run, device)
    return summarise(root, study, base)


def as_overrides(overrides: dict[str, Any]) -> str:
    """The `dvc exp run` arguments that put a lever into the full pipeline."""
    return " ".join(f"-S {k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items())
