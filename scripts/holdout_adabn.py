"""Test-time BatchNorm adaptation on the leave-one-source-out folds (issue 26, a candidate that
needs no training): each finished baseline fold model of the holdout study, as it was trained,
scores every slice of the source it never saw twice: as trained, and after its BatchNorm
statistics are re-estimated on those slices (unlabelled; AdaBN, Li et al. 2016). The weights are
the same, so the difference per fold is paired by construction: same model, same slices, the
patients resampled together.

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
from sklearn.metrics import roc_auc_score
from torch.optim.swa_utils import update_bn
from tqdm.auto import tqdm

from covidct.atomic import write_text_atomic
from covidct.classification.data import to_model_input
from covidct.classification.model import load_classifier
from covidct.classification.table import load_classifier_inputs
from covidct.classification.train import predict_scores
from covidct.config import ClassifierConfig, EvaluateConfig, load_params
from covidct.experiments.overrides import with_overrides
from covidct.levers.holdout import held_out_rows
from covidct.metrics import paired_auc_difference
from covidct.reports import format_delta, markdown_table
from covidct.runtime import configure_threads

BATCH = 32


def adapt_batchnorm(model: torch.nn.Module, images: np.ndarray, mean, std, device: torch.device) -> torch.nn.Module:
    """BatchNorm running statistics re-estimated on ``images`` in one pass (torch's ``update_bn``:
    statistics reset, then a cumulative average over the batches); nothing else changes."""
    batches = (
        to_model_input(torch.from_numpy(images[start : start + BATCH])[:, None], mean, std, device)
        for start in range(0, len(images), BATCH)
    )
    update_bn(batches, model)
    return model.eval()


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
        fold, seed = record["holdout"]["fold"], record["seed"]
        held = held_out_rows(pd.read_csv(run / "predictions.csv"), fold)
        config = ClassifierConfig.of(with_overrides(params, record["overrides"]))
        images = load_classifier_inputs(root, held, "cropped", config, progress=None)
        model, meta = load_classifier(run / "model.safetensors", device)
        as_trained = predict_scores(model, images, device, meta["mean"], meta["std"], BATCH, dtype=None)
        if not np.allclose(as_trained, held["score"].to_numpy(), atol=1e-4):
            raise SystemExit(f"{run.name}: scores differ from the study's (crops or code changed since it ran)")
        adapted = predict_scores(
            adapt_batchnorm(model, images, meta["mean"], meta["std"], device),
            images,
            device,
            meta["mean"],
            meta["std"],
            BATCH,
            dtype=None,
        )
        labels = held["label"].to_numpy()
        rows.append(
            {
                "fold": fold,
                "seed": seed,
                "auc": roc_auc_score(labels, as_trained),
                "auc_adapted": roc_auc_score(labels, adapted),
            }
        )
        part = stacked.setdefault(fold, {"labels": [], "trained": [], "adapted": [], "groups": []})
        part["labels"].append(labels)
        part["trained"].append(as_trained)
        part["adapted"].append(adapted)
        part["groups"].append(held["patient"].astype(str).to_numpy())
    table = pd.DataFrame(rows).sort_values(["fold", "seed"])
    folds = {}
    for fold, part in stacked.items():
        # the held-out rows are the same slices in the same order for every seed
        diff = paired_auc_difference(
            part["labels"][0],
            np.stack(part["trained"]),
            np.stack(part["adapted"]),
            evaluate.n_bootstrap,
            evaluate.seed,
            groups=part["groups"][0],
        )
        runs_of = table[table["fold"] == fold]
        folds[fold] = {
            "seeds": len(runs_of),
            "auc_mean": float(runs_of["auc"].mean()),
            "auc_adapted_mean": float(runs_of["auc_adapted"].mean()),
            "auc_adapted_sd": float(runs_of["auc_adapted"].std(ddof=1)) if len(runs_of) > 1 else 0.0,
        } | {f"delta_{k}": float(v) for k, v in diff.items()}
    out = root / "reports" / "levers"
    record = {"study": args.study, "lever": args.lever, "folds": folds, "runs": rows}
    write_text_atomic(out / f"{args.study}_adabn.json", json.dumps(record, indent=2) + "\n")
    lines = [
        f"# Test-time BatchNorm adaptation on the leave-one-source-out folds ({args.study}, {args.lever})",
        "",
        "Each fold model as it was trained, scoring every slice of the source it never saw, against the same model "
        "with its BatchNorm statistics re-estimated on those slices (unlabelled). Δ: adapted minus as trained, paired "
        "(same weights, same slices; patients resampled together, every seed at once); **real** when the interval excludes 0.",
        "",
        markdown_table(
            ["held out", "seeds", "AUC as trained", "AUC adapted", "Δ AUC (95 % CI)"],
            [
                [
                    fold,
                    str(f["seeds"]),
                    f"{100 * f['auc_mean']:.1f}",
                    f"{100 * f['auc_adapted_mean']:.1f} ± {100 * f['auc_adapted_sd']:.1f}",
                    format_delta({k: f[f"delta_{k}"] for k in ("value", "ci_low", "ci_high")}),
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
