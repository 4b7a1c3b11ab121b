"""Per-source figures (covidct.source_figures, covidct.verdicts) and the patient bootstrap behind their intervals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from covidct.metrics import (
    METRIC_NAMES,
    _patient_resamples,
    binary_metrics,
    metrics_with_ci,
    paired_auc_difference,
    patient_metrics_with_ci,
)
from covidct.source_figures import (
    TOP_SLICES_CANDIDATES,
    choose_top_slices,
    diluted_series,
    figure_rows,
    rows_to_score,
    source_figures,
    study_scores,
    with_diluted,
)
from covidct.verdicts import TopSlices, study_probabilities, top_mean
from helpers.paths import DATA, REPO

pytestmark = pytest.mark.data  # reads the real data (skipped without it)


def _clustered(n_patients: int = 40, slices: int = 20, seed: int = 0) -> pd.DataFrame:
    """Slices that share their patient's score level: what neighbouring CT slices look like."""
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(n_patients):
        label = patient % 2
        level = rng.normal(0.6 if label else 0.4, 0.15)
        for k in range(slices):
            rows.append(
                {
                    "patient": f"p{patient}",
                    "study": f"s{patient}",
                    "label": label,
                    "probability": float(np.clip(level + rng.normal(0, 0.03), 0, 1)),
                    "slice": k,
                }
            )
    return pd.DataFrame(rows)


def test_patient_bootstrap_is_wider_than_the_slice_bootstrap_on_clustered_slices() -> None:
    """20 near-copies of one patient are not 20 patients: resampling slices understates the spread."""
    table = _clustered()
    y, s = table["label"].to_numpy(), table["probability"].to_numpy()
    patients = patient_metrics_with_ci(y, s, table["patient"].to_numpy(), 0.5, 400, 0)["auc"]
    slices = metrics_with_ci(y, s, 0.5, 400, 0)["auc"]
    assert patients["value"] == slices["value"]
    assert patients["ci_high"] - patients["ci_low"] > 2 * (slices["ci_high"] - slices["ci_low"])


def test_patient_bootstrap_intervals_are_sklearns_on_each_resample() -> None:
    """The patient bootstrap scores each resample from counts; sklearn on the same resamples agrees."""
    table = _clustered()
    y, s, groups = table["label"].to_numpy(), table["probability"].to_numpy(), table["patient"].to_numpy()
    fast = patient_metrics_with_ci(y, s, groups, 0.5, 200, 3)
    boot = [binary_metrics(y[i], s[i], 0.5) for i in _patient_resamples(y, groups, 200, 3)]
    for name in METRIC_NAMES:
        values = [m[name] for m in boot]
        assert fast[name]["ci_low"] == pytest.approx(np.percentile(values, 2.5), abs=1e-12), name
        assert fast[name]["ci_high"] == pytest.approx(np.percentile(values, 97.5), abs=1e-12), name


def test_paired_difference_over_patients_is_wider_than_over_slices() -> None:
    table = _clustered()
    y, a = table["label"].to_numpy(), table["probability"].to_numpy()
    shift = dict(
        zip(table["patient"].unique(), np.random.default_rng(1).normal(0, 0.1, table["patient"].nunique()), strict=True)
    )
    b = np.clip(
        a + table["patient"].map(shift).to_numpy(), 0, 1
    )  # model b moves whole patients: its gain is clustered too
    slices = paired_auc_difference(y, a, b, 300, 0)
    patients = paired_auc_difference(y, a, b, 300, 0, groups=table["patient"].to_numpy())
    assert patients["value"] == pytest.approx(slices["value"])
    assert patients["ci_high"] - patients["ci_low"] > 1.5 * (slices["ci_high"] - slices["ci_low"])


def test_patient_bootstrap_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both classes"):
        patient_metrics_with_ci([1, 1], [0.2, 0.4], ["a", "b"], 0.5, 10, 0)


def test_top_mean_skips_refused_slices_and_none_means_nothing_scored() -> None:
    assert top_mean([0.1, None, 0.9, 0.5, float("nan")], TopSlices(2)) == pytest.approx(0.7)
    assert top_mean([0.1, 0.9, 0.5], TopSlices()) == pytest.approx(0.5)  # all slices
    assert top_mean([None, None], TopSlices(3)) is None
    assert study_probabilities(["a", "a", "", "b"], [0.2, 0.8, 0.9, None], TopSlices(1)) == {"a": 0.8, "b": None}


def test_a_share_of_slices_grows_with_the_series_and_a_count_does_not() -> None:
    tenth = TopSlices(share=0.1)
    assert [tenth.of(n) for n in (1, 6, 10, 11, 300)] == [1, 1, 1, 2, 30]  # at least one, rounded up
    assert [TopSlices(3).of(n) for n in (2, 300)] == [2, 3] and TopSlices().of(7) == 7
    # a scan's 3 diseased slices (0.9) and its series of 30, the rest healthy (0.1) but for one chance 0.8:
    # the top slice barely tells them from a healthy series with the same chance slice; the top 10 % does
    scan, series = [0.9] * 3, [0.9] * 3 + [0.8] + [0.1] * 26
    healthy = [0.8] + [0.1] * 29
    assert top_mean(series, TopSlices(1)) - top_mean(healthy, TopSlices(1)) == pytest.approx(0.1)
    assert top_mean(series, tenth) == pytest.approx(0.9) == top_mean(scan, tenth)
    assert top_mean(healthy, tenth) == pytest.approx(1.0 / 3)
    assert TopSlices.from_settings({"top_k": 3}) == TopSlices(3)  # reports and versions from before shares
    assert TopSlices.from_settings(tenth.settings()) == tenth
    assert [str(t) for t in (TopSlices(3), tenth, TopSlices())] == ["top 3", "top 10 %", "all"]


@pytest.mark.parametrize("bad", [{"count": -1}, {"share": 1.0}, {"share": -0.1}, {"count": 2, "share": 0.1}])
def test_a_bad_aggregation_is_one_error_naming_it(bad: dict) -> None:
    with pytest.raises(ValueError, match="top slices"):
        TopSlices(**bad)


def test_study_scores_and_the_validation_choice_of_k() -> None:
    table = _clustered(n_patients=6, slices=5)
    studies = study_scores(table, TopSlices(2))
    assert len(studies) == 6 and studies["slices"].eq(5).all()
    top = (
        table.sort_values("probability", ascending=False)
        .groupby("study")["probability"]
        .apply(lambda p: p.iloc[:2].mean())
    )
    assert studies.set_index("study")["probability"].to_dict() == pytest.approx(top.to_dict())
    assert choose_top_slices(table) in TOP_SLICES_CANDIDATES


def test_source_figures_count_refusals_and_cc_ccii_contrasts() -> None:
    table = _clustered(n_patients=12, slices=3)
    table["subclass"] = np.where(table["label"] == 1, "NCP", np.where(table.index % 2 == 0, "CP", "Normal"))
    table.loc[0, "probability"] = np.nan  # the gate refused one slice
    figures = source_figures(table, "cc-ccii", 0.5, 200, 0)
    assert figures["slices"] == 36 and figures["refused"] == 1 and figures["patients"] == 12
    assert figures["auc_ci_low"] <= figures["auc"] <= figures["auc_ci_high"]
    assert {"ncp_vs_normal.auc", "ncp_vs_cp.auc", "ncp_vs_normal.specificity", "ncp_vs_cp.specificity_ci_low"} <= set(
        figures
    )


def test_lung_set_gives_sensitivity_per_patient() -> None:
    table = pd.DataFrame(
        {"patient": ["a", "a", "b"], "label": 1, "probability": [0.9, 0.1, 0.7], "subclass": "COVID-19"}
    )
    figures = source_figures(table, "lung-seg", 0.5, 100, 0)
    assert figures["recall"] == pytest.approx(2 / 3) and figures["recall.a"] == 0.5 and figures["recall.b"] == 1.0
    assert "auc" not in figures  # one class: no ranking to score


def test_a_source_trained_on_has_figures_from_its_test_split_only() -> None:
    table = pd.DataFrame({"split": ["train", "val", "test", "test"]})
    assert rows_to_score(table, "covid-ct", ["covid-ct"])["split"].tolist() == [
        "val",
        "test",
        "test",
    ]  # val: for choices only
    assert len(rows_to_score(table, "cc-ccii", ["covid-ct"])) == 4  # never trained on: all of it
    assert len(rows_to_score(table, "lung-seg", ["covid-ct"])) == 2  # the segmenter trained on the rest
    scored = pd.concat([table.assign(source="covid-ct"), table.assign(source="cc-ccii")])
    assert figure_rows(scored, "covid-ct", ["covid-ct"])["split"].tolist() == ["test", "test"]
    assert len(figure_rows(scored, "cc-ccii", ["covid-ct"])) == 4
    assert figure_rows(scored, "cc-ccii", ["covid-ct", "cc-ccii"])["split"].tolist() == ["test", "test"]


def test_patient_split_keeps_linked_patients_together_and_stratifies_classes() -> None:
    from covidct.config import declared_sources, load_params
    from covidct.datasets import patient_split

    manifest = pd.read_csv(DATA / "cc-ccii" / "manifest.csv")
    source = declared_sources(load_params(REPO / "params.yaml"))["cc-ccii"]
    groups = {"CP_1775": "CP_1775+CP_3636", "CP_3636": "CP_1775+CP_3636"}
    split = patient_split(manifest, source, 0.2, 0.2, 0, groups=groups)
    assert split.loc[split["patient"] == "CP_1775+CP_3636", "split"].nunique() == 1
    assert split.groupby("patient")["split"].nunique().eq(1).all()  # never a patient in two splits
    patients = split.drop_duplicates("patient").groupby(["subclass", "split"]).size().unstack()
    assert (patients["test"] / patients.sum(axis=1)).between(0.15, 0.25).all()  # about 20 % of each class's patients
    assert split["label"].eq(split["subclass"].eq("NCP").astype(int)).all()
    assert split.equals(patient_split(manifest, source, 0.2, 0.2, 0, groups=groups))  # seeded: the same every time


def test_manifest_split_is_used_as_given_and_checked() -> None:
    from covidct.config import declared_sources, load_params
    from covidct.datasets import DatasetError, manifest_split

    manifest = pd.read_csv(DATA / "sars-cov-2-ct" / "manifest.csv")
    source = declared_sources(load_params(REPO / "params.yaml"))["sars-cov-2-ct"]
    split = manifest_split(manifest, source)
    assert split["split"].tolist() == manifest["split"].tolist()  # as given, row for row
    assert split["label"].eq(manifest["label"].eq("COVID").astype(int)).all()
    assert split.groupby("patient")["split"].nunique().eq(1).all()  # a scan never in two splits
    broken = manifest.assign(split=manifest["split"].replace({"val": "holdout"}))
    with pytest.raises(DatasetError, match="manifest.csv: split 'holdout' is not one of train, val, test"):
        manifest_split(broken, source)
    with pytest.raises(DatasetError, match="column 'scan' is missing"):
        manifest_split(manifest.drop(columns=["scan"]), source)


def test_study_label_uses_the_study_threshold_chosen_on_validation_scans() -> None:
    from covidct.registry.pipeline_model import ScanPrediction, predictions_table

    scans = [
        ScanPrediction(f"s{i}", probability=p, threshold=0.5, box=(0, 0, 1, 1)) for i, p in enumerate([0.3, 0.4, 0.9])
    ]
    studies = ["a", "a", "b"]
    at_slice = predictions_table(scans, studies)
    assert at_slice["study_label"].tolist() == ["non-COVID", "non-COVID", "COVID"]  # study a: 0.35 < 0.5
    at_study = predictions_table(scans, studies, study_threshold=0.3)
    assert at_study["study_label"].tolist() == ["COVID", "COVID", "COVID"]
    assert at_study["label"].tolist() == at_slice["label"].tolist()  # slice labels keep the slice threshold


def _series_table() -> pd.DataFrame:
    """One source's split: 2 COVID scans (4 slices at 0.9), 4 Normal scans (10 slices at 0.1), 1 CP scan."""
    rows = [("c1", 1, "NCP", 0.9)] * 4 + [("c2", 1, "NCP", 0.9)] * 4
    rows += [(f"n{i}", 0, "Normal", 0.1) for i in range(4) for _ in range(10)] + [("p1", 0, "CP", 0.6)] * 4
    table = pd.DataFrame(rows, columns=["study", "label", "subclass", "probability"])
    return table.assign(patient=table["study"], origin=table["study"], source="cc-ccii", split="test")


def test_diluted_series_keep_the_share_and_fill_with_other_normal_scans() -> None:
    table = _series_table()
    diluted = diluted_series(table, 0.2, seed=0)
    sizes = diluted.groupby("study").size()
    assert sizes["c1@0.2"] == 20 and sizes["p1@0.2"] == 20 and sizes["n0@0.2"] == 50  # every scan diluted alike
    c1 = diluted[diluted["study"] == "c1@0.2"]
    assert (c1["probability"] == 0.9).sum() == 4 and (c1["subclass"] == "Normal").sum() == 16  # fill: Normal only
    assert c1["label"].eq(1).all() and c1["patient"].eq("c1").all()  # a series is its scan's patient and label
    n0 = diluted[diluted["study"] == "n0@0.2"]
    assert (n0["origin"] == "n0").sum() == 10  # a Normal scan is filled from the other Normal scans
    assert diluted_series(table, 0.2, seed=0).equals(diluted)  # seeded
    with pytest.raises(ValueError, match="share"):
        diluted_series(table, 0.0, seed=0)
    pooled = with_diluted(table, (0.1, 0.3), seed=0)
    assert set(pooled["study"]) >= {"c1", "c1@0.1", "c1@0.3"}


def test_a_diluted_series_still_called_covid_by_its_top_slices_not_by_the_mean() -> None:
    diluted = diluted_series(_series_table(), 0.1, seed=0)
    mean_all, top_1 = study_scores(diluted, TopSlices()), study_scores(diluted, TopSlices(1))
    assert mean_all.loc[mean_all["label"] == 1, "probability"].max() < 0.2  # 90 % Normal slices: the mean sinks
    assert top_1.loc[top_1["label"] == 1, "probability"].min() == pytest.approx(0.9)
    assert top_1.loc[top_1["label"] == 0, "probability"].max() == pytest.approx(0.6)  # the CP scan
    tenth = study_scores(diluted, TopSlices(share=0.1))  # 40 slices: the top 4, the scan's own
    assert tenth.set_index("study")["probability"].to_dict() == pytest.approx(
        top_1.set_index("study")["probability"].to_dict()
    )


def test_slices_outside_the_lungs_are_marked_left_out_of_the_verdict_and_not_errors() -> None:
    from covidct.registry.pipeline_model import ScanPrediction, predictions_table

    scans = [
        ScanPrediction("mid", probability=0.2, threshold=0.5, box=(0, 0, 1, 1), lung_fraction=0.3),
        ScanPrediction("base", probability=0.9, threshold=0.5, box=(0, 0, 1, 1), lung_fraction=0.03),
        ScanPrediction("neck", lung_fraction=0.001, error="input gate: the lung mask covers 0.10 %", no_lung=True),
    ]
    table = predictions_table(scans, ["s", "s", "s"], study_threshold=0.5, outside_below=0.05)
    assert table["outside_lungs"].tolist() == [False, True, True]
    assert table["study_probability"].tolist() == [0.2, 0.2, 0.2]  # the base's 0.9 is not the series' evidence
    assert table["error"].tolist() == ["", "", ""] and table.loc[1, "probability"] == 0.9  # its own score stays
    alone = predictions_table(scans[2:], [""], outside_below=0.05)  # a lone picture without lung is still refused
    assert alone.loc[0, "error"].startswith("input gate") and alone.loc[0, "outside_lungs"] is None
