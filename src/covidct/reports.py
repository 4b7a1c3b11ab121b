"""Markdown tables and the results page comparing this run with the published numbers.

``results`` arguments map a variant name to ``metrics.metrics_with_ci`` output: ``"raw"`` is the
classifier on whole slices (without segmentation), ``"cropped"`` the classifier on lung-box
crops (with segmentation). Run values are fractions; everything is shown in percent.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from types import MappingProxyType

# Published results, in percent. These are the only hard-coded numbers: they are quoted from
# the papers for comparison, never produced by this code.
PUBLISHED: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {
        # Tran et al., Table 1, without lung segmentation.
        "tran_without_segmentation": MappingProxyType({"accuracy": 83.5, "recall": 83.7, "f1": 88.7, "auc": 90.9}),
        # Tran et al., Table 1, with lung segmentation (their proposed method).
        "tran_with_segmentation": MappingProxyType({"accuracy": 87.2, "recall": 91.9, "f1": 91.5, "auc": 92.6}),
        # Zhao et al. (COVID-CT dataset paper), as quoted in Tran et al., Table 2.
        "zhao": MappingProxyType({"accuracy": 84.7, "recall": 76.2, "f1": 85.3, "auc": 82.4}),
    }
)

VARIANT_LABELS: Mapping[str, str] = MappingProxyType({"raw": "Without segmentation", "cropped": "With segmentation"})

_TABLE1_ROWS: tuple[tuple[str, str], ...] = (
    ("accuracy", "Accuracy"),
    ("precision", "Precision"),
    ("recall", "Recall (sensitivity)"),
    ("specificity", "Specificity"),
    ("f1", "F1"),
    ("auc", "AUC"),
)
_TABLE2_ROWS: tuple[tuple[str, str], ...] = (
    ("accuracy", "Accuracy"),
    ("recall", "Recall"),
    ("f1", "F1"),
    ("auc", "AUC"),
)
_MISSING = "–"


def variant_label(variant: str) -> str:
    """Human name of a variant; unknown variants keep their key so nothing is silently hidden."""
    return VARIANT_LABELS.get(variant, variant)


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


def format_cell(stats: Mapping[str, float] | None) -> str:
    """``{"value": .872, "ci_low": .831, "ci_high": .904}`` -> ``87.2 (83.1–90.4)``."""
    if stats is None:
        return _MISSING
    return f"{_pct(stats['value'])} ({_pct(stats['ci_low'])}–{_pct(stats['ci_high'])})"


def format_delta(stats: Mapping[str, float]) -> str:
    """A paired difference: ``+3.1 (+0.4 to +5.9) **real**``, or ``(noise)`` when its interval holds 0."""
    low, high = stats["ci_low"], stats["ci_high"]
    real = " **real**" if low > 0 or high < 0 else " (noise)"
    return f"{100 * stats['value']:+.1f} ({100 * low:+.1f} to {100 * high:+.1f}){real}"


def _stat(value: float) -> str:
    return str(int(value)) if isinstance(value, numbers.Integral) else f"{value:.4f}"


def _published_cell(source: str, metric: str) -> str:
    value = PUBLISHED[source].get(metric)
    return _MISSING if value is None else f"{value:.1f}"


def _run_cell(results: Mapping[str, Mapping[str, Mapping[str, float]]], variant: str, metric: str) -> str:
    run = results.get(variant)
    return format_cell(None if run is None else run.get(metric))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def table1_markdown(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Paper's Table 1 (effect of segmentation): published value next to this run's value and CI.

    The paper reports no precision/specificity, so those published cells are ``–``; a variant
    missing from ``results`` also shows ``–``.
    """
    header = [
        "Metric (%)",
        "Without segmentation (published)",
        "Without segmentation (this run)",
        "With segmentation (published)",
        "With segmentation (this run)",
    ]
    rows = [
        [
            label,
            _published_cell("tran_without_segmentation", key),
            _run_cell(results, "raw", key),
            _published_cell("tran_with_segmentation", key),
            _run_cell(results, "cropped", key),
        ]
        for key, label in _TABLE1_ROWS
    ]
    return markdown_table(header, rows)


def table2_markdown(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """Paper's Table 2 (comparison with Zhao et al.), with this run's two variants appended."""
    header = [
        "Metric (%)",
        "Zhao et al. (published)",
        "Tran et al. (published)",
        "This run, with segmentation",
        "This run, without segmentation",
    ]
    rows = [
        [
            label,
            _published_cell("zhao", key),
            _published_cell("tran_with_segmentation", key),
            _run_cell(results, "cropped", key),
            _run_cell(results, "raw", key),
        ]
        for key, label in _TABLE2_ROWS
    ]
    return markdown_table(header, rows)


def confusion_markdown(counts: Mapping[str, int]) -> str:
    """2x2 confusion table (rows: true class, columns: predicted class) from ``metrics.confusion``."""
    return markdown_table(
        ["True \\ Predicted", "non-COVID", "COVID"],
        [
            ["non-COVID", str(counts["tn"]), str(counts["fp"])],
            ["COVID", str(counts["fn"]), str(counts["tp"])],
        ],
    )


def _ordered_variants(variants: Mapping[str, object]) -> list[str]:
    """Known variants in paper order (without, then with segmentation), then any others."""
    known = [v for v in VARIANT_LABELS if v in variants]
    return known + [v for v in variants if v not in VARIANT_LABELS]


def results_report(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    *,
    confusions: Mapping[str, Mapping[str, int]],
    dice_summary: Mapping[str, float] | None,
    n_test: Mapping[str, int],
    thresholds: Mapping[str, float],
    threshold_rule: str,
    n_boot: int = 1000,
    extra_md: str = "",
) -> str:
    """Whole results page in markdown.

    Args:
        results: variant -> ``metrics_with_ci`` output (``"raw"``, ``"cropped"``).
        confusions: variant -> ``metrics.confusion`` counts at its threshold.
        dice_summary: segmentation test statistics, name -> value (e.g. ``{"mean_dice": 0.93,
            "n_images": 120}``); floats are shown with 4 decimals, ints as counts. ``None``
            omits the section (e.g. when the segmenter was not evaluated).
        n_test: class name -> number of test images (e.g. ``{"COVID": 98, "non-COVID": 105}``).
        thresholds: variant -> decision threshold of its threshold-dependent metrics.
        threshold_rule: how the thresholds were chosen, in words.
        n_boot: number of bootstrap resamples behind the CIs.
        extra_md: markdown appended verbatim at the end (run ids, profile notes).

    Figures are linked relative to the page as ``figures/roc.png`` and ``figures/confusion.png``.
    """
    total = sum(n_test.values())
    counts = ", ".join(f"{name} {n}" for name, n in n_test.items())
    parts = [
        "# Results: two-stage COVID-19 diagnosis from chest CT",
        (
            f"Test set: {total} images ({counts}). COVID is the positive class. An image is "
            f"predicted COVID when the classifier's COVID probability is at least {threshold_rule} "
            f"({', '.join(f'{variant_label(v).lower()}: {thresholds[v]:.4f}' for v in _ordered_variants(thresholds))}); accuracy, "
            "precision, recall (sensitivity), specificity and F1 are computed at that threshold, "
            "and AUC is the area under the ROC curve of the probabilities. Values are percentages; "
            f"brackets give the 95% bootstrap percentile interval over {n_boot} resamples of the "
            "test images, drawn with replacement within each class so that every resample keeps "
            "the class sizes of the test set. Published numbers are quoted from the papers and "
            "have no interval."
        ),
        "## Table 1: effect of lung segmentation (Tran et al., Table 1)",
        table1_markdown(results),
        "## Table 2: comparison with Zhao et al. (Tran et al., Table 2)",
        table2_markdown(results),
        "## ROC curves",
        "![ROC curves](figures/roc.png)",
        "## Confusion matrices",
    ]
    for variant in _ordered_variants(confusions):
        parts += [
            f"### {variant_label(variant)} (threshold {thresholds[variant]:.4f})",
            confusion_markdown(confusions[variant]),
        ]
    parts.append("![Confusion matrices](figures/confusion.png)")
    if dice_summary is not None:
        parts += [
            "## Lung segmentation (test set)",
            markdown_table(["Statistic", "Value"], [[name, _stat(value)] for name, value in dice_summary.items()]),
        ]
    if extra_md:
        parts.append(extra_md.strip())
    return "\n\n".join(parts) + "\n"
