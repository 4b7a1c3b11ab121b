"""Stage prepare_data: verified copies of the lung set and of every declared source, and their
split tables (one per source, the columns of covidct.catalog)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from covidct.atomic import write_text_atomic
from covidct.catalog import split_path
from covidct.config import CcCciiSplitConfig, DataConfig, LungSplitConfig, SourceConfig, declared_sources
from covidct.datasets import (
    LUNG_SEG,
    SPLIT_COLUMNS,
    DatasetError,
    copy_verified,
    covid_ct_split,
    lung_split,
    manifest_split,
    patient_split,
    verify_checksums,
)
from covidct.hygiene.fingerprints import fingerprint_images
from covidct.hygiene.patients import covid_ct_patients, linked_patients
from covidct.paths import LUNG_SPLIT, RAW


def _manifest(root: Path, name: str) -> pd.DataFrame:
    path = root / "manifest.csv"
    if not path.is_file():
        raise DatasetError(f"{path}: manifest not found (sources.{name}.split is manifest or patients: it needs one)")
    return pd.read_csv(path)


def make_split(
    root: Path, name: str, source: SourceConfig, data: DataConfig, patients: CcCciiSplitConfig
) -> pd.DataFrame:
    """The split table of the dataset at ``root``, made the way ``source.split`` says; its
    relpaths hold for the verified copy too."""
    if source.split == "lists":
        table = covid_ct_split(root, data.subset_per_class)
        ids = covid_ct_patients(root).drop_duplicates("relpath").set_index("relpath")["patient_id"]
        patient = table["relpath"].map(ids).fillna(table["relpath"]).astype(str)  # no id: the image is its own patient
        subclass = table["relpath"].str.split("/").str[0]
        table = table.assign(label=subclass.isin(source.covid).astype(int), patient=patient, scan=patient)
        return table.assign(subclass=subclass)[list(SPLIT_COLUMNS)]
    manifest = _manifest(root, name)
    if source.split == "manifest":
        return manifest_split(manifest, source, data.subset_per_class, root / "manifest.csv")
    _, hashes = fingerprint_images([root / f for f in manifest["file"]], f"fingerprint {name}")
    groups = linked_patients(manifest[source.patient].astype(str).tolist(), hashes, patients.link_distance)
    linked = sorted({g for g in groups.values() if "+" in g})
    print(
        f"{name}: {len(linked)} group(s) of patient ids holding one scan, kept in one split: {', '.join(linked) or 'none'}"
    )
    return patient_split(
        manifest,
        source,
        patients.val_fraction,
        patients.test_fraction,
        patients.seed,
        data.subset_per_class,
        groups,
        root / "manifest.csv",
    )


def run(params: dict[str, Any], root: Path) -> None:
    data, lung_config, patients = (
        DataConfig.of(params),
        LungSplitConfig.of(params),
        CcCciiSplitConfig.of(params),
    )
    declared = declared_sources(params)
    source_dir = (root / data.source_dir).resolve()
    for name in (LUNG_SEG, *declared):  # an altered or missing file stops the stage before any output is replaced
        verify_checksums(source_dir / name)
    # so does a split list or manifest that is wrong: every split is made from the verified source first
    tables = {name: make_split(source_dir / name, name, source, data, patients) for name, source in declared.items()}
    for name in (LUNG_SEG, *declared):
        count = copy_verified(source_dir / name, root / RAW / name)
        print(f"{name}: {count} files verified against SHA256SUMS and copied to {RAW / name}")
    manifest = pd.read_csv(root / RAW / LUNG_SEG / "manifest.csv")
    lung = lung_split(
        manifest, lung_config.test_slices, lung_config.val_slices, lung_config.seed, data.lung_subset_per_patient
    )
    write_text_atomic(root / LUNG_SPLIT, lung.to_csv(index=False))
    summary = lung.groupby("split").agg(slices=("id", "size"), patients=("patient_id", "nunique"))
    print("lung-seg slices and patients per split:\n" + summary.to_string())
    for name, table in tables.items():
        write_text_atomic(root / split_path(name), table.to_csv(index=False))
        summary = table.groupby(["split", "subclass"]).agg(
            slices=("relpath", "size"), patients=("patient", "nunique"), scans=("scan", "nunique")
        )
        print(f"{declared[name].title}: slices, patients and scans per split and class:\n" + summary.to_string())
