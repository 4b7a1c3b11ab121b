"""The pipeline's figures per data source: does a model carry beyond the sources it trained on?

COVID-CT's classes come from different places (paper figures against other collections), so a
classifier can score well on its own test split by telling sources apart. The honest check is
a source it never trained on: any declared source left out of ``classifier.sources`` (scored
whole; the leave-one-source-out folds of covidct.levers.holdout) and the lung set's held-out
patients (all COVID-19). Slices of one patient are not independent, so every interval here
resamples patients (or the source's stand-in for them), not slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from covidct.catalog import load_source
from covidct.datasets import LUNG_SEG
from covidct.metrics import binary_metrics, flatten_metrics, patient_metrics_with_ci
from covidct.paths import LUNG_SPLIT, raw
from covidct.verdicts import TopSlices, top_mean

NORMAL = "Normal"  # the subclass of lesion-free scans (CC-CCII's), which diluted series are filled with
#: Test series are diluted with other draws than the validation ones (the seed offset between them).
TEST_SEED_OFFSET = 100
#: Slices averaged into a study's score, the candidates the validation scans choose from (on a tie, the first).
TOP_SLICES_CANDIDATES = (
    *(TopSlices(count=k) for k in (1, 3, 5, 10)),
    *(TopSlices(share=s) for s in (0.05, 0.1, 0.2, 0.3)),
    TopSlices(),
)


def source_table(root: Path, name: str) -> pd.DataFrame:
    """One source as path, relpath, label, split, patient, study (its scan) and subclass: a
    declared source through covidct.catalog, or the lung set's slices (all COVID-19)."""
    if name == LUNG_SEG:
        table = pd.read_csv(root / LUNG_SPLIT).rename(columns={"image": "relpath"})
        patient = table["patient_id"].astype(str)
        table = table.assign(label=1, patient=patient, study=patient, subclass="COVID-19", source=name)
        return table.assign(path=[str(root / raw(name) / p) for p in table["relpath"]]).reset_index(drop=True)
    return load_source(root, name).assign(study=lambda t: t["scan"])


def rows_to_score(table: pd.DataFrame, name: str, trained_on: Sequence[str]) -> pd.DataFrame:
    """A source the classifier trained on is scored on its validation split (for choices such as
    the study aggregation) and its test split (the figures); one it never saw, whole. The lung
    set only on its held-out patients: the segmenter trained on the others."""
    if name == LUNG_SEG:
        return table[table["split"] == "test"].reset_index(drop=True)
    if name in trained_on:
        return table[table["split"].isin(["val", "test"])].reset_index(drop=True)
    return table


def figure_rows(scored: pd.DataFrame, name: str, trained_on: Sequence[str]) -> pd.DataFrame:
    """The scored rows a source's figures rest on: the test split of a trained-on source."""
    part = scored[scored["source"] == name]
    return part[part["split"] == "test"] if name in trained_on else part


def _figures(part: pd.DataFrame, threshold: float, n_boot: int, seed: int) -> dict[str, float]:
    y, s = part["label"].to_numpy(), part["probability"].to_numpy(dtype=float)
    if len(y) == 0:
        return {}
    if len(np.unique(y)) < 2:  # one class: only its hit rate means something
        return {"recall": float(np.mean(s >= threshold))} if y.all() else {"specificity": float(np.mean(s < threshold))}
    return flatten_metrics(patient_metrics_with_ci(y, s, part["patient"].to_numpy(), threshold, n_boot, seed))


def contrasts(scored: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """A source's own question beside COVID vs the rest, where it has several non-COVID classes
    (CC-CCII: NCP vs CP, NCP vs Normal): its COVID class against each, keyed ``<covid>_vs_<other>``."""
    positives = sorted(set(scored.loc[scored["label"] == 1, "subclass"].astype(str)))
    negatives = sorted(set(scored.loc[scored["label"] == 0, "subclass"].astype(str)))
    if len(positives) != 1 or len(negatives) < 2:
        return {}
    return {f"{positives[0]}_vs_{n}".lower(): (positives[0], n) for n in negatives}


def source_figures(scored: pd.DataFrame, name: str, threshold: float, n_boot: int, seed: int) -> dict[str, float]:
    """Metrics of one source's scored slices (``probability`` NaN where the gate refused),
    its subclass contrasts, and how many slices and patients the figures rest on."""
    kept = scored[scored["probability"].notna()]
    out = {"slices": len(scored), "patients": int(scored["patient"].nunique()), "refused": int(len(scored) - len(kept))}
    out |= _figures(kept, threshold, n_boot, seed)
    for contrast, (positive, negative) in contrasts(kept).items():
        part = kept[kept["subclass"].isin((positive, negative))]
        out |= {
            f"{contrast}.{k}": v
            for k, v in _figures(part, threshold, n_boot, seed).items()
            if k.split("_ci")[0] in ("auc", "specificity")
        }
    if name == LUNG_SEG:
        out |= {f"recall.{p}": float(np.mean(part["probability"] >= threshold)) for p, part in kept.groupby("patient")}
    return out


def study_scores(scored: pd.DataFrame, top: TopSlices) -> pd.DataFrame:
    """One row per study: the mean of its ``top`` highest slice scores, over the
    slices the gate let through and that are not outside the lungs (``outside_lungs``, where the
    table has it); COVID when any slice's label is."""
    kept = scored[scored["probability"].notna()]
    if "outside_lungs" in kept:
        kept = kept[~kept["outside_lungs"].astype(bool)]
    rows = []
    for study, part in kept.groupby("study", sort=True):
        probability = top_mean(part["probability"].tolist(), top)
        rows.append(
            {
                "study": study,
                "patient": part["patient"].iat[0],
                "label": int(part["label"].max()),
                "probability": probability,
                "slices": len(part),
            }
        )
    return pd.DataFrame(rows)


def diluted_series(scored: pd.DataFrame, share: float, seed: int) -> pd.DataFrame:
    """Series as a whole chest CT shows a patient: each scan's own slices make up only ``share``
    of a series, filled with slices of other scans of the source's ``Normal`` class (lesion-free
    lungs) from the same split. Every scan is diluted alike, COVID or not, so series lengths say
    nothing of the label (a top-1 score over a long series would otherwise favour whichever class
    got the long ones). A source without a Normal class gives none: its non-COVID slices may hold
    other disease (SARS-CoV-2 CT) or are paper figures, not series (COVID-CT). Study ids:
    ``<scan>@<share>``."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    rng = np.random.default_rng(seed)
    parts = []
    for _, group in scored.groupby(["source", "split"], sort=True):
        normal = group[(group["label"] == 0) & (group["subclass"].astype(str) == NORMAL)]
        if normal.empty:
            continue
        for study, own in group.groupby("study", sort=True):
            fill = normal[normal["study"] != study]
            n_fill = int(np.ceil(len(own) / share)) - len(own)
            if n_fill and fill.empty:
                continue
            picked = (
                fill.iloc[rng.choice(len(fill), size=n_fill, replace=n_fill > len(fill))] if n_fill else fill.iloc[:0]
            )
            label, patient = int(own["label"].max()), own["patient"].iat[0]
            series = pd.concat([own, picked.assign(label=label, patient=patient)], ignore_index=True)
            parts.append(series.assign(study=f"{study}@{share:g}"))
    return pd.concat(parts, ignore_index=True) if parts else scored.iloc[:0]


def diluted_at(scored: pd.DataFrame, shares: Sequence[float], seed: int) -> pd.DataFrame:
    """Every scan diluted at each share (:func:`diluted_series`, seeded ``seed + i`` for the i-th share)."""
    parts = [diluted_series(scored, s, seed + i) for i, s in enumerate(shares)]
    return pd.concat(parts, ignore_index=True) if parts else scored.iloc[:0]


def with_diluted(scored: pd.DataFrame, shares: Sequence[float], seed: int) -> pd.DataFrame:
    """``scored``'s own scans and, for each share, every scan diluted."""
    return pd.concat([scored, diluted_at(scored, shares, seed)], ignore_index=True)


def choose_top_slices(val: pd.DataFrame) -> TopSlices:
    """The aggregation that ranks the validation studies best (AUC)."""
    aucs = {top: binary_metrics(*_labels_scores(study_scores(val, top)))["auc"] for top in TOP_SLICES_CANDIDATES}
    return max(TOP_SLICES_CANDIDATES, key=aucs.__getitem__)


def _labels_scores(studies: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return studies["label"].to_numpy(), studies["probability"].to_numpy(dtype=float)
