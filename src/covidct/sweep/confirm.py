"""Confirm a study's best trial before it goes into params.yaml.

The best of many noisy trials is biased upward. So the best trial's values are trained again
against params.yaml's over several seeds, at the full budget, and compared slice by slice.

- A segmenter study is confirmed here. Every run's Dice per slice on the validation patients
  (what decides) and the test patients (for the record) goes to
  ``reports/sweeps/confirmations/<study>.{json,md}``, with paired intervals.
- A classifier study is confirmed by a lever study, which already trains and scores classifiers
  over seeds: :func:`confirmation_levers` writes it, :func:`record_lever_confirmation` reads its
  runs into the same report, on the study's own objective.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
import pandas as pd
import torch
import yaml
from sklearn.metrics import roc_auc_score

from covidct.atomic import write_text_atomic
from covidct.config import DataConfig, EvaluateConfig, PreprocessConfig, SegmenterConfig, load_params
from covidct.experiments.cache import cache_key
from covidct.experiments.overrides import as_overrides, with_overrides
from covidct.experiments.scoring import slice_dice
from covidct.levers.plan import BASELINE, LeverStudy, lever_dir, load_levers
from covidct.metrics import paired_auc_difference, paired_mean_difference
from covidct.paths import CONFIRMATIONS
from covidct.reports import markdown_table
from covidct.runtime import select_device
from covidct.segmentation.data import first_per_patient, load_lung_split
from covidct.segmentation.train import segmenter_meta, train_segmenter
from covidct.sweep.config import SweepConfig
from covidct.sweep.objective import study_parent
from covidct.sweep.study import best_overrides
from covidct.tracking import child_run, log_epoch

DEFAULTS = "params.yaml"


def _arm(trial: optuna.trial.FrozenTrial) -> str:
    return f"trial {trial.number}"


def _dice_per_slice(
    root: Path, params: dict[str, Any], device: torch.device, tags: dict[str, str], parent: tuple
) -> pd.DataFrame:
    """One run: train on the training patients, then every validation and test slice's Dice.
    Kept under a key of its settings, so the same settings (an arm equal to params.yaml, another
    study's confirmation) are trained once."""
    pre, seg = PreprocessConfig.of(params), SegmenterConfig.of(params)
    key = cache_key(
        {
            "preprocess": pre.model_dump(),
            "segmenter": seg.model_dump(),
            "split": params["lung_split"],
            "per_patient": DataConfig.of(params).lung_subset_per_patient,
        }
    )
    out = root / "optuna" / "confirm" / key
    if (out / "dice.csv").is_file():
        return pd.read_csv(out / "dice.csv")
    per_patient = DataConfig.of(params).lung_subset_per_patient  # the study's budget, as its trials had it
    splits = {}
    for split in ("train", "val", "test"):
        table, images, masks, _ = load_lung_split(root, split, pre)
        keep = first_per_patient(table, per_patient) if split != "test" else np.ones(len(table), bool)
        splits[split] = (table[keep].reset_index(drop=True), images[keep], masks[keep])
    sets = {s: (images, masks) for s, (_, images, masks) in splits.items()}
    meta = segmenter_meta(pre, seg)
    with child_run(*parent, tags["run"], {"preprocess": params["preprocess"], "segmenter": params["segmenter"]}, tags):
        train_segmenter(sets["train"], sets["val"], seg, device, out / "model.safetensors", meta, log_epoch)
        rows = []
        for split in ("val", "test"):
            table, images, masks = splits[split]
            dice = slice_dice(out / "model.safetensors", images, masks, device)
            rows.append(table[["patient_id"]].assign(split=split, slice=np.arange(len(table)), dice=dice))
        dice = pd.concat(rows, ignore_index=True)
        mlflow.log_metrics({f"{split}_dice": _mean(dice, split) for split in ("val", "test")})
    write_text_atomic(out / "dice.csv", dice.to_csv(index=False))  # last: a run killed before it trains again
    return dice


def _mean(dice: pd.DataFrame, split: str) -> float:
    return float(dice.loc[dice["split"] == split, "dice"].mean())


def _paired(runs: dict[tuple[str, int], pd.DataFrame], arm: str, seeds: list[int], split: str) -> dict[str, Any]:
    """The trial minus params.yaml, per slice, seed against seed."""

    def part(arm_: str, seed: int) -> pd.DataFrame:
        dice = runs[(arm_, seed)]
        return dice[dice["split"] == split]

    return paired_mean_difference(
        [part(DEFAULTS, s)["dice"].to_numpy() for s in seeds],
        [part(arm, s)["dice"].to_numpy() for s in seeds],
        part(DEFAULTS, seeds[0])["patient_id"].to_numpy(),
    )


def confirm_segmenter(root: Path, config: SweepConfig, study: optuna.Study, seeds: list[int]) -> Path:
    """Train params.yaml's segmenter and the best trial's over ``seeds``, both at the study's budget;
    the report's path."""
    base, best, trial = load_params(root / "params.yaml"), best_overrides(study, config), study.best_trial
    arms = {DEFAULTS: {}, _arm(trial): best}
    out, device = root / CONFIRMATIONS, select_device()
    parent = study_parent(config)
    runs = {}
    for arm, overrides in arms.items():
        for seed in seeds:
            params = with_overrides(base, config.budget | overrides | {"segmenter.seed": seed})
            tags = {
                "covidct.role": "confirmation",
                "covidct.verdicts": config.study,
                "run": f"confirm {arm} seed {seed}",
            }
            runs[(arm, seed)] = _dice_per_slice(root, params, device, tags, parent)
            print(f"{arm}, seed {seed}: val Dice {_mean(runs[(arm, seed)], 'val'):.4f}")
    record = {
        "study": config.study,
        "trial": trial.number,
        "trial_value": trial.value,
        "overrides": best,
        "budget": config.budget,
        "seeds": seeds,
        "runs": {
            f"{arm} seed {seed}": {split: _mean(dice, split) for split in ("val", "test")}
            for (arm, seed), dice in runs.items()
        },
        "val": _paired(runs, _arm(trial), seeds, "val"),
        "test": _paired(runs, _arm(trial), seeds, "test"),
    }
    record["adopt"] = bool(record["val"]["ci_low"] > 0 and record["val"]["patient_ci_low"] > 0)
    write_text_atomic(out / f"{config.study}.json", json.dumps(record, indent=2) + "\n")
    write_text_atomic(out / f"{config.study}.md", _markdown(record))
    return out / f"{config.study}.md"


def _markdown(record: dict[str, Any]) -> str:
    def delta(part: dict[str, Any]) -> str:
        return (
            f"{100 * part['delta']:+.2f} ({100 * part['ci_low']:+.2f} to {100 * part['ci_high']:+.2f} slices; "
            f"{100 * part['patient_ci_low']:+.2f} to {100 * part['patient_ci_high']:+.2f} {part['n_patients']} patients)"
        )

    rows = [[name, f"{100 * v['val']:.2f}", f"{100 * v['test']:.2f}"] for name, v in record["runs"].items()]
    verdict = (
        "adopt: the validation interval, over slices and over patients, is above 0"
        if record["adopt"]
        else "not adopted: the validation interval includes 0 or lies below it (noise, or worse)"
    )
    return "\n".join(
        [
            f"# Confirmation of study {record['study']}: trial {record['trial']} against params.yaml",
            "",
            f"Trial {record['trial']} (validation Dice {100 * record['trial_value']:.2f} in the study): "
            f"`{as_overrides(record['overrides'])}`. Each arm trained once per seed ({', '.join(map(str, record['seeds']))}) "
            f"on the lung set's training patients at the study's budget (`{as_overrides(record['budget']) or 'params.yaml as it is'}`).",
            "",
            markdown_table(["run", "val Dice %", "test Dice %"], rows),
            "",
            "Δ Dice (points): the trial minus params.yaml, slice by slice, each seed against the same seed, averaged over",
            "the seeds; 95 % bootstrap intervals resampling slices, then whole patients (few patients: coarse).",
            "",
            f"- validation (decides): {delta(record['val'])}; seeds better: {record['val']['seeds_better']} of {len(record['seeds'])}",
            f"- test (the record, never the choice): {delta(record['test'])}",
            "",
            f"**{verdict}.**",
            "",
        ]
    )


def lever_plan(root: Path, config: SweepConfig) -> Path:
    """The lever study that confirms a classifier study."""
    return root / "pipelines" / "levers" / f"confirm-{config.study}.yaml"


def confirmation_levers(root: Path, config: SweepConfig, study: optuna.Study, seeds: list[int]) -> Path:
    """A classifier study's best trial as a lever study against params.yaml (``covidct levers``)."""
    trial = study.best_trial
    plan = {
        "study": f"confirm-{config.study}",
        "seeds": seeds,
        "base": dict(config.budget),  # at the study's budget, as the segmenter's confirmation
        "levers": {"baseline": {}, f"trial_{trial.number}": best_overrides(study, config)},
    }
    path = lever_plan(root, config)
    header = f"# Confirms study {config.study}'s best trial ({trial.number}) against params.yaml over seeds.\n"
    write_text_atomic(path, header + yaml.safe_dump(plan, sort_keys=False))
    return path


def record_lever_confirmation(root: Path, config: SweepConfig, study: optuna.Study) -> Path | None:
    """Once the confirmation lever study has run its seeds: each arm of the best trial (the trial,
    or a part of it the plan names ``trial_<n>_...``) against params.yaml on the study's own
    objective, the validation AUC pooled over the sources trained on, paired seed by seed, as
    ``confirmations/<study>.{json,md}``; adopt where that interval is above 0. register_model tags
    a version with the arm whose values params.yaml holds. None while no arm has run every seed."""
    plan, trial = load_levers(lever_plan(root, config)), study.best_trial
    evaluate = EvaluateConfig.of(load_params(root / "params.yaml"))
    baseline = {split: _pooled(root, plan, BASELINE, split) for split in ("val", "test")}
    prefix = f"trial_{trial.number}"
    arms = {}
    for lever, overrides in plan.levers.items():
        if not (lever == prefix or lever.startswith(prefix + "_")) or baseline["val"] is None:
            continue
        runs = {split: _pooled(root, plan, lever, split) for split in ("val", "test")}
        if runs["val"] is None:
            continue
        parts = {split: _paired_pooled(baseline[split], runs[split], evaluate) for split in ("val", "test")}
        arms[lever] = {"overrides": overrides, **parts, "adopt": bool(parts["val"]["ci_low"] > 0)}
    if not arms:
        return None
    record = {
        "study": config.study,
        "trial": trial.number,
        "trial_value": trial.value,
        "lever_study": plan.study,
        "seeds": list(plan.seeds),
        "arms": arms,
    }
    out = root / CONFIRMATIONS
    write_text_atomic(out / f"{config.study}.json", json.dumps(record, indent=2) + "\n")
    write_text_atomic(out / f"{config.study}.md", _lever_markdown(record))
    return out / f"{config.study}.md"


def _pooled(root: Path, plan: LeverStudy, lever: str, split: str) -> list[pd.DataFrame] | None:
    """One frame per seed: the split's rows of every source the run trained on, or None while a
    seed has not run."""
    frames = []
    for seed in plan.seeds:
        path = lever_dir(root, plan.study, plan.run_name(lever, seed)) / "predictions.csv"
        if not path.is_file():
            return None
        frame = pd.read_csv(path, dtype={"patient": str})
        frames.append(frame[(frame["split"] == split) & frame["trained"].astype(bool)].reset_index(drop=True))
    return frames


def _paired_pooled(reference: list[pd.DataFrame], this: list[pd.DataFrame], evaluate: EvaluateConfig) -> dict[str, Any]:
    """The arm's mean AUC minus the reference's over seeds, whole patients (scans) resampled."""
    keys = [(f["source"] + "/" + f["relpath"]).to_numpy() for f in reference + this]
    if not all(np.array_equal(k, keys[0]) for k in keys):
        raise ValueError("a confirmation arm scored other images than params.yaml's; run both again")
    labels, groups = (
        reference[0]["label"].to_numpy(),
        (reference[0]["source"] + "/" + reference[0]["patient"]).to_numpy(),
    )
    stack = lambda frames: np.stack([f["score"].to_numpy() for f in frames])  # noqa: E731
    delta = paired_auc_difference(
        labels, stack(reference), stack(this), evaluate.n_bootstrap, evaluate.seed, groups=groups
    )
    sources = reference[0]["source"].to_numpy()
    everything = np.ones(len(labels), dtype=bool)
    reference_aucs, aucs = _aucs(reference, labels, everything), _aucs(this, labels, everything)
    by_source = {  # a pooled AUC also counts how the sources' scores sit against each other
        name: {
            "baseline_auc_mean": float(np.mean(_aucs(reference, labels, sources == name))),
            "auc_mean": float(np.mean(_aucs(this, labels, sources == name))),
        }
        for name in dict.fromkeys(sources)
        if len(set(labels[sources == name])) == 2
    }
    return {
        "delta": delta["value"],
        "ci_low": delta["ci_low"],
        "ci_high": delta["ci_high"],
        "auc_mean": float(np.mean(aucs)),
        "baseline_auc_mean": float(np.mean(reference_aucs)),
        "seeds_better": int(sum(b > a for a, b in zip(reference_aucs, aucs, strict=True))),
        "by_source": by_source,
    }


def _aucs(frames: list[pd.DataFrame], labels: np.ndarray, rows: np.ndarray) -> list[float]:
    """Each seed's AUC on ``rows``."""
    return [float(roc_auc_score(labels[rows], f["score"].to_numpy()[rows])) for f in frames]


def _lever_markdown(record: dict[str, Any]) -> str:
    def delta(part: dict[str, Any]) -> str:
        return f"{100 * part['delta']:+.1f} ({100 * part['ci_low']:+.1f} to {100 * part['ci_high']:+.1f})"

    rows = [
        [
            name,
            f"`{as_overrides(arm['overrides'])}`",
            f"{100 * arm['val']['baseline_auc_mean']:.1f} → {100 * arm['val']['auc_mean']:.1f}",
            delta(arm["val"]),
            f"{arm['val']['seeds_better']} of {len(record['seeds'])}",
            delta(arm["test"]),
            "adopt" if arm["adopt"] else "not adopted (noise, or worse)",
        ]
        for name, arm in record["arms"].items()
    ]
    header = [
        "arm",
        "overrides",
        "val AUC, params.yaml → arm",
        "Δ val AUC",
        "seeds better on val",
        "Δ test AUC (the record)",
        "verdict",
    ]
    return "\n".join(
        [
            f"# Confirmation of study {record['study']}: trial {record['trial']} against params.yaml",
            "",
            f"Trial {record['trial']} reached validation AUC {100 * record['trial_value']:.1f} in the study. Each arm below "
            f"trained once per seed ({', '.join(map(str, record['seeds']))}) beside params.yaml's, in lever study "
            f"`{record['lever_study']}` ([report](../../levers/{record['lever_study']}.md)).",
            "",
            "AUC pooled over the sources trained on (the study's objective, and what the pipeline picks its checkpoint",
            "on), mean over the seeds. Δ AUC (points): the arm minus params.yaml, each seed against the same seed,",
            "averaged over the seeds; 95 % intervals from resampling whole patients (scans) with every seed's models",
            "scored on the same resamples. Validation decides; test is the record.",
            "",
            markdown_table(header, rows),
            "",
            "Each source's own validation AUC, mean over the seeds, params.yaml → arm:",
            "",
            *[
                f"- {name}: "
                + ", ".join(
                    f"{source} {100 * v['baseline_auc_mean']:.1f} → {100 * v['auc_mean']:.1f}"
                    for source, v in arm["val"]["by_source"].items()
                )
                for name, arm in record["arms"].items()
            ],
            "",
        ]
    )
