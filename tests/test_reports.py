import pytest

from covidct.metrics import METRIC_NAMES
from covidct.reports import (
    PUBLISHED,
    confusion_markdown,
    format_cell,
    format_delta,
    results_report,
    table1_markdown,
    table2_markdown,
)


def _stats(value: float, lo: float, hi: float) -> dict[str, float]:
    return {"value": value, "ci_low": lo, "ci_high": hi}


RESULTS = {
    "raw": {name: _stats(0.801, 0.752, 0.850) for name in METRIC_NAMES},
    "cropped": {name: _stats(0.8724, 0.8306, 0.9041) for name in METRIC_NAMES},
}
CONFUSIONS = {"raw": {"tn": 80, "fp": 25, "fn": 15, "tp": 83}, "cropped": {"tn": 90, "fp": 15, "fn": 11, "tp": 87}}


def _rows(table: str) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_published_constants_match_paper():
    assert dict(PUBLISHED["tran_without_segmentation"]) == {"accuracy": 83.5, "recall": 83.7, "f1": 88.7, "auc": 90.9}
    assert dict(PUBLISHED["tran_with_segmentation"]) == {"accuracy": 87.2, "recall": 91.9, "f1": 91.5, "auc": 92.6}
    assert dict(PUBLISHED["zhao"]) == {"accuracy": 84.7, "recall": 76.2, "f1": 85.3, "auc": 82.4}
    with pytest.raises(TypeError):
        PUBLISHED["zhao"]["auc"] = 1.0  # type: ignore[index]


def test_format_delta_says_real_only_when_the_interval_excludes_zero():
    assert format_delta(_stats(0.031, 0.004, 0.059)) == "+3.1 (+0.4 to +5.9) **real**"
    assert format_delta(_stats(-0.02, -0.05, -0.001)).endswith("**real**")
    assert format_delta(_stats(0.01, -0.01, 0.03)) == "+1.0 (-1.0 to +3.0) (noise)"


def test_format_cell():
    assert format_cell(_stats(0.8724, 0.8306, 0.9041)) == "87.2 (83.1–90.4)"
    assert format_cell(_stats(float("nan"), 0.5, 0.6)) == "n/a (50.0–60.0)"
    assert format_cell(None) == "–"


def test_table1_cells():
    table = table1_markdown(RESULTS)
    header = table.splitlines()[0]
    assert "Without segmentation (this run)" in header and "With segmentation (this run)" in header
    rows = _rows(table)
    assert list(rows) == ["Accuracy", "Precision", "Recall (sensitivity)", "Specificity", "F1", "AUC"]
    assert rows["Accuracy"] == ["83.5", "80.1 (75.2–85.0)", "87.2", "87.2 (83.1–90.4)"]
    assert rows["Recall (sensitivity)"][0] == "83.7" and rows["Recall (sensitivity)"][2] == "91.9"
    assert rows["F1"][0] == "88.7" and rows["F1"][2] == "91.5"
    assert rows["AUC"][0] == "90.9" and rows["AUC"][2] == "92.6"
    assert rows["Precision"][0] == "–" and rows["Specificity"][2] == "–"


def test_table1_missing_variant():
    rows = _rows(table1_markdown({"cropped": RESULTS["cropped"]}))
    assert rows["AUC"][1] == "–"
    assert rows["AUC"][3] == "87.2 (83.1–90.4)"


def test_table2_cells():
    table = table2_markdown(RESULTS)
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header[1:] == [
        "Zhao et al. (published)",
        "Tran et al. (published)",
        "This run, with segmentation",
        "This run, without segmentation",
    ]
    rows = _rows(table)
    assert list(rows) == ["Accuracy", "Recall", "F1", "AUC"]
    assert rows["Accuracy"] == ["84.7", "87.2", "87.2 (83.1–90.4)", "80.1 (75.2–85.0)"]
    assert rows["Recall"][:2] == ["76.2", "91.9"]
    assert rows["F1"][:2] == ["85.3", "91.5"]
    assert rows["AUC"][:2] == ["82.4", "92.6"]


def test_confusion_markdown():
    rows = _rows(confusion_markdown(CONFUSIONS["cropped"]))
    assert rows == {"non-COVID": ["90", "15"], "COVID": ["11", "87"]}


def test_results_report_page():
    page = results_report(
        RESULTS,
        confusions=CONFUSIONS,
        dice_summary={"mean_dice": 0.93456, "n_images": 120},
        n_test={"COVID": 98, "non-COVID": 105},
        thresholds={"raw": 0.5, "cropped": 0.3125},
        threshold_rule="the fixed threshold 0.5",
        n_boot=1000,
        extra_md="MLflow run: abc123",
    )
    assert page.startswith("# ")
    assert "203 images (COVID 98, non-COVID 105)" in page
    assert "1000 resamples" in page and "0.5" in page
    assert table1_markdown(RESULTS) in page and table2_markdown(RESULTS) in page
    assert confusion_markdown(CONFUSIONS["raw"]) in page
    assert page.index("### Without segmentation (threshold 0.5000)") < page.index(
        "### With segmentation (threshold 0.3125)"
    )
    assert "](figures/roc.png)" in page and "](figures/confusion.png)" in page
    assert "| mean_dice | 0.9346 |" in page and "| n_images | 120 |" in page
    assert page.rstrip().endswith("MLflow run: abc123")


def test_results_report_without_dice():
    page = results_report(
        RESULTS,
        confusions=CONFUSIONS,
        dice_summary=None,
        n_test={"COVID": 1, "non-COVID": 1},
        thresholds={"raw": 0.5, "cropped": 0.5},
        threshold_rule="x",
    )
    assert "segmentation (test set)" not in page
    assert "2 images" in page
