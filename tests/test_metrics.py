import math
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from covidct.metrics import (
    METRIC_NAMES,
    _resample_metrics,
    binary_metrics,
    bootstrap_ci,
    confusion,
    dice_score,
    flatten_metrics,
    mean_with_ci,
    metrics_with_ci,
    paired_mean_difference,
    roc_points,
    threshold_for_recall,
)

# tp=2 (0.9, 0.6), fn=1 (0.3), tn=1 (0.2), fp=1 (0.7) at threshold 0.5.
Y_TRUE = [1, 1, 1, 0, 0]
Y_SCORE = [0.9, 0.6, 0.3, 0.7, 0.2]


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    score = np.clip(0.5 + 0.25 * (2 * y - 1) + rng.normal(0, 0.25, n), 0, 1)
    return y, np.round(score, 2)  # rounding creates ties, which AUC must handle


def test_dice_hand_made_masks():
    a = np.zeros((4, 4), dtype=bool)
    b = np.zeros((4, 4), dtype=bool)
    a[0, :3] = True  # 3 pixels
    b[0, 1:] = True  # 3 pixels, 2 shared
    assert dice_score(a, b) == pytest.approx(4 / 6, abs=1e-6)
    assert dice_score(a, a) == pytest.approx(1.0, abs=1e-6)
    assert dice_score(a.astype(np.uint8), np.zeros((4, 4), np.uint8)) == pytest.approx(0.0, abs=1e-6)


def test_dice_of_a_stack_is_pooled_over_pixels():
    # evaluate_segmenter's dice_pooled: a large slice segmented perfectly and a small one missed
    # average to 0.5 per slice, but pool to 2 * 90 / (90 + 95) over pixels.
    truth = np.zeros((2, 10, 10), dtype=bool)
    truth[0, :9] = True  # 90 pixels
    truth[1, 0, :10:2] = True  # 5 pixels
    predicted = truth.copy()
    predicted[1] = False
    per_slice = [dice_score(p, t) for p, t in zip(predicted, truth, strict=True)]
    assert np.mean(per_slice) == pytest.approx(0.5, abs=1e-6)
    assert dice_score(predicted, truth) == pytest.approx(180 / 185, abs=1e-6)


def test_dice_empty_masks_is_one():
    empty = np.zeros((3, 3), dtype=np.uint8)
    assert dice_score(empty, empty) == 1.0


def test_dice_shape_mismatch():
    with pytest.raises(ValueError):
        dice_score(np.zeros((2, 2)), np.zeros((2, 3)))


def test_confusion_hand_computed():
    assert confusion(Y_TRUE, Y_SCORE, 0.5) == {"tn": 1, "fp": 1, "fn": 1, "tp": 2}
    # Threshold is inclusive: a score equal to it is predicted COVID.
    assert confusion([1, 0], [0.5, 0.4], 0.5) == {"tn": 1, "fp": 0, "fn": 0, "tp": 1}


def test_binary_metrics_hand_computed():
    m = binary_metrics(Y_TRUE, Y_SCORE)
    assert list(m) == list(METRIC_NAMES)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 / 3)
    # Pairs (pos > neg): 0.9 beats both, 0.6 beats 0.2, 0.3 beats 0.2 -> 4 of 6.
    assert m["auc"] == pytest.approx(4 / 6)


def test_binary_metrics_zero_division_and_single_class():
    m = binary_metrics([1, 0, 0], [0.1, 0.2, 0.3])  # nothing predicted positive
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["specificity"] == 1.0
    single = binary_metrics([1, 1], [0.9, 0.2])
    assert math.isnan(single["auc"])
    assert single["specificity"] == 0.0
    assert single["recall"] == pytest.approx(0.5)


def test_resample_metrics_match_sklearn_per_resample():
    y, s = _synthetic(60, seed=1)
    rng = np.random.default_rng(2)
    idx = rng.integers(0, y.size, size=(25, y.size))
    idx[:, :2] = [0, 1]  # both classes in every resample
    vec = _resample_metrics(y, s, 0.5, idx)
    for b in range(idx.shape[0]):
        ref = binary_metrics(y[idx[b]], s[idx[b]], 0.5)
        for name in METRIC_NAMES:
            assert vec[name][b] == pytest.approx(ref[name], abs=1e-12), (name, b)


def test_bootstrap_ci_contains_point_and_shrinks_with_n():
    y_small, s_small = _synthetic(60, seed=3)
    y_big, s_big = _synthetic(2000, seed=3)
    point = binary_metrics(y_small, s_small)
    ci_small = bootstrap_ci(y_small, s_small, n_boot=500, seed=0)
    ci_big = bootstrap_ci(y_big, s_big, n_boot=500, seed=0)
    for name in METRIC_NAMES:
        lo, hi = ci_small[name]
        assert lo <= point[name] <= hi, name
        assert hi - lo > 0, name
        assert ci_big[name][1] - ci_big[name][0] < hi - lo, name


def test_bootstrap_ci_is_seeded():
    y, s = _synthetic(100, seed=4)
    assert bootstrap_ci(y, s, n_boot=200, seed=7) == bootstrap_ci(y, s, n_boot=200, seed=7)
    assert bootstrap_ci(y, s, n_boot=200, seed=7) != bootstrap_ci(y, s, n_boot=200, seed=8)


def test_bootstrap_ci_needs_both_classes():
    with pytest.raises(ValueError):
        bootstrap_ci([1, 1, 1], [0.2, 0.5, 0.9])


def test_bootstrap_ci_fast_for_paper_test_set():
    y, s = _synthetic(203, seed=5)
    start = time.perf_counter()
    bootstrap_ci(y, s, n_boot=1000, seed=0)
    assert time.perf_counter() - start < 2.0


def test_metrics_with_ci_structure_and_flatten():
    y, s = _synthetic(80, seed=6)
    out = metrics_with_ci(y, s, n_boot=100, seed=0)
    assert list(out) == list(METRIC_NAMES)
    point = binary_metrics(y, s)
    for name, stats in out.items():
        assert set(stats) == {"value", "ci_low", "ci_high"}
        assert stats["value"] == point[name]
        assert all(isinstance(v, float) for v in stats.values())
    flat = flatten_metrics(out, prefix="test_")
    assert flat["test_auc"] == out["auc"]["value"]
    assert flat["test_auc_ci_low"] == out["auc"]["ci_low"]
    assert len(flat) == 3 * len(METRIC_NAMES)


def test_roc_points_finite_and_monotone():
    df = roc_points(Y_TRUE, Y_SCORE)
    assert list(df.columns) == ["fpr", "tpr", "threshold"]
    assert np.isfinite(df.to_numpy()).all()
    assert df.iloc[0][["fpr", "tpr"]].tolist() == [0.0, 0.0]
    assert df.iloc[-1][["fpr", "tpr"]].tolist() == [1.0, 1.0]
    assert df["threshold"].iloc[0] == pytest.approx(1.9)
    assert (np.diff(df["fpr"]) >= 0).all() and (np.diff(df["tpr"]) >= 0).all()


def test_threshold_for_recall_is_the_highest_reaching_the_floor():
    y = [1, 1, 1, 1, 0, 0, 0]
    s = [0.9, 0.8, 0.4, 0.2, 0.7, 0.3, 0.1]
    assert threshold_for_recall(y, s, 0.5) == 0.8  # 2 of 4 positives at >= 0.8
    assert threshold_for_recall(y, s, 0.75) == 0.4
    assert threshold_for_recall(y, s, 0.76) == 0.2  # needs all 4
    assert threshold_for_recall(y, s, 0.0) == 0.9
    for floor in (0.25, 0.5, 0.75, 1.0):
        t = threshold_for_recall(y, s, floor)
        assert binary_metrics(y, s, t)["recall"] >= floor
        assert binary_metrics(y, s, np.nextafter(t, 1.0))["recall"] < floor
    with pytest.raises(ValueError, match="no positive"):
        threshold_for_recall([0, 0], [0.1, 0.2], 0.9)


def test_paired_auc_difference():
    from covidct.metrics import paired_auc_difference

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(98), np.zeros(105)].astype(int)
    weak = rng.random(203) + 0.3 * y
    strong = rng.random(203) + 1.0 * y
    same = paired_auc_difference(y, weak, weak, n_boot=200)
    assert same == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    better = paired_auc_difference(y, weak, strong, n_boot=500)
    assert better["value"] == pytest.approx(roc_auc_score(y, strong) - roc_auc_score(y, weak))
    assert 0 < better["ci_low"] < better["value"] < better["ci_high"]
    # pairing: the difference's interval is narrower than either model's own interval
    own = bootstrap_ci(y, weak, n_boot=500)["auc"]
    noise = paired_auc_difference(y, weak, weak + rng.normal(0, 0.02, 203), n_boot=500)
    assert noise["ci_high"] - noise["ci_low"] < (own[1] - own[0]) / 3
    with pytest.raises(ValueError, match="length"):
        paired_auc_difference(y, weak, strong[:-1])


def test_paired_auc_difference_of_seed_means():
    """(k, n) scores: k models per arm, compared by their mean AUC on shared resamples."""
    from covidct.metrics import paired_auc_difference

    rng = np.random.default_rng(1)
    y = np.r_[np.ones(98), np.zeros(105)].astype(int)
    weak = rng.random((3, 203)) + 0.3 * y
    strong = rng.random((3, 203)) + 1.0 * y
    mean_of = lambda rows: np.mean([roc_auc_score(y, r) for r in rows])  # noqa: E731
    both = paired_auc_difference(y, weak, strong, n_boot=300)
    assert both["value"] == pytest.approx(mean_of(strong) - mean_of(weak))
    assert 0 < both["ci_low"] < both["value"] < both["ci_high"]
    single = paired_auc_difference(y, weak[0], strong, n_boot=300)  # one model against three
    assert single["value"] == pytest.approx(mean_of(strong) - roc_auc_score(y, weak[0]))
    # averaging seeds narrows the interval: each model's own noise partly cancels
    one = paired_auc_difference(y, weak[0], weak[0] + rng.normal(0, 0.3, 203), n_boot=300)
    three = paired_auc_difference(y, weak, weak + rng.normal(0, 0.3, (3, 203)), n_boot=300)
    assert three["ci_high"] - three["ci_low"] < one["ci_high"] - one["ci_low"]
    with pytest.raises(ValueError, match="length"):
        paired_auc_difference(y, weak, strong[:, :-1])


def test_rank_auc_is_sklearns_auc_ties_included() -> None:
    """The patient bootstrap's fast AUC must be the same number roc_auc_score gives."""
    from covidct.metrics import _rank_auc

    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 150)
        s = np.round(rng.random(150), 1)  # many ties
        assert _rank_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_mean_with_ci_resamples_patients_not_slices_when_told() -> None:
    values = np.repeat([0.5, 0.7, 0.9], 30)  # three patients, each slice equal to its patient's
    groups = np.repeat(["a", "b", "c"], 30)
    slices, patients = mean_with_ci(values, n_boot=2000), mean_with_ci(values, groups, n_boot=2000)
    assert slices["value"] == patients["value"] == pytest.approx(0.7)
    assert slices["ci_low"] < 0.7 < slices["ci_high"] and slices["ci_high"] - slices["ci_low"] < 0.1
    assert patients["ci_low"] <= 0.55 and patients["ci_high"] >= 0.85  # three patients say little more than that
    assert mean_with_ci(values[:30], groups[:30]) == {"value": 0.5, "ci_low": 0.5, "ci_high": 0.5}
    with pytest.raises(ValueError, match="differ in length"):
        mean_with_ci(values, groups[:5])


def test_paired_mean_difference_hand_made_seeds():
    """Seed 0 gains 0.1 on every slice, seed 1 loses 0.02: the mean gain is 0.04, one seed of two
    is better, and with a constant per-slice difference every resample is that difference."""
    base = [np.array([0.5, 0.6, 0.7, 0.8]), np.array([0.4, 0.5, 0.6, 0.7])]
    other = [b + d for b, d in zip(base, (0.1, -0.02), strict=True)]
    result = paired_mean_difference(base, other, ["p1", "p1", "p2", "p2"])
    assert result["delta"] == pytest.approx(0.04)
    assert result["ci_low"] == pytest.approx(0.04) and result["ci_high"] == pytest.approx(0.04)
    assert result["patient_ci_low"] == pytest.approx(0.04) and result["patient_ci_high"] == pytest.approx(0.04)
    assert result["seeds_better"] == 1 and result["n_patients"] == 2
    with pytest.raises(ValueError):
        paired_mean_difference(base, other[:1], ["p1"] * 4)  # an arm missing a seed is no pairing
