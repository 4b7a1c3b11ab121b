"""Test-time BatchNorm adaptation on the leave-one-source-out folds (issue 26, a candidate that
needs no training): each finished baseline fold model of the holdout study, as it was trained,
scores every slice of the source it never saw three times: as trained, after its BatchNorm
statistics are re-estimated on all those slices (unlabelled; AdaBN, Li et al. 2016, what
``covidct predict --adapt-batchnorm`` does with a folder of a site's scans), and after they are
re-estimated on 64 of them drawn at random (a smaller folder). The weights are the same, so each
difference per fold is paired by construction: same model, same slices, the patients resampled
together. Sensitivity and specificity are at the fold's own threshold (from the training
sources' validation splits): adaptation moves the scores, so it can move the threshold's meaning.

    python scripts/holdout_adabn.py [--study holdout --lever baseline]

Needs the study's run folders (``levers/<study>/``, with their ``model.safetensors``) and the crops
of ``dvc repro``. Writes ``reports/levers/<study>_adabn.{json,md}``. The first scoring must repeat
the study's own scores (checked), or the comparison is not with the study's model.
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
from covidct.classification.adaptation import adapt_batchnorm
from covidct.classification.model import load_classifier
from covidct.classification.table import load_classifier_inputs
from covidct.classification.train import predict_scores
from covidct.config import ClassifierConfig, EvaluateConfig, load_params
from covidct.experiments.overrides import with_overrides
from covidct.levers.holdout import held_out_rows
from covidct.metrics import binary_metrics, paired_auc_difference
from covidct.reports import format_delta, markdown_table
from covidct.runtime import configure_threads

BATCH = 32
SITE_BATCH = 64  # a site's batch of scans, drawn from the held-out source: is a folder of them enough?


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="holdout")
    parser.add_argument("--lever", default="baseline")
    args = parser.parse_args()
    root, device = Path.cwd(), torch.device("cpu")
    configure_threads()
    params = load_params(root / "params.yaml")
    evaluate = EvaluateConfig.of(params)
    runs = sorted(
        p
        for p in (root / "levers" / args.study).glob(f"{args.lever}_without_*_seed*")
        if (p / "model.safetensors").is_file()
    )
    if not runs:
        raise SystemExit(f"no finished {args.lever} runs with weights under levers/{args.study}/")
    rows, stacked = [], {}
    for run in tqdm(runs, desc="fold models", unit="model"):
        record = json.loads((run / "metrics.json").read_text())
        fold, seed, threshold = record["holdout"]["fold"], record["seed"], record["holdout"]["threshold"]
        held = held_out_rows(pd.read_csv(run / "predictions.csv"), fold)
        config = ClassifierConfig.of(with_overrides(params, record["overrides"]))
        images = load_classifier_inputs(root, held, "cropped", config, progress=None)
        model, meta = load_classifier(run / "model.safetensors", device)
        scores = {"trained": predict_scores(model, images, device, meta["mean"], meta["std"], BATCH, dtype=None)}
        if not np.allclose(scores["trained"], held["score"].to_numpy(), atol=1e-4):
            raise SystemExit(f"{run.name}: scores differ from the study's (crops or code changed since it ran)")
        site = np.random.default_rng(seed).choice(len(images), size=min(SITE_BATCH, len(images)), replace=False)
        for name, adapt_on in (("adapted", images), (f"adapted_{SITE_BATCH}", images[np.sort(site)])):
            model, _ = load_classifier(run / "model.safetensors", device)  # the weights as trained, every time
            adapt_batchnorm(model, adapt_on, meta["mean"], meta["std"], device, BATCH)
            scores[name] = predict_scores(model, images, device, meta["mean"], meta["std"], BATCH, dtype=None)
        labels = held["label"].to_numpy()
        row = {"fold": fold, "seed": seed}
        for name, score in scores.items():
            suffix = "" if name == "trained" else f"_{name}"
            # at the fold's threshold, from the training sources' validation
            figures = binary_metrics(labels, score, threshold)
            row |= {f"{key}{suffix}": figures[key] for key in ("auc", "recall", "specificity")}
        rows.append(row)
        part = stacked.setdefault(fold, {"labels": [], "groups": []} | {name: [] for name in scores})
        part["labels"].append(labels)
        part["groups"].append(held["patient"].astype(str).to_numpy())
        for name, score in scores.items():
            part[name].append(score)
    table = pd.DataFrame(rows).sort_values(["fold", "seed"])
    folds = {}
    for fold, part in stacked.items():
        runs_of = table[table["fold"] == fold]
        folds[fold] = {"seeds": len(runs_of)} | {
            f"{column}_mean": float(runs_of[column].mean())
            for column in table.columns
            if column not in ("fold", "seed")
        }
        folds[fold]["auc_adapted_sd"] = float(runs_of["auc_adapted"].std(ddof=1)) if len(runs_of) > 1 else 0.0
        for name, prefix in (("adapted", "delta"), (f"adapted_{SITE_BATCH}", f"delta_{SITE_BATCH}")):
            # the held-out rows are the same slices in the same order for every seed
            diff = paired_auc_difference(
                part["labels"][0],
                np.stack(part["trained"]),
                np.stack(part[name]),
                evaluate.n_bootstrap,
                evaluate.seed,
                groups=part["groups"][0],
            )
            folds[fold] |= {f"{prefix}_{k}": float(v) for k, v in diff.items()}
    out = root / "reports" / "levers"
    record = {"study": args.study, "lever": args.lever, "folds": folds, "runs": rows}
    write_text_atomic(out / f"{args.study}_adabn.json", json.dumps(record, indent=2) + "\n")
    lines = [
        f"# Test-time BatchNorm adaptation on the leave-one-source-out folds ({args.study}, {args.lever})",
        "",
        "Each fold model as it was trained, scoring every slice of the source it never saw, against the same model "
        f"with its BatchNorm statistics re-estimated on those slices (unlabelled), or on {SITE_BATCH} of them. Δ: adapted "
        "minus as trained, paired (same weights, same slices; patients resampled together, every seed at once); **real** "
        "when the interval excludes 0. Means over the seeds.",
        "",
        markdown_table(
            [
                "held out",
                "seeds",
                "AUC as trained",
                "AUC adapted",
                "Δ AUC (95 % CI)",
                f"AUC adapted on {SITE_BATCH}",
                f"Δ AUC, {SITE_BATCH} (95 % CI)",
            ],
            [
                [
                    fold,
                    str(f["seeds"]),
                    f"{100 * f['auc_mean']:.1f}",
                    f"{100 * f['auc_adapted_mean']:.1f} ± {100 * f['auc_adapted_sd']:.1f}",
                    format_delta({k: f[f"delta_{k}"] for k in ("value", "ci_low", "ci_high")}),
                    f"{100 * f[f'auc_adapted_{SITE_BATCH}_mean']:.1f}",
                    format_delta({k: f[f"delta_{SITE_BATCH}_{k}"] for k in ("value", "ci_low", "ci_high")}),
                ]
                for fold, f in sorted(folds.items())
            ],
        ),
        "",
        "At the fold's threshold (sensitivity / specificity, %):",
        "",
        markdown_table(
            ["held out", "as trained", "adapted", f"adapted on {SITE_BATCH}"],
            [
                [fold]
                + [
                    f"{100 * f[f'recall{s}_mean']:.1f} / {100 * f[f'specificity{s}_mean']:.1f}"
                    for s in ("", "_adapted", f"_adapted_{SITE_BATCH}")
                ]
                for fold, f in sorted(folds.items())
            ],
        ),
        "",
        f"Reproduce: `python scripts/holdout_adabn.py --study {args.study} --lever {args.lever}`.",
        "",
    ]
    write_text_atomic(out / f"{args.study}_adabn.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
