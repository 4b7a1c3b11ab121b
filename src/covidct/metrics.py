"""Segmentation and classification metrics, with stratified bootstrap confidence intervals.

COVID is the positive class (label 1) everywhere; an image is predicted COVID when its
score is ``>= threshold``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

METRIC_NAMES: tuple[str, ...] = ("accuracy", "precision", "recall", "specificity", "f1", "auc")


def dice_score(pred: np.ndarray, target: np.ndarray, eps: float = 1e-6) -> float:
    """Dice = 2|P∩G| / (|P|+|G|) of two binary masks.

    Two empty masks agree perfectly, so they score 1.0 rather than 0/0; ``eps`` only guards
    the division and does not bias non-empty cases noticeably.
    """
    p = np.asarray(pred).astype(bool)
    g = np.asarray(target).astype(bool)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {g.shape}")
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return 1.0
    return float((2.0 * np.logical_and(p, g).sum() + eps) / (total + eps))


def _as_arrays(y_true: ArrayLike, y_score: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true).astype(int).ravel()
    s = np.asarray(y_score, dtype=float).ravel()
    if t.shape != s.shape:
        raise ValueError(f"y_true and y_score differ in length: {t.size} vs {s.size}")
    if not np.isin(t, (0, 1)).all():
        raise ValueError("y_true must contain only 0 (non-COVID) and 1 (COVID)")
    return t, s


def confusion(y_true: ArrayLike, y_score: ArrayLike, threshold: float = 0.5) -> dict[str, int]:
    """Confusion counts as plain ints, so they serialise to JSON/YAML without numpy types."""
    t, s = _as_arrays(y_true, y_score)
    tn, fp, fn, tp = confusion_matrix(t, (s >= threshold).astype(int), labels=[0, 1]).ravel()
    return {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}


def binary_metrics(y_true: ArrayLike, y_score: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall, specificity, F1 and ROC AUC.

    Undefined ratios (e.g. precision with no positive prediction) are 0.0, not NaN, so
    tiny debug runs still produce numbers; AUC alone is NaN when only one class is present,
    because no ranking can be scored then.
    """
    t, s = _as_arrays(y_true, y_score)
    pred = (s >= threshold).astype(int)
    auc = float(roc_auc_score(t, s)) if np.unique(t).size == 2 else float("nan")
    return {
        "accuracy": float(accuracy_score(t, pred)),
        "precision": float(precision_score(t, pred, labels=[0, 1], pos_label=1, zero_division=0)),
        "recall": float(recall_score(t, pred, labels=[0, 1], pos_label=1, zero_division=0)),
        "specificity": float(recall_score(t, pred, labels=[0, 1], pos_label=0, zero_division=0)),
        "f1": float(f1_score(t, pred, labels=[0, 1], pos_label=1, zero_division=0)),
        "auc": auc,
    }


def threshold_for_recall(y_true: ArrayLike, y_score: ArrayLike, min_recall: float) -> float:
    """The highest threshold whose recall on these (validation) scores is at least ``min_recall``.

    Highest, because every lower threshold only adds false positives; missing a COVID case is
    the costly error, so recall is the constraint and specificity what is left to maximise.
    """
    t, s = _as_arrays(y_true, y_score)
    positives = np.sort(s[t == 1])[::-1]
    if positives.size == 0:
        raise ValueError("no positive (COVID) case to choose a recall threshold on")
    needed = int(np.ceil(min_recall * positives.size - 1e-9))
    return float(positives[max(needed, 1) - 1])


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num/den with 0.0 where den == 0 (same convention as ``zero_division=0``)."""
    num = num.astype(float)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _resample_metrics(
    y_true: np.ndarray, y_score: np.ndarray, threshold: float, idx: np.ndarray
) -> dict[str, np.ndarray]:
    """Metrics of every resample ``y[idx[b]]`` at once, without a Python loop over resamples.

    Each resample is reduced to counts per (class, distinct score) bin; confusion counts and
    the Mann-Whitney AUC (ties count one half, as in ``roc_auc_score``) follow from those
    counts. Memory is O(n_boot x n_distinct_scores), never O(n_pos x n_neg).
    """
    uniq, inverse = np.unique(y_score, return_inverse=True)
    n_bins = uniq.size
    n_boot = idx.shape[0]
    bins = inverse[idx] + y_true[idx] * n_bins + np.arange(n_boot)[:, None] * (2 * n_bins)
    counts = np.bincount(bins.ravel(), minlength=n_boot * 2 * n_bins).reshape(n_boot, 2, n_bins)
    neg, pos = counts[:, 0, :], counts[:, 1, :]

    above = uniq >= threshold
    tp, fn = pos[:, above].sum(axis=1), pos[:, ~above].sum(axis=1)
    fp, tn = neg[:, above].sum(axis=1), neg[:, ~above].sum(axis=1)
    n_pos, n_neg = tp + fn, tn + fp

    neg_below = np.cumsum(neg, axis=1) - neg
    wins = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    pairs = (n_pos * n_neg).astype(float)
    auc = np.divide(wins, pairs, out=np.full(n_boot, np.nan), where=pairs > 0)

    precision, recall = _ratio(tp, tp + fp), _ratio(tp, n_pos)
    return {
        "accuracy": _ratio(tp + tn, n_pos + n_neg),
        "precision": precision,
        "recall": recall,
        "specificity": _ratio(tn, n_neg),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "auc": auc,
    }


def _stratified_resamples(y_true: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) indices drawn with replacement within each class, keeping the class sizes."""
    pos_idx, neg_idx = np.flatnonzero(y_true == 1), np.flatnonzero(y_true == 0)
    if pos_idx.size == 0 or neg_idx.size == 0:
        raise ValueError("bootstrap needs both classes in y_true")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [
            pos_idx[rng.integers(0, pos_idx.size, size=(n_boot, pos_idx.size))],
            neg_idx[rng.integers(0, neg_idx.size, size=(n_boot, neg_idx.size))],
        ],
        axis=1,
    )


def bootstrap_ci(
    y_true: ArrayLike,
    y_score: ArrayLike,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile ``1 - alpha`` CI of each metric over ``n_boot`` image resamples.

    Resampling is stratified (COVID and non-COVID images are drawn with replacement within
    their class, keeping the class sizes), so every resample has an AUC and the class
    balance of the test set is preserved.
    """
    t, s = _as_arrays(y_true, y_score)
    boot = _resample_metrics(t, s, threshold, _stratified_resamples(t, n_boot, seed))
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    out: dict[str, tuple[float, float]] = {}
    for name in METRIC_NAMES:
        lo, hi = np.percentile(boot[name], q)
        out[name] = (float(lo), float(hi))
    return out


def metrics_with_ci(
    y_true: ArrayLike,
    y_score: ArrayLike,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Point estimates with 95% stratified-bootstrap CIs.

    Returns ``{metric: {"value": v, "ci_low": lo, "ci_high": hi}}`` for each name in
    ``METRIC_NAMES``; every leaf is a float in [0, 1] and nothing else is at the top level,
    so the dict writes straight to a DVC metrics JSON and ``flatten_metrics`` turns it into
    MLflow keys. Counts belong to ``confusion``.
    """
    point = binary_metrics(y_true, y_score, threshold)
    ci = bootstrap_ci(y_true, y_score, threshold=threshold, n_boot=n_boot, seed=seed)
    return {name: {"value": point[name], "ci_low": ci[name][0], "ci_high": ci[name][1]} for name in METRIC_NAMES}


def _rank_auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half, as in ``roc_auc_score``), in
    microseconds instead of sklearn's milliseconds: a patient bootstrap calls it thousands of times."""
    ranks = rankdata(s)
    positives = y == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _patient_resamples(t: np.ndarray, groups: ArrayLike, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Slice indices of patients drawn with replacement within their class (a patient's class:
    any COVID slice), keeping the class's patient count."""
    g = np.asarray(groups).ravel()
    if len(g) != len(t):
        raise ValueError(f"groups and labels differ in length: {len(g)} vs {len(t)}")
    names, index = np.unique(g, return_inverse=True)
    members = [np.flatnonzero(index == i) for i in range(len(names))]
    covid = np.array([t[m].max() for m in members])
    strata = [np.flatnonzero(covid == c) for c in (0, 1)]
    if any(len(st) == 0 for st in strata):
        raise ValueError("patient bootstrap needs patients of both classes")
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        picked = np.concatenate([rng.choice(st, size=len(st), replace=True) for st in strata])
        yield np.concatenate([members[i] for i in picked])


def patient_metrics_with_ci(
    y_true: ArrayLike,
    y_score: ArrayLike,
    groups: ArrayLike,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """:func:`metrics_with_ci` with patients, not slices, resampled: neighbouring slices of one
    patient are not independent, so an image bootstrap over a source that gives up to ~230
    slices a patient makes intervals far too narrow. Patients are drawn with replacement
    within their class (a patient's class: any COVID slice), keeping the class's patient count."""
    t, s = _as_arrays(y_true, y_score)
    boot = {name: np.empty(n_boot) for name in METRIC_NAMES}
    for b, idx in enumerate(_patient_resamples(t, groups, n_boot, seed)):
        # counts, not sklearn: its input checks cost ~25 ms a call, this ~0.1 ms
        resampled = _resample_metrics(t, s, threshold, idx[None, :])
        for name in METRIC_NAMES:
            boot[name][b] = resampled[name][0]
    point = binary_metrics(t, s, threshold)
    return {
        name: {
            "value": point[name],
            "ci_low": float(np.percentile(boot[name], 2.5)),
            "ci_high": float(np.percentile(boot[name], 97.5)),
        }
        for name in METRIC_NAMES
    }


def paired_auc_difference(
    y_true: ArrayLike,
    score_a: ArrayLike,
    score_b: ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: ArrayLike | None = None,
) -> dict[str, float]:
    """AUC(b) - AUC(a) on the same images, with a percentile CI from paired resamples.

    Both models are scored on each resampled image set, so what the images have in common
    cancels: the interval is much narrower than comparing the two separate CIs, and a
    difference whose interval excludes 0 is one the test set can tell apart. Scores of
    shape (k, n) are k models each (one per training seed): the difference is then that of
    their mean AUCs, which averages training noise out but does not put it in the interval.
    ``groups`` (a patient id per image) resamples whole patients instead of images.
    """
    t = np.asarray(y_true).astype(int).ravel()
    a, b = np.atleast_2d(np.asarray(score_a, dtype=float)), np.atleast_2d(np.asarray(score_b, dtype=float))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired scores differ in length: {a.shape[1]} vs {b.shape[1]}")
    for row in (*a, *b):
        _as_arrays(t, row)
    if groups is None:
        idx = _stratified_resamples(t, n_boot, seed)

        def mean_auc(rows: np.ndarray) -> tuple[float, np.ndarray]:
            return float(np.mean([roc_auc_score(t, r) for r in rows])), np.mean(
                [_resample_metrics(t, r, 0.5, idx)["auc"] for r in rows], axis=0
            )

    else:  # whole patients resampled: clustered slices are not independent evidence
        resamples = list(_patient_resamples(t, groups, n_boot, seed))

        def mean_auc(rows: np.ndarray) -> tuple[float, np.ndarray]:
            boot = [np.mean([_rank_auc(t[i], r[i]) for r in rows]) for i in resamples]
            return float(np.mean([roc_auc_score(t, r) for r in rows])), np.asarray(boot)

    (auc_a, boot_a), (auc_b, boot_b) = mean_auc(a), mean_auc(b)
    lo, hi = np.percentile(boot_b - boot_a, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"value": auc_b - auc_a, "ci_low": float(lo), "ci_high": float(hi)}


def mean_with_ci(
    values: ArrayLike, groups: ArrayLike | None = None, n_boot: int = 1000, seed: int = 0
) -> dict[str, float]:
    """The mean of per-item values (a Dice per slice) with a 95 % percentile bootstrap interval;
    with ``groups`` (a patient per item), whole groups are resampled, since one patient's slices
    are not independent: with few patients the interval is coarse, which is what the data can say."""
    v = np.asarray(values, dtype=float).ravel()
    if v.size == 0:
        raise ValueError("mean_with_ci needs at least one value")
    rng = np.random.default_rng(seed)
    if groups is None:
        means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    else:
        g = np.asarray(groups).ravel()
        if g.size != v.size:
            raise ValueError(f"groups and values differ in length: {g.size} vs {v.size}")
        _, index = np.unique(g, return_inverse=True)
        sums, counts = np.bincount(index, weights=v), np.bincount(index)
        picked = rng.integers(0, sums.size, size=(n_boot, sums.size))
        means = sums[picked].sum(axis=1) / counts[picked].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"value": float(v.mean()), "ci_low": float(low), "ci_high": float(high)}


def paired_mean_difference(base: list[np.ndarray], other: list[np.ndarray], groups: ArrayLike) -> dict[str, Any]:
    """``other`` minus ``base`` item by item (a Dice per slice), each seed's run against the same
    seed's, averaged over the seeds; 95 % intervals from resampling items and from resampling
    whole groups (patients). Seeds are paired, not resampled: the interval holds the slices'
    noise, the spread of ``seeds_better`` some of the training noise."""
    per_seed = [np.asarray(o, dtype=float) - np.asarray(b, dtype=float) for b, o in zip(base, other, strict=True)]
    diff = np.mean(per_seed, axis=0)
    slices, by_group = mean_with_ci(diff), mean_with_ci(diff, groups)
    return {
        "delta": slices["value"],
        "ci_low": slices["ci_low"],
        "ci_high": slices["ci_high"],
        "patient_ci_low": by_group["ci_low"],
        "patient_ci_high": by_group["ci_high"],
        "seeds_better": int(sum(d.mean() > 0 for d in per_seed)),
        "n_patients": int(len(set(np.asarray(groups).tolist()))),
    }


def flatten_metrics(nested: dict[str, dict[str, float]], prefix: str = "") -> dict[str, float]:
    """``{"auc": {"value": v, "ci_low": lo, ...}}`` -> ``{"auc": v, "auc_ci_low": lo, ...}``.

    MLflow's ``log_metrics`` takes only flat name -> float pairs.
    """
    flat: dict[str, float] = {}
    for name, stats in nested.items():
        for key, value in stats.items():
            flat[f"{prefix}{name}" if key == "value" else f"{prefix}{name}_{key}"] = float(value)
    return flat


def roc_points(y_true: ArrayLike, y_score: ArrayLike) -> pd.DataFrame:
    """ROC curve as a DataFrame with columns fpr, tpr, threshold.

    sklearn's first threshold is +inf, which is not valid JSON/CSV for ``dvc plots``; it is
    replaced by ``max(score) + 1`` (sklearn's own convention before 1.3), which still
    predicts nothing positive.
    """
    t, s = _as_arrays(y_true, y_score)
    fpr, tpr, thr = roc_curve(t, s, pos_label=1)
    thr = np.where(np.isfinite(thr), thr, s.max() + 1.0)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thr})
