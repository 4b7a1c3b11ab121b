"""Who is who: the patient ids each dataset ships (COVID-CT's metadata, the lung set's manifest),
patients in two splits, and patient ids that hold one scan (linked by perceptual hash)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from covidct.datasets import SPLITS, DatasetError
from covidct.hygiene.fingerprints import hamming_distances


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], path: Path) -> pd.DataFrame:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetError(f"{path}: column {missing[0]!r} is missing (has: {', '.join(map(str, frame.columns))})")
    return frame


def covid_ct_patients(root: Path) -> pd.DataFrame:
    """Patient id of every COVID-CT image (relpath, patient_id) from the meta files the dataset ships.

    ``meta/COVID-CT-MetaInfo.xlsx`` names COVID images, 83 of them without their ``.png``,
    so it is matched on the file stem; ``meta/NonCOVID-CT-MetaInfo.csv`` names NonCOVID images.
    """
    covid_meta, noncovid_meta = root / "meta" / "COVID-CT-MetaInfo.xlsx", root / "meta" / "NonCOVID-CT-MetaInfo.csv"
    for path in (covid_meta, noncovid_meta):
        if not path.is_file():
            raise DatasetError(f"{path}: patient meta file not found")
    # A row without a patient id is dropped (its image counts as unknown), never read as patient "nan".
    covid = _require_columns(pd.read_excel(covid_meta), ["File name", "Patient ID"], covid_meta).dropna(
        subset=["File name", "Patient ID"]
    )
    covid = pd.DataFrame(
        {
            "relpath": "CT_COVID/" + covid["File name"].astype(str).str.strip().str.removesuffix(".png") + ".png",
            "patient_id": covid["Patient ID"].astype(str).str.strip(),
        }
    )
    noncovid = _require_columns(pd.read_csv(noncovid_meta), ["image name", "patient id"], noncovid_meta).dropna(
        subset=["image name", "patient id"]
    )
    noncovid = pd.DataFrame(
        {
            "relpath": "CT_NonCOVID/" + noncovid["image name"].astype(str).str.strip(),
            "patient_id": noncovid["patient id"].astype(str).str.strip(),
        }
    )
    return pd.concat([covid, noncovid], ignore_index=True)


def noncovid_split_lists(root: Path) -> pd.DataFrame:
    """The official NonCOVID patient lists ``meta/CT_NonCOVID_{split}_id.csv`` as (patient_id, split) rows."""
    frames = []
    for split in SPLITS:
        path = root / "meta" / f"CT_NonCOVID_{split}_id.csv"
        if not path.is_file():
            raise DatasetError(f"{path}: patient list not found")
        ids = _require_columns(pd.read_csv(path), ["patient id"], path)["patient id"].dropna().astype(str).str.strip()
        frames.append(pd.DataFrame({"patient_id": ids, "split": split}))
    return pd.concat(frames, ignore_index=True)


def patient_overlap(rows: pd.DataFrame) -> pd.DataFrame:
    """Patients found in more than one split: patient_id, splits ("train+test") and images per split."""
    counts = rows.dropna(subset=["patient_id"]).groupby(["patient_id", "split"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=[s for s in SPLITS if s in counts.columns])
    shared = counts[(counts > 0).sum(axis=1) > 1]
    return pd.DataFrame(
        {
            "patient_id": shared.index.astype(str),
            "splits": ["+".join(s for s in shared.columns if row[s] > 0) for _, row in shared.iterrows()],
            "images": [
                "; ".join(f"{s} {int(row[s])}" for s in shared.columns if row[s] > 0) for _, row in shared.iterrows()
            ],
        }
    )


def linked_patients(patient_ids: Sequence[str], hashes: np.ndarray, distance: int) -> dict[str, str]:
    """Patient -> its group: two ids are one group when a slice of one is within ``distance``
    pHash bits of a slice of the other. CC-CCII files some scans under two patient ids (e.g.
    CP_1775 and CP_3636: the same slices 2 bits apart, one of them windowed differently); a
    split by id alone would put the one scan on both sides. A group is named by its ids, joined by +."""
    ids = np.asarray(patient_ids, dtype=object)
    names, index = np.unique(ids, return_inverse=True)
    first, second = np.nonzero(hamming_distances(hashes) <= distance)
    graph = sparse.coo_matrix((np.ones(len(first)), (index[first], index[second])), shape=(len(names), len(names)))
    _, component = connected_components(graph, directed=False)
    members: dict[int, list[str]] = {}
    for name, c in zip(names, component, strict=True):
        members.setdefault(int(c), []).append(str(name))
    return {name: "+".join(members[int(c)]) for name, c in zip(names, component, strict=True)}


def lung_patients(split_table: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """The lung split's slices with their patient taken from ``manifest.csv`` (not from the split
    table, which could have been edited); a slice the manifest does not know is an error."""
    patient_of = manifest.set_index("id")["patient_id"].astype(str)
    unknown = split_table.loc[~split_table["id"].isin(patient_of.index), "id"]
    if not unknown.empty:
        raise DatasetError(f"lung split: slice {unknown.iloc[0]!r} is not in manifest.csv ({len(unknown)} such)")
    out = split_table[["id", "image", "split"]].rename(columns={"image": "relpath"}).copy()
    out["patient_id"] = split_table["id"].map(patient_of).to_numpy()
    return out


# ---------------------------------------------------------------- one dataset's audit
