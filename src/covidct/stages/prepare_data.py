"""Stage prepare_data: verified copies of the three datasets and their split tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from covidct.atomic import write_text_atomic
from covidct.config import section
from covidct.datasets import (
    CC_CCII,
    COVID_CT,
    LUNG_SEG,
    cc_ccii_split,
    copy_verified,
    covid_ct_split,
    lung_split,
)
from covidct.hygiene.fingerprints import fingerprint_images
from covidct.hygiene.patients import linked_patients
from covidct.paths import RAW, SPLITS


def run(params: dict[str, Any], root: Path) -> None:
    data, split_config, cc_config = (
        section(params, "data"),
        section(params, "lung_split"),
        section(params, "cc_ccii_split"),
    )
    source = (root / data.source_dir).resolve()
    covid_ct_split(
        source / COVID_CT
    )  # a split list naming a missing image stops the stage before any output is replaced
    for name in (COVID_CT, LUNG_SEG, CC_CCII):
        count = copy_verified(source / name, root / RAW / name)
        print(f"{name}: {count} files verified against SHA256SUMS and copied to {RAW / name}")
    covid = covid_ct_split(root / RAW / COVID_CT, data.subset_per_class)
    manifest = pd.read_csv(root / RAW / LUNG_SEG / "manifest.csv")
    lung = lung_split(
        manifest, split_config.test_slices, split_config.val_slices, split_config.seed, data.lung_subset_per_patient
    )
    cc_manifest = pd.read_csv(root / RAW / CC_CCII / "manifest.csv")
    _, hashes = fingerprint_images([root / RAW / CC_CCII / f for f in cc_manifest["file"]], "fingerprint cc-ccii")
    groups = linked_patients(cc_manifest["patient_id"].astype(str).tolist(), hashes, cc_config.link_distance)
    cc = cc_ccii_split(
        cc_manifest, cc_config.val_fraction, cc_config.test_fraction, cc_config.seed, data.subset_per_class, groups
    )
    write_text_atomic(root / SPLITS / "covid_ct.csv", covid.to_csv(index=False))
    write_text_atomic(root / SPLITS / "lung_seg.csv", lung.to_csv(index=False))
    write_text_atomic(root / SPLITS / "cc_ccii.csv", cc.to_csv(index=False))
    print("COVID-CT images per split and label:\n" + covid.groupby(["split", "label"]).size().to_string())
    summary = lung.groupby("split").agg(slices=("id", "size"), patients=("patient_id", "nunique"))
    print("lung-seg slices and patients per split:\n" + summary.to_string())
    summary = cc.groupby(["split", "cc_ccii_class"]).agg(
        slices=("relpath", "size"), patients=("patient_id", "nunique"), scans=("scan_id", "nunique")
    )
    linked = sorted({g for g in groups.values() if "+" in g})
    print(
        f"CC-CCII: {len(linked)} group(s) of patient ids holding one scan, kept in one split: {', '.join(linked) or 'none'}"
    )
    print("CC-CCII slices, patients and scans per split and class:\n" + summary.to_string())
