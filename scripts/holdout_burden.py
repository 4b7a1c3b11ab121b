"""Lesion evidence on the leave-one-source-out folds (issues 26 and 27): the lesion burden alone
(lesion over lung, :mod:`covidct.lesions`) as a COVID score, beside the holdout study's baseline
classifier on the same held-out slices.

The lesion segmenter trained on the lung set only (another collection: no slice of COVID-CT,
CC-CCII or SARS-CoV-2 CT), so its burden is held out for every fold by construction. Per fold,
the burden's threshold is chosen as a fold's classifier threshold is: on the validation splits of
the two other sources, pooled (``evaluate.val_recall_floor``); every slice of the held-out source
is scored; intervals resample its patients (SARS-CoV-2 CT: scans). Δ: burden minus the
classifier's seeds (paired, the same slices, patients resampled together).

    python scripts/holdout_burden.py [--study holdout --lever baseline]

Needs `dvc repro` (the lesion net, the crops' lung masks) and the study's run folders. Writes
``reports/levers/<study>_burden.{json,md}`` and the per-slice burden, ``..._burden.csv``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from covidct.atomic import write_text_atomic
from covidct.catalog import load_source
from covidct.config import load_params, section, sources_section
from covidct.gate import body_midline
from covidct.images import read_grayscale, read_mask
from covidct.lesions import lesion_burden, segment_lesions
from covidct.levers.holdout import held_out_rows
from covidct.metrics import flatten_metrics, paired_auc_difference, patient_metrics_with_ci
from covidct.paths import CROPS, LESION, crop_relpath
from covidct.reports import format_cell, format_delta, markdown_table
from covidct.runtime import configure_threads
from covidct.segmentation.model import load_segmenter
from covidct.thresholds import decision_threshold

BATCH = 16


def burden_table(root: Path, names: list[str]) -> pd.DataFrame:
    """Every slice of every named source with its lesion burden (0 where the crop stage found no lung)."""
    device = torch.device("cpu")
    model, meta = load_segmenter(root / LESION, device)
    parts = []
    for name in names:
        table = load_source(root, name)
        burdens = []
        for start in tqdm(range(0, len(table), BATCH), desc=f"lesions {name}", unit="batch"):
            rows = table.iloc[start : start + BATCH]
            images = [read_grayscale(p) for p in rows["path"]]
            lesions = segment_lesions(images, model, meta, device)
            for image, lesion, relpath in zip(images, lesions, rows["relpath"], strict=True):
                lung = read_mask(root / CROPS / "masks" / crop_relpath(relpath, name))
                burdens.append(lesion_burden(lesion, lung, body_midline(image)).fraction or 0.0)
        parts.append(table.drop(columns=["path"]).assign(score=burdens))
    return pd.concat(parts, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="holdout")
    parser.add_argument("--lever", default="baseline")
    args = parser.parse_args()
    root = Path.cwd()
    configure_threads()
    params = load_params(root / "params.yaml")
    evaluate, names = section(params, "evaluate"), list(sources_section(params))
    burdens = burden_table(root, names)
    out = root / "reports" / "levers"
    write_text_atomic(out / f"{args.study}_burden.csv", burdens.to_csv(index=False))
    folds = {}
    for fold in names:
        others = burdens[(burdens["source"] != fold) & (burdens["split"] == "val")]
        threshold = decision_threshold(others, evaluate)
        held = burdens[burdens["source"] == fold].sort_values("relpath").reset_index(drop=True)
        figures = flatten_metrics(
            patient_metrics_with_ci(
                held["label"], held["score"], held["patient"], threshold, evaluate.n_bootstrap, evaluate.seed
            )
        )
        record = {"threshold": threshold, "slices": len(held)} | {
            k: v for k, v in figures.items() if k.split("_ci")[0] in ("auc", "recall", "specificity")
        }
        runs = sorted((root / "levers" / args.study).glob(f"{args.lever}_without_{fold}_seed*/predictions.csv"))
        if runs:
            scores = [held_out_rows(pd.read_csv(p), fold) for p in runs]
            if any(s["relpath"].tolist() != held["relpath"].tolist() for s in scores):
                raise SystemExit(f"{fold}: the study's held-out rows are not this source's slices")
            diff = paired_auc_difference(
                held["label"],
                np.stack([s["score"].to_numpy() for s in scores]),
                held["score"].to_numpy(),
                evaluate.n_bootstrap,
                evaluate.seed,
                groups=held["patient"].astype(str).to_numpy(),
            )
            record |= {"classifier_seeds": len(runs)} | {f"delta_{k}": v for k, v in diff.items()}
        folds[fold] = record
    write_text_atomic(
        out / f"{args.study}_burden.json",
        json.dumps({"study": args.study, "lever": args.lever, "folds": folds}, indent=2) + "\n",
    )
    titles = {name: source.title for name, source in sources_section(params).items()}

    def cell(f: dict, key: str) -> str:
        return format_cell({"value": f[key], "ci_low": f[f"{key}_ci_low"], "ci_high": f[f"{key}_ci_high"]})

    lines = [
        f"# Lesion burden as the score, on the leave-one-source-out folds ({args.study})",
        "",
        "The lesion segmenter trained on the lung set alone, so its burden (lesion over lung) is held out for every "
        "source. Each source's every slice; the threshold from the other two sources' validation splits, pooled; "
        f"intervals over patients (SARS-CoV-2 CT: scans). Δ: burden minus the {args.lever} classifier of the same fold, "
        "paired over its seeds; **real** when the interval excludes 0.",
        "",
        markdown_table(
            ["held out", "slices", "AUC", "sensitivity", "specificity", "Δ AUC vs the classifier"],
            [
                [titles[fold], str(f["slices"]), cell(f, "auc"), cell(f, "recall"), cell(f, "specificity")]
                + [
                    format_delta({k: f[f"delta_{k}"] for k in ("value", "ci_low", "ci_high")})
                    if "delta_value" in f
                    else "–"
                ]
                for fold, f in folds.items()
            ],
        ),
        "",
        f"Reproduce: `python scripts/holdout_burden.py --study {args.study} --lever {args.lever}`.",
        "",
    ]
    write_text_atomic(out / f"{args.study}_burden.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
