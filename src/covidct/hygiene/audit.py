"""One dataset's audit (patients and pictures across its splits) and the verdict on a leak."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidct.datasets import SPLITS, DatasetError
from covidct.hygiene.fingerprints import fingerprint_images, hamming_distances
from covidct.hygiene.pairs import (
    IDENTICAL_FILE,
    IDENTICAL_PIXELS,
    NEAR_DUPLICATE,
    cross_split_pairs,
    nearest_pairs,
    pair_key,
    within_split_identical,
)
from covidct.hygiene.patients import patient_overlap


class LeakageError(DatasetError):
    """A patient or a picture in more than one split that params.yaml does not allow; the message names it."""


# ---------------------------------------------------------------- image fingerprints


@dataclass
class DatasetAudit:
    """What the audit found in one dataset; ``duplicates`` and ``patients`` are the leaks."""

    name: str
    images: pd.DataFrame  # relpath, split, label, patient_id and fingerprints
    patients: pd.DataFrame  # patients in more than one split (patient_overlap)
    duplicates: pd.DataFrame  # cross-split pairs with a kind, and whether params.yaml allows them
    closest: pd.DataFrame  # the closest cross-split pairs that are not duplicates, for a human to look at
    min_distance: int = -1  # smallest pHash distance between two splits (-1: fewer than two splits)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        by_split = self.images.groupby("split")
        unallowed = self.duplicates[~self.duplicates["allowed"]] if len(self.duplicates) else self.duplicates
        known = self.images["patient_id"].notna()
        labels_differ = (
            self.duplicates["label_a"].astype(str) != self.duplicates["label_b"].astype(str)
            if len(self.duplicates)
            else []
        )
        return {
            "images": len(self.images),
            "images_per_split": {s: int(by_split.size().get(s, 0)) for s in SPLITS},
            "patients": int(self.images["patient_id"].nunique()),
            "patients_per_split": {s: int(by_split["patient_id"].nunique().get(s, 0)) for s in SPLITS},
            "images_without_patient_id": int((~known).sum()),
            "patient_overlap": len(self.patients),
            "identical_file_pairs": int((self.duplicates["kind"] == IDENTICAL_FILE).sum())
            if len(self.duplicates)
            else 0,
            "identical_pixel_pairs": int((self.duplicates["kind"] == IDENTICAL_PIXELS).sum())
            if len(self.duplicates)
            else 0,
            "near_duplicate_pairs": int((self.duplicates["kind"] == NEAR_DUPLICATE).sum())
            if len(self.duplicates)
            else 0,
            "duplicate_pairs_allowed": int(self.duplicates["allowed"].sum()) if len(self.duplicates) else 0,
            "duplicate_pairs_not_allowed": len(unallowed),
            "duplicate_pairs_with_conflicting_labels": int(np.sum(labels_differ)),
            "within_split_identical_images": within_split_identical(self.images),
            "min_cross_split_distance": self.min_distance,
        }


def audit_dataset(
    name: str,
    images: pd.DataFrame,
    near_duplicate_distance: int,
    verify_distance: int,
    min_keypoint_inliers: int,
    allowed_pairs: Iterable[Sequence[str]] = (),
    n_closest: int = 8,
    progress: bool = False,
) -> DatasetAudit:
    """Audit one dataset: ``images`` has relpath, path, split, label and patient_id (None where unknown)."""
    images = images.reset_index(drop=True)
    table, hashes = fingerprint_images([Path(p) for p in images["path"]], f"fingerprint {name}" if progress else None)
    images = pd.concat([images, table], axis=1)
    distances = hamming_distances(hashes)
    pairs = cross_split_pairs(
        images,
        distances,
        near_duplicate_distance,
        verify_distance,
        min_keypoint_inliers,
        progress=f"compare {name}" if progress else None,
    )
    allowed = {pair_key(*pair) for pair in allowed_pairs}
    pairs["allowed"] = [pair_key(a, b) in allowed for a, b in zip(pairs["relpath_a"], pairs["relpath_b"], strict=True)]
    duplicates = (
        pairs[pairs["kind"] != ""].sort_values(["distance", "inliers"], ascending=[True, False]).reset_index(drop=True)
    )
    # For a human to look at: the pairs keypoints found most alike, then the nearest by pHash alone.
    closest = (
        pairs[pairs["kind"] == ""]
        .sort_values(["inliers", "distance"], ascending=[False, True])
        .head(n_closest - n_closest // 3)
    )
    nearest = nearest_pairs(images, distances, n_closest - len(closest), exclude=pd.concat([duplicates, closest]))
    verified = {
        pair_key(a, b): n for a, b, n in zip(pairs["relpath_a"], pairs["relpath_b"], pairs["inliers"], strict=True)
    }
    nearest["inliers"] = [
        verified.get(pair_key(a, b), -1) for a, b in zip(nearest["relpath_a"], nearest["relpath_b"], strict=True)
    ]
    closest = pd.concat([closest, nearest], ignore_index=True) if len(nearest) else closest.reset_index(drop=True)
    cross = images["split"].to_numpy()[:, None] != images["split"].to_numpy()[None, :]
    min_distance = int(distances[cross].min()) if cross.any() else -1
    audit = DatasetAudit(
        name, images.drop(columns=["path"]), patient_overlap(images), duplicates, closest, min_distance
    )
    present = {pair_key(a, b) for a, b in zip(pairs["relpath_a"], pairs["relpath_b"], strict=True)}
    relpaths = set(images["relpath"])
    for pair in allowed:
        if pair <= relpaths and pair not in present:
            audit.notes.append(
                f"allowed pair {' ~ '.join(sorted(pair))} is no longer a duplicate; it can leave audit.allowed_pairs"
            )
    return audit


def leak_message(audits: Sequence[DatasetAudit], allow_patient_overlap: bool, allow_duplicates: bool) -> str | None:
    """One line naming what leaked and how to accept it, or None when nothing unallowed leaked."""
    parts = []
    for audit in audits:
        if len(audit.patients) and not allow_patient_overlap:
            first = audit.patients.iloc[0]
            parts.append(
                f"{audit.name}: {len(audit.patients)} patient(s) in more than one split (e.g. {first['patient_id']} in {first['splits']})"
            )
        unallowed = audit.duplicates[~audit.duplicates["allowed"]] if len(audit.duplicates) else audit.duplicates
        if len(unallowed) and not allow_duplicates:
            first = unallowed.iloc[0]
            parts.append(
                f"{audit.name}: {len(unallowed)} duplicate image pair(s) across splits (e.g. {first['relpath_a']} [{first['split_a']}] ~ "
                f"{first['relpath_b']} [{first['split_b']}], {first['kind']}, pHash distance {first['distance']})"
            )
    if not parts:
        return None
    return (
        "split leakage: "
        + "; ".join(parts)
        + ". See reports/audit/report.md; accept known pairs in params.yaml audit.allowed_pairs, or set audit.allow_patient_overlap / audit.allow_duplicates"
    )
