"""What an epoch budget costs the two segmentation nets, measured before it goes in params.yaml.

The 60-minute bound on ``dvc repro`` is met partly by training the lung and lesion nets for
fewer epochs, which trades Dice for minutes. So the trade is measured: each arm (overrides of
params.yaml) trains the lung net and then the lesion net from it, as the two stages do, once per
seed; every validation and test slice's Dice of both nets is kept, and each arm is compared with
the first, slice by slice, seed against seed. The validation patients decide; the test patients
are the record.

Runs live in ``levers/segmenter_budget/<arm>_seed<k>/``: their Dice tables are committed and
their weights are not, so a clone reuses the runs and only trains what is missing.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from covidct.atomic import write_text_atomic
from covidct.checkpoints import load_checkpoint
from covidct.config import ConfigError, DataConfig, LesionConfig, PreprocessConfig, SegmenterConfig, load_params
from covidct.experiments.overrides import as_overrides, with_overrides
from covidct.experiments.scoring import slice_dice
from covidct.metrics import paired_mean_difference
from covidct.reports import markdown_table
from covidct.segmentation.data import load_lung_split
from covidct.segmentation.train import segmenter_meta, train_segmenter

RUNS = Path("levers/segmenter_budget")
NETS = ("segmenter", "lesion")
SPLITS = ("val", "test")


def run_settings(params: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides a run's weights."""
    return {
        "preprocess": PreprocessConfig.of(params).model_dump(),
        "segmenter": SegmenterConfig.of(params).model_dump(),
        "lesion": LesionConfig.of(params).model_dump(),
        "lung_split": params["lung_split"],
        "lung_subset_per_patient": DataConfig.of(params).lung_subset_per_patient,
    }


def _load(root: Path, pre: PreprocessConfig) -> dict[str, tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]]:
    loaded = {}
    for split in ("train", *SPLITS):
        table, images, lungs, lesions = load_lung_split(root, split, pre, lesions=True)
        assert lesions is not None
        loaded[split] = (table, images, lungs, lesions)
    return loaded


def _train(params: dict[str, Any], data: dict, out: Path, device: torch.device) -> dict[str, float]:
    """Both nets, the lesion net from the lung net's weights where ``lesion.init`` says so; minutes each."""
    pre = PreprocessConfig.of(params)
    minutes = {}
    initial = None
    for net, config in (("segmenter", SegmenterConfig.of(params)), ("lesion", LesionConfig.of(params))):
        target = 2 if net == "segmenter" else 3
        if net == "lesion" and config.init == "segmenter":
            initial, _ = load_checkpoint(out / "segmenter.safetensors", device, "train_segmenter")
        started = time.perf_counter()
        history = train_segmenter(
            (data["train"][1], data["train"][target]),
            (data["val"][1], data["val"][target]),
            config,
            device,
            out / f"{net}.safetensors",
            segmenter_meta(pre, config),
            initial=initial,
        )
        minutes[net] = (time.perf_counter() - started) / 60
        write_text_atomic(out / f"history_{net}.csv", history.to_csv(index=False))
    return minutes


def _score(data: dict, out: Path, device: torch.device) -> pd.DataFrame:
    rows = []
    for net in NETS:
        for split in SPLITS:
            table, images, lungs, lesions = data[split]
            dice = slice_dice(out / f"{net}.safetensors", images, lungs if net == "segmenter" else lesions, device)
            rows.append(table[["patient_id"]].assign(net=net, split=split, slice=np.arange(len(table)), dice=dice))
    return pd.concat(rows, ignore_index=True)


def budget_run(
    root: Path, params: dict[str, Any], out: Path, device: torch.device, weights_from: Path | None = None
) -> pd.DataFrame:
    """One arm at one seed: its Dice per slice, reused when ``out`` holds a run of the same settings.

    ``weights_from``: a ``models/`` folder whose ``segmenter`` and ``lesion`` weights a ``dvc repro``
    of these same settings wrote; they are scored instead of trained again (the report says so).
    """
    settings = json.loads(json.dumps(run_settings(params)))  # as run.json holds them
    record = out / "run.json"
    if (out / "dice.csv").is_file() and record.is_file():
        if json.loads(record.read_text())["settings"] == settings:
            return pd.read_csv(out / "dice.csv")
    if weights_from is not None:  # checked before anything is written
        for net in NETS:
            if not (weights_from / net / "model.safetensors").is_file():
                raise ConfigError(f"{weights_from / net / 'model.safetensors'}: no {net} weights to score")
    out.mkdir(parents=True, exist_ok=True)
    data = _load(root, PreprocessConfig.of(params))
    if weights_from is not None:
        for net in NETS:
            shutil.copyfile(weights_from / net / "model.safetensors", out / f"{net}.safetensors")
        minutes: dict[str, float] = {}
    else:
        minutes = _train(params, data, out, device)
    dice = _score(data, out, device)
    write_text_atomic(out / "dice.csv", dice.to_csv(index=False))
    source = f"{weights_from} (dvc repro)" if weights_from is not None else "trained here"
    write_text_atomic(record, json.dumps({"settings": settings, "weights": source, "minutes": minutes}, indent=2))
    return dice


def _mean(dice: pd.DataFrame, net: str, split: str) -> float:
    return float(dice.loc[(dice["net"] == net) & (dice["split"] == split), "dice"].mean())


def compare_budgets(
    root: Path,
    arms: dict[str, dict[str, Any]],
    seeds: list[int],
    device: torch.device,
    weights_from: dict[tuple[str, int], Path] | None = None,
) -> dict[str, Any]:
    """Every arm over ``seeds`` (the first arm is the base), paired per net and split."""
    base_params, weights_from = load_params(root / "params.yaml"), weights_from or {}
    settings = {  # every arm's overrides checked before anything trains
        (arm, seed): with_overrides(base_params, overrides | {"segmenter.seed": seed, "lesion.seed": seed})
        for arm, overrides in arms.items()
        for seed in seeds
    }
    runs: dict[tuple[str, int], pd.DataFrame] = {}
    for (arm, seed), params in settings.items():
        out = root / RUNS / f"{arm}_seed{seed}"
        runs[(arm, seed)] = budget_run(root, params, out, device, weights_from.get((arm, seed)))
        print(
            f"{arm}, seed {seed}: lung val Dice {_mean(runs[(arm, seed)], 'segmenter', 'val'):.4f}, "
            f"lesion val Dice {_mean(runs[(arm, seed)], 'lesion', 'val'):.4f}"
        )
    base = next(iter(arms))

    def part(arm: str, seed: int, net: str, split: str) -> pd.DataFrame:
        dice = runs[(arm, seed)]
        return dice[(dice["net"] == net) & (dice["split"] == split)]

    deltas = {
        arm: {
            f"{net}_{split}": paired_mean_difference(
                [part(base, s, net, split)["dice"].to_numpy() for s in seeds],
                [part(arm, s, net, split)["dice"].to_numpy() for s in seeds],
                part(base, seeds[0], net, split)["patient_id"].to_numpy(),
            )
            for net in NETS
            for split in SPLITS
        }
        for arm in list(arms)[1:]
    }
    return {
        "arms": {arm: as_overrides(overrides) for arm, overrides in arms.items()},
        "base": base,
        "seeds": seeds,
        "runs": {
            f"{arm} seed {seed}": {
                **{f"{net}_{split}": _mean(dice, net, split) for net in NETS for split in SPLITS},
                **json.loads((root / RUNS / f"{arm}_seed{seed}" / "run.json").read_text()),
            }
            for (arm, seed), dice in runs.items()
        },
        "means": {  # over the seeds
            arm: {
                f"{net}_{split}": float(np.mean([_mean(runs[(arm, s)], net, split) for s in seeds]))
                for net in NETS
                for split in SPLITS
            }
            for arm in arms
        },
        "deltas": deltas,
    }


def budget_markdown(record: dict[str, Any]) -> str:
    """The report: each run's mean Dice, then each arm against the base, paired."""

    def delta(d: dict[str, Any]) -> str:
        return (
            f"{100 * d['delta']:+.2f} ({100 * d['ci_low']:+.2f} to {100 * d['ci_high']:+.2f}; "
            f"{d['n_patients']} patients {100 * d['patient_ci_low']:+.2f} to {100 * d['patient_ci_high']:+.2f})"
        )

    means = [
        [f"{arm}, mean"] + [f"{100 * mean[f'{net}_{split}']:.2f}" for net in NETS for split in SPLITS] + [""]
        for arm, mean in record["means"].items()
    ]
    runs = [
        [name]
        + [f"{100 * run[f'{net}_{split}']:.2f}" for net in NETS for split in SPLITS]
        + [" + ".join(f"{run['minutes'][net]:.1f}" for net in NETS) if run["minutes"] else "dvc repro"]
        for name, run in record["runs"].items()
    ]
    head = ["run", "lung val", "lung test", "lesion val", "lesion test", "training minutes (lung + lesion)"]
    lines = [
        "# Epoch budgets of the lung and lesion nets",
        "",
        "Each arm trains the lung net, then the lesion net from it (`lesion.init`), as `dvc repro` does, once per seed "
        f"({', '.join(map(str, record['seeds']))}); Dice % per slice, mean. Arms: "
        + "; ".join(f"**{arm}** `{o or 'params.yaml'}`" for arm, o in record["arms"].items())
        + ". Runs marked `dvc repro` are the weights that pipeline run wrote for those settings.",
        "",
        markdown_table(head, runs + means),
        "",
        f"Δ Dice (points), each arm minus **{record['base']}**, slice by slice and seed against seed, averaged over "
        "the seeds; 95 % intervals resampling slices, then whole patients (few patients: coarse). "
        "Validation decides; test is the record.",
        "",
    ]
    for arm, parts in record["deltas"].items():
        rows = [
            [f"{net} {split}", delta(d), f"{d['seeds_better']} of {len(record['seeds'])}"]
            for key, d in parts.items()
            for net, split in [key.split("_")]
        ]
        lines += [f"**{arm}**", "", markdown_table(["net, split", "Δ Dice", "seeds better"], rows), ""]
    return "\n".join(lines)
