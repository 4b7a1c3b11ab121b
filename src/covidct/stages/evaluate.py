"""Stage evaluate: test-split metrics with bootstrap CIs for both variants, ROC curves (Fig. 9),
confusion matrices and the results page with the paper's Tables 1 and 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from covidct.atomic import write_text_atomic
from covidct.config import EvaluateConfig
from covidct.datasets import COVID_CT
from covidct.metrics import confusion, flatten_metrics, metrics_with_ci, paired_auc_difference, roc_points
from covidct.paths import CROP_REPORTS, REPORTS, SEGMENTER_REPORTS, VARIANTS
from covidct.paths import classifier_dir as model_dir
from covidct.plots import plot_confusion_matrices, plot_roc_curves
from covidct.reports import results_report
from covidct.thresholds import decision_threshold
from covidct.tracking import log_pipeline_metrics, stage_run


def threshold_rule(config: EvaluateConfig) -> str:
    if config.val_recall_floor > 0:
        return (
            f"the highest threshold with a validation recall of at least {config.val_recall_floor:g} "
            "(chosen on the validation split of the sources the classifier trained on, pooled, per variant)"
        )
    return f"the fixed threshold {config.threshold:g}"


def read_predictions(root: Path, variant: str) -> pd.DataFrame:
    """A classifier's val and test scores, every source's, with whether it trained on the source."""
    predictions = pd.read_csv(root / model_dir(variant) / "predictions.csv")
    return predictions.assign(trained=predictions["trained"].astype(bool))


def paper_split(predictions: pd.DataFrame, split: str) -> pd.DataFrame:
    """The paper's tables are COVID-CT's official split, whatever else the classifier saw."""
    return predictions[(predictions["source"] == COVID_CT) & (predictions["split"] == split)]


def segmentation_gain(root: Path, config: EvaluateConfig) -> dict[str, float]:
    """Test AUC with minus without segmentation, paired on the same test images, with its CI."""
    test = {v: paper_split(read_predictions(root, v), "test").sort_values("relpath") for v in VARIANTS}
    if list(test["cropped"]["relpath"]) != list(test["raw"]["relpath"]):
        raise ValueError(
            "the cropped and raw classifiers scored different test images; re-run both train_classifier stages"
        )
    gain = paired_auc_difference(
        test["raw"]["label"].to_numpy(),
        test["raw"]["score"].to_numpy(),
        test["cropped"]["score"].to_numpy(),
        config.n_bootstrap,
        config.seed,
    )
    return {"test_auc" if k == "value" else f"test_auc_{k}": v for k, v in gain.items()}


def score_variant(root: Path, variant: str, config: EvaluateConfig) -> dict[str, Any]:
    """One classifier's threshold (chosen on validation) and its figures: val pooled over the
    sources it trained on, test on the paper's split; writes its ROC points."""
    predictions = read_predictions(root, variant)
    val = predictions[(predictions["split"] == "val") & predictions["trained"]]
    test = paper_split(predictions, "test")
    threshold = decision_threshold(val, config)
    per_split = {
        split: metrics_with_ci(
            part["label"].to_numpy(), part["score"].to_numpy(), threshold, config.n_bootstrap, config.seed
        )
        for split, part in (("val", val), ("test", test))
    }
    y, s = test["label"].to_numpy(), test["score"].to_numpy()
    roc = roc_points(y, s)
    write_text_atomic(root / REPORTS / "roc" / f"{variant}.csv", roc.to_csv(index=False))
    for split, m in per_split.items():
        mlflow.log_metrics(
            {f"{variant}.{split}.{k}": v for k, v in flatten_metrics(m).items()} | {f"{variant}.threshold": threshold}
        )
    return {
        "threshold": threshold,
        "per_split": per_split,
        "confusion": confusion(y, s, threshold),
        "curve": (roc["fpr"].to_numpy(), roc["tpr"].to_numpy(), per_split["test"]["auc"]["value"]),
        "n_test": {"COVID": int(y.sum()), "non-COVID": int((1 - y).sum())},
    }


def results_page(root: Path, scored: dict[str, dict[str, Any]], gain: dict[str, float], config: EvaluateConfig) -> str:
    """The paper's Tables 1 and 2 with the segmenter's and crop stage's figures beside them."""
    segmenter = json.loads((root / SEGMENTER_REPORTS / "metrics.json").read_text())
    crop = json.loads((root / CROP_REPORTS / "metrics.json").read_text())
    dice = {
        "test Dice (mean over slices)": segmenter["dice_mean"],
        "test Dice (std over slices)": segmenter["dice_std"],
        "test Dice (pooled over pixels)": segmenter["dice_pooled"],
        "test slices": segmenter["n_slices"],
        "test patients": segmenter["n_patients"],
    }
    real = gain["test_auc_ci_low"] > 0 or gain["test_auc_ci_high"] < 0
    extra = (
        f"\n## Crop stage\n\n{crop['n_images']} COVID-CT images segmented; the whole image was kept for "
        f"{crop['n_fallback_empty_mask']} with an empty lung mask and {crop['n_fallback_small_mask']} with an implausibly small one.\n"
        "\n## Is the segmentation gain real?\n\n"
        f"Test AUC with minus without segmentation: {100 * gain['test_auc']:+.1f} points, 95 % interval "
        f"{100 * gain['test_auc_ci_low']:+.1f} to {100 * gain['test_auc_ci_high']:+.1f} (paired bootstrap: both variants scored on the "
        f"same resampled test images); {'the interval excludes 0' if real else 'the interval includes 0: this test set cannot tell the two apart'}.\n"
        "\nReproduce: `dvc repro` with this commit's `params.yaml`; `dvc metrics show` prints these figures.\n"
    )
    return results_report(
        {v: f["per_split"]["test"] for v, f in scored.items()},
        confusions={v: f["confusion"] for v, f in scored.items()},
        dice_summary=dice,
        n_test=scored[VARIANTS[-1]]["n_test"],
        thresholds={v: f["threshold"] for v, f in scored.items()},
        threshold_rule=threshold_rule(config),
        n_boot=config.n_bootstrap,
        extra_md=extra,
    )


def run(params: dict[str, Any], root: Path) -> None:
    config = EvaluateConfig.of(params)
    with stage_run("evaluate", {"evaluate": config.model_dump()}):
        scored = {variant: score_variant(root, variant, config) for variant in VARIANTS}
        metrics: dict[str, Any] = {
            v: {split: flatten_metrics(m) for split, m in f["per_split"].items()}
            | {"threshold": f["threshold"], "test_confusion": f["confusion"]}
            for v, f in scored.items()
        }
        log_pipeline_metrics(
            {
                f"{v}.{split}.{k}": metrics[v][split][k]
                for v in VARIANTS
                for split in ("val", "test")
                for k in ("auc", "recall", "specificity")
            }
        )
        metrics["segmentation_gain"] = gain = segmentation_gain(root, config)
        mlflow.log_metrics({f"segmentation_gain.{k}": v for k, v in gain.items()})
        write_text_atomic(root / REPORTS / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        plot_roc_curves({v: f["curve"] for v, f in scored.items()}, root / REPORTS / "figures" / "roc.png")
        plot_confusion_matrices(
            {v: f["confusion"] for v, f in scored.items()}, root / REPORTS / "figures" / "confusion.png"
        )
        report = results_page(root, scored, gain, config)
        write_text_atomic(root / REPORTS / "results.md", report)
        for path in ("metrics.json", "results.md", "figures/roc.png", "figures/confusion.png"):
            mlflow.log_artifact(str(root / REPORTS / path))
    print(report)
