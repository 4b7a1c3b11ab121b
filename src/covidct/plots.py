"""Figures for the results page: ROC curves (paper's Fig. 9), confusion matrices, training curves.

Figures are built with ``matplotlib.figure.Figure`` directly rather than ``pyplot``: no GUI
backend is chosen, nothing is registered in pyplot's global figure list (so nothing leaks in
long pipelines), and it works headless. Each PNG is written atomically via ``atomic_path``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from covidct.atomic import atomic_path
from covidct.reports import variant_label

# Paper's Fig. 9: without segmentation red dotted, with segmentation blue solid.
_ROC_STYLES: Mapping[str, Mapping[str, str]] = {
    "raw": {"color": "red", "linestyle": ":"},
    "cropped": {"color": "blue", "linestyle": "-"},
}
_CLASS_NAMES: tuple[str, str] = ("non-COVID", "COVID")


def _save(fig: Figure, path: str | os.PathLike[str], dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")


def plot_roc_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float], float]],
    path: str | os.PathLike[str],
    dpi: int = 150,
) -> None:
    """All variants' ROC curves on one axis with the chance diagonal; ``curves`` maps variant -> (fpr, tpr, auc)."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, linewidth=2, label=f"{variant_label(name)} (AUC = {auc:.3f})", **_ROC_STYLES.get(name, {}))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="Chance")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        xlabel="False positive rate (1 − specificity)",
        ylabel="True positive rate (sensitivity)",
        title="ROC curves, test set",
    )
    ax.set_aspect("equal")
    ax.legend(loc="lower right")
    _save(fig, path, dpi)


def _draw_confusion(ax: Axes, counts: Mapping[str, int], title: str) -> None:
    matrix = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]])
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
    for (i, j), n in np.ndenumerate(matrix):
        dark = n > matrix.max() / 2
        ax.text(j, i, str(n), ha="center", va="center", fontsize=14, color="white" if dark else "black")
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=_CLASS_NAMES,
        yticklabels=_CLASS_NAMES,
        xlabel="Predicted",
        ylabel="True",
        title=title,
    )


def plot_confusion_matrices(
    confusions: Mapping[str, Mapping[str, int]],
    path: str | os.PathLike[str],
    dpi: int = 150,
) -> None:
    """Confusion matrices side by side, one per variant, from ``metrics.confusion`` counts."""
    if not confusions:
        raise ValueError("no confusion matrices to plot")
    fig = Figure(figsize=(4 * len(confusions), 4))
    axes = fig.subplots(1, len(confusions), squeeze=False)[0]
    for ax, (name, counts) in zip(axes, confusions.items(), strict=True):
        _draw_confusion(ax, counts, variant_label(name))
    fig.tight_layout()
    _save(fig, path, dpi)


def plot_training_curves(history: pd.DataFrame, path: str | os.PathLike[str], title: str, dpi: int = 150) -> None:
    """Per-epoch curves: columns with "loss" in the name on the left axis, other numeric columns (scores) on the right.

    Losses and scores live on different scales, so sharing one axis would flatten one group.
    """
    if "epoch" not in history.columns:
        raise ValueError("history needs an 'epoch' column")
    numeric = [c for c in history.select_dtypes("number").columns if c != "epoch"]
    groups = [
        ("Loss", [c for c in numeric if "loss" in c.lower()]),
        ("Score", [c for c in numeric if "loss" not in c.lower()]),
    ]
    groups = [(label, cols) for label, cols in groups if cols]
    if not groups:
        raise ValueError("history has no numeric columns besides 'epoch'")
    fig = Figure(figsize=(5 * len(groups), 4))
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (label, cols) in zip(axes, groups, strict=True):
        for col in cols:
            ax.plot(history["epoch"], history[col], marker="o", markersize=3, label=col)
        ax.set(xlabel="Epoch", ylabel=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path, dpi)


def plot_lever_forest(table: pd.DataFrame, path: str | os.PathLike[str], title: str, dpi: int = 150) -> None:
    """Validation and test AUC with 95 % CIs, one line per lever: overlapping bars are noise."""
    fig = Figure(figsize=(8, 0.45 * len(table) + 1.6))
    ax = fig.add_subplot()
    y = np.arange(len(table))[::-1]
    for offset, split, color in ((0.15, "val", "grey"), (-0.15, "test", "blue")):
        value = table[f"{split}_auc"].to_numpy()
        err = np.vstack(
            [value - table[f"{split}_auc_ci_low"].to_numpy(), table[f"{split}_auc_ci_high"].to_numpy() - value]
        )
        ax.errorbar(value, y + offset, xerr=err, fmt="o", color=color, capsize=3, label=f"{split} AUC")
    if "baseline" in set(table["lever"]):
        ax.axvline(
            float(table.loc[table["lever"] == "baseline", "test_auc"].iloc[0]), color="blue", linestyle=":", linewidth=1
        )
    ax.set_yticks(y, table["lever"])
    ax.set(xlabel="AUC (95 % bootstrap CI)", title=title)
    ax.legend(loc="lower right")
    _save(fig, path, dpi)


def plot_holdout(
    runs: pd.DataFrame, titles: list[str], folds: list[str], path: str | os.PathLike[str], dpi: int = 150
) -> None:
    """Held-out AUC per fold: one dot per seed, a bar at the seeds' mean, one colour per lever."""
    levers = list(dict.fromkeys(runs["lever"]))
    fig = Figure(figsize=(2.2 * len(folds) + 2, 4))
    ax = fig.add_subplot()
    width = 0.8 / len(levers)
    for i, lever in enumerate(levers):
        for j, fold in enumerate(folds):
            part = runs[(runs["lever"] == lever) & (runs["fold"] == fold)]["auc"].to_numpy()
            if len(part) == 0:
                continue
            x = j - 0.4 + width * (i + 0.5)
            ax.bar(x, part.mean(), width * 0.9, color=f"C{i}", alpha=0.35, label=lever if j == 0 else None)
            ax.plot(np.full(len(part), x), part, "o", color=f"C{i}", markersize=4)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(folds)), [f"{t}\nheld out" for t in titles])
    ax.set(ylabel="AUC on the held-out source", ylim=(0.0, 1.0), title="Leave-one-source-out (dots: seeds)")
    ax.legend(loc="lower right")
    _save(fig, path, dpi)
