"""The raw datasets: checksum verification, the official COVID-CT split, and patient-level
splits of the lung set and of CC-CCII.

Split tables use paths relative to each dataset's root, so the same table serves the
verified copy under ``data/raw`` and, for the crops, the cropped copy of the images.
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from covidct.config import SourceConfig

COVID_CT = "covid-ct"
LUNG_SEG = "lung-seg"
CC_CCII = "cc-ccii"
CLASS_DIRS = {"CT_COVID": 1, "CT_NonCOVID": 0}  # COVID is the positive class
SPLITS = ("train", "val", "test")
#: Every labelled source's split table holds these (covidct.catalog reads them); label 1 = COVID-19.
SPLIT_COLUMNS = ("relpath", "label", "split", "patient", "scan", "subclass")


class DatasetError(ValueError):
    """A dataset file that is missing, altered or inconsistent; the message names it."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checksums(root: Path) -> dict[str, str]:
    sums = root / "SHA256SUMS"
    if not sums.is_file():
        raise DatasetError(f"{sums}: checksum list not found (is data.source_dir right?)")
    entries: dict[str, str] = {}
    for line_no, line in enumerate(sums.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise DatasetError(f"{sums}:{line_no}: not a 'sha256  path' line")
        entries[name.lstrip("*")] = digest
    return entries


def verify_checksums(root: Path) -> int:
    """Check every file listed in ``root/SHA256SUMS``; return how many were checked.

    Fails on the first missing or altered file so a partial download or an edited
    image never reaches training silently.
    """
    entries = read_checksums(root)
    for name, expected in entries.items():
        path = root / name
        if not path.is_file():
            raise DatasetError(f"{path}: listed in SHA256SUMS but missing")
        if _sha256(path) != expected:
            raise DatasetError(f"{path}: sha256 does not match SHA256SUMS (file altered or truncated)")
    return len(entries)


def copy_verified(source: Path, dest: Path) -> int:
    """Copy a dataset (the files SHA256SUMS lists, plus that list) into ``dest``, verified.

    The copy goes to a sibling temp folder that is renamed at the end, so an interrupted
    copy never leaves a half-filled ``dest``.
    """
    count = verify_checksums(source)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in [*read_checksums(source), "SHA256SUMS"]:
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, target)
    for extra in ("PROVENANCE.md", "manifest.csv"):
        if (source / extra).is_file() and not (tmp / extra).exists():
            shutil.copy2(source / extra, tmp / extra)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return count


def covid_ct_split(root: Path, subset_per_class: int = 0) -> pd.DataFrame:
    """The official patient-level split (``Data-split/*.txt``) as a table: relpath, label, split.

    Every listed image must exist and appear in exactly one list.
    """
    rows = []
    for split in SPLITS:
        for class_dir, label in CLASS_DIRS.items():
            split_list = root / "Data-split" / f"{split}{class_dir}.txt"
            if not split_list.is_file():
                raise DatasetError(f"{split_list}: split list not found")
            names = [n.strip() for n in split_list.read_text(encoding="utf-8").splitlines() if n.strip()]
            for name in names:
                relpath = f"{class_dir}/{name}"
                if not (root / relpath).is_file():
                    raise DatasetError(f"{split_list}: names {name!r}, but {root / relpath} does not exist")
                rows.append({"relpath": relpath, "label": label, "split": split})
    table = pd.DataFrame(rows)
    duplicated = table[table["relpath"].duplicated()]
    if not duplicated.empty:
        raise DatasetError(f"{root / 'Data-split'}: {duplicated['relpath'].iloc[0]} appears in more than one list")
    return take_per_group(table, ["split", "label"], subset_per_class)


def take_per_group(table: pd.DataFrame, by: list[str], n: int) -> pd.DataFrame:
    """The first ``n`` rows of each group (all rows when ``n`` is 0): small, balanced quick-look sets."""
    if n:
        table = table.groupby(by, sort=False).head(n)
    return table.reset_index(drop=True)


def _closest_subset(sizes: dict[str, int], target: int, rng: np.random.Generator, leave: int) -> list[str]:
    """Patients whose slice count sums closest to ``target`` (ties broken at random),
    leaving at least ``leave`` patients for the other splits."""
    names = list(sizes)
    best: list[tuple[str, ...]] = []
    best_gap = None
    # Up to 4 patients per subset: exact for ~100-slice targets (70 slices is the largest patient).
    for k in range(1, min(4, len(names) - leave) + 1):
        for combo in itertools.combinations(names, k):
            gap = abs(sum(sizes[n] for n in combo) - target)
            if best_gap is None or gap < best_gap:
                best, best_gap = [combo], gap
            elif gap == best_gap:
                best.append(combo)
    return list(best[int(rng.integers(len(best)))])


def lung_split(
    manifest: pd.DataFrame, test_slices: int, val_slices: int, seed: int, subset_per_patient: int = 0
) -> pd.DataFrame:
    """Split the lung set by ``patient_id`` (never by slice): about ``test_slices`` test slices
    and ``val_slices`` validation slices from patients seen nowhere else; the rest trains.
    """
    for column in ("id", "patient_id"):
        if column not in manifest.columns:
            raise DatasetError(f"manifest.csv: column {column!r} is missing")
    rng = np.random.default_rng(seed)
    sizes = manifest.groupby("patient_id").size().to_dict()
    if len(sizes) < 3:
        raise DatasetError(f"manifest.csv: needs >= 3 patients for train/val/test, found {len(sizes)}")
    test = _closest_subset(sizes, test_slices, rng, leave=2)
    rest = {p: n for p, n in sizes.items() if p not in test}
    val = _closest_subset(rest, val_slices, rng, leave=1)
    split_of = {p: "test" for p in test} | {p: "val" for p in val}
    table = manifest[["id", "patient_id"]].copy()
    table["split"] = table["patient_id"].map(split_of).fillna("train")
    table["image"] = "images/" + table["id"] + ".png"
    table["mask"] = "masks/" + table["id"] + ".png"
    return take_per_group(table, ["patient_id"], subset_per_patient)


def _require(manifest: pd.DataFrame, columns: list[str], where: Path | str) -> None:
    missing = [c for c in columns if c not in manifest.columns]
    if missing:
        raise DatasetError(f"{where}: column {missing[0]!r} is missing (has: {', '.join(map(str, manifest.columns))})")


def _labels(classes: pd.Series, covid: tuple[str, ...]) -> pd.Series:
    return classes.astype(str).isin(covid).astype(int)


def patient_split(
    manifest: pd.DataFrame,
    source: SourceConfig,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    subset_per_class: int = 0,
    groups: dict[str, str] | None = None,
    where: Path | str = "manifest.csv",
) -> pd.DataFrame:
    """A split made here, by patient, never by slice (a CC-CCII patient gives up to ~230
    neighbouring slices), stratified by class so each split holds every class's patients.
    ``groups`` maps a patient id to a group of ids that are one patient
    (``covidct.hygiene.linked_patients``); a group goes to one split whole and is the ``patient``.
    """
    _require(manifest, ["file", source.classes, source.patient, source.scan], where)
    rng = np.random.default_rng(seed)
    ids = manifest[source.patient].astype(str)
    table = pd.DataFrame(
        {
            "relpath": manifest["file"],
            "label": _labels(manifest[source.classes], source.covid),
            "patient": ids.map(groups or {}).fillna(ids),
            "scan": manifest[source.scan].astype(str),
            "subclass": manifest[source.classes].astype(str),
        }
    )
    split_of: dict[str, str] = {}
    for subclass, rows in table.groupby("subclass", sort=True):
        patients = sorted(set(rows["patient"]) - set(split_of))
        if len(patients) < 3:
            raise DatasetError(
                f"{where}: class {subclass} needs >= 3 patients for train/val/test, found {len(patients)}"
            )
        order = [patients[i] for i in rng.permutation(len(patients))]
        n_test = max(1, round(test_fraction * len(order)))
        n_val = max(1, round(val_fraction * len(order)))
        split_of |= {p: "test" for p in order[:n_test]} | {p: "val" for p in order[n_test : n_test + n_val]}
        split_of |= {p: "train" for p in order[n_test + n_val :]}
    table = table.assign(split=table["patient"].map(split_of))[list(SPLIT_COLUMNS)]
    return take_per_group(table, ["split", "subclass"], subset_per_class)


def manifest_split(
    manifest: pd.DataFrame, source: SourceConfig, subset_per_class: int = 0, where: Path | str = "manifest.csv"
) -> pd.DataFrame:
    """A split the dataset ships in its manifest (``split`` column), used as given: re-splitting by
    slice would put neighbouring slices of one scan on both sides."""
    _require(manifest, ["file", "split", source.classes, source.patient, source.scan], where)
    unknown = sorted(set(manifest["split"].astype(str)) - set(SPLITS))
    if unknown:
        raise DatasetError(f"{where}: split {unknown[0]!r} is not one of {', '.join(SPLITS)}")
    table = pd.DataFrame(
        {
            "relpath": manifest["file"],
            "label": _labels(manifest[source.classes], source.covid),
            "split": manifest["split"].astype(str),
            "patient": manifest[source.patient].astype(str),
            "scan": manifest[source.scan].astype(str),
            "subclass": manifest[source.classes].astype(str),
        }
    )
    if table["label"].nunique() < 2:
        raise DatasetError(f"{where}: needs COVID ({', '.join(source.covid)}) and non-COVID classes, found one")
    return take_per_group(table, ["split", "label"], subset_per_class)
