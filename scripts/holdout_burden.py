"""Lesion evidence on the leave-one-source-out folds (issues 26 and 27): the lesion burden alone
(lesion over lung, :mod:`covidct.lesions`) as a COVID score, beside the holdout study's baseline
classifier on the same held-out slices.

The lesion segmenter trained on the lung set only (another collection: no slice of COVID-CT,
CC-CCII or SARS-CoV-2 CT), so its burden is held out for every fold by construction. Per fold,
the burden's threshold is chosen as a fold's classifier threshold is: on the validation rows of
the two other sources, pooled (``evaluate.val_recall_floor``); the held-out source's slices are
the fold's own (the study's ``predictions.csv``: every slice, CC-CCII's thinned per scan); intervals resample its patients (SARS-CoV-2 CT: scans). Δ: burden minus the
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
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from covidct.atomic import write_text_atomic
from covidct.config import EvaluateConfig, declared_sources, load_params
from covidct.gate import body_midline
from covidct.images import read_grayscale, read_mask
from covidct.lesions import lesion_burden, segment_lesions
from covidct.levers.holdout import held_out_rows
from covidct.metrics import flatten_metrics, paired_auc_difference, patient_metrics_with_ci
from covidct.paths import CROPS, LESION, crop_relpath, raw
from covidct.reports import format_cell, format_delta, markdown_table
from covidct.runtime import configure_threads
from covidct.segmentation.model import load_segmenter
from covidct.thresholds import decision_threshold

BATCH = 16


def add_burden(root: Path, rows: pd.DataFrame, known: dict[tuple[str, str], float]) -> pd.DataFrame:
    """``rows`` (source, relpath) with ``burden``: each slice's lesion burden, 0 where the crop stage
    found no lung; ``known`` caches slices already measured (a source's validation rows serve two folds)."""
    device = torch.device("cpu")
    model, meta = load_segmenter(root / LESION, device)
    todo = [(s, r) for s, r in zip(rows["source"], rows["relpath"], strict=True) if (s, r) not in known]
    for start in tqdm(range(0, len(todo), BATCH), desc="lesion burden", unit="batch", disable=not todo):
        batch = todo[start : start + BATCH]
        images = [read_grayscale(root / raw(source) / relpath) for source, relpath in batch]
        lesions = segment_lesions(images, model, meta, device)
        for (source, relpath), image, lesion in zip(batch, images, lesions, strict=True):
            lung = read_mask(root / CROPS / "masks" / crop_relpath(relpath, source))
            known[(source, relpath)] = lesion_burden(lesion, lung, body_midline(image)).fraction or 0.0
    return rows.assign(burden=[known[(s, r)] for s, r in zip(rows["source"], rows["relpath"], strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="holdout")
    parser.add_argument("--lever", default="baseline")
    args = parser.parse_args()
    root = Path.cwd()
    configure_threads()
    params = load_params(root / "params.yaml")
    evaluate, names = EvaluateConfig.of(params), list(declared_sources(params))
    out = root / "reports" / "levers"
    folds, known, measured = {}, {}, []
    for fold in names:
        runs = sorted((root / "levers" / args.study).glob(f"{args.lever}_without_{fold}_seed*/predictions.csv"))
        if not runs:
            continue
        first = pd.read_csv(runs[0])  # the fold's rows: its held-out slices, and the trained sources' validation ones
        held = add_burden(root, held_out_rows(first, fold), known)
        val = first[(first["split"] == "val") & first["trained"].astype(bool)]
        threshold = decision_threshold(add_burden(root, val, known).assign(score=lambda t: t["burden"]), evaluate)
        measured.append(held)
        figures = flatten_metrics(
            patient_metrics_with_ci(
                held["label"],
                held["burden"],
                held["patient"].astype(str),
                threshold,
                evaluate.n_bootstrap,
                evaluate.seed,
            )
        )
        record = {"threshold": threshold, "slices": len(held)} | {
            k: v for k, v in figures.items() if k.split("_ci")[0] in ("auc", "recall", "specificity")
        }
        scores = [held_out_rows(pd.read_csv(p), fold) for p in runs]
        if any(s["relpath"].tolist() != held["relpath"].tolist() for s in scores):
            raise SystemExit(f"{fold}: the study's runs hold different held-out slices")
        diff = paired_auc_difference(
            held["label"],
            np.stack([s["score"].to_numpy() for s in scores]),
            held["burden"].to_numpy(),
            evaluate.n_bootstrap,
            evaluate.seed,
            groups=held["patient"].astype(str).to_numpy(),
        )
        # beside the classifier, not instead: each seed's score and the burden, ranked within the held-out
        # slices (scores only, no label) and averaged with equal weight
        classifier = np.stack([s["score"].to_numpy() for s in scores])
        combined = np.stack([rankdata(c) + rankdata(held["burden"]) for c in classifier])
        both = paired_auc_difference(
            held["label"],
            classifier,
            combined,
            evaluate.n_bootstrap,
            evaluate.seed,
            groups=held["patient"].astype(str).to_numpy(),
        )
        folds[fold] = (
            record
            | {"classifier_seeds": len(runs)}
            | {f"delta_{k}": v for k, v in diff.items()}
            | {"combined_auc_mean": float(np.mean([roc_auc_score(held["label"], c) for c in combined]))}
            | {f"combined_delta_{k}": v for k, v in both.items()}
        )
    write_text_atomic(out / f"{args.study}_burden.csv", pd.concat(measured, ignore_index=True).to_csv(index=False))
    write_text_atomic(
        out / f"{args.study}_burden.json",
        json.dumps({"study": args.study, "lever": args.lever, "folds": folds}, indent=2) + "\n",
    )
    titles = {name: source.title for name, source in declared_sources(params).items()}

    def cell(f: dict, key: str) -> str:
        return format_cell({"value": f[key], "ci_low": f[f"{key}_ci_low"], "ci_high": f[f"{key}_ci_high"]})

    lines = [
        f"# Lesion burden as the score, on the leave-one-source-out folds ({args.study})",
        "",
        "The lesion segmenter trained on the lung set alone, so its burden (lesion over lung) is held out for every "
        "source. The fold's held-out slices as the study scored them (every slice; CC-CCII's thinned per scan); the threshold "
        "from the other two sources' validation rows, pooled; "
        f"intervals over patients (SARS-CoV-2 CT: scans). Δ: burden minus the {args.lever} classifier of the same fold, "
        "paired over its seeds; **real** when the interval excludes 0. Classifier + burden: each seed's score and the "
        "burden ranked within the held-out slices (no label used) and averaged with equal weight.",
        "",
        markdown_table(
            [
                "held out",
                "slices",
                "AUC",
                "sensitivity",
                "specificity",
                "Δ AUC vs the classifier",
                "classifier + burden: AUC",
                "its Δ vs the classifier",
            ],
            [
                [titles[fold], str(f["slices"]), cell(f, "auc"), cell(f, "recall"), cell(f, "specificity")]
                + [
                    format_delta({k: f[f"delta_{k}"] for k in ("value", "ci_low", "ci_high")}),
                    f"{100 * f['combined_auc_mean']:.1f}",
                    format_delta({k: f[f"combined_delta_{k}"] for k in ("value", "ci_low", "ci_high")}),
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
