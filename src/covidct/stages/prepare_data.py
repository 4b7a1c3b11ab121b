"""Stage prepare_data: verified copies of both datasets and their split tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from covidct.atomic import write_text_atomic
from covidct.config import section
from covidct.datasets import (
    COVID_CT,
    LUNG_SEG,
    copy_verified,
    covid_ct_split,
    lung_split,
)

RAW = Path("data/raw")
SPLITS = Path("data/splits")


def run(params: dict[str, Any], root: Path) -> None:
    data, split_config = section(params, "data"), section(params, "lung_split")
    source = (root / data.source_dir).resolve()
    covid_ct_split(source / COVID_CT)  # a split list naming a missing image stops the stage before any output is replaced
    for name in (COVID_CT, LUNG_SEG):
        count = copy_verified(source / name, root / RAW / name)
        print(f"{name}: {count} files verified against SHA256SUMS and copied to {RAW / name}")
    covid = covid_ct_split(root / RAW / COVID_CT, data.subset_per_class)
    manifest = pd.read_csv(root / RAW / LUNG_SEG / "manifest.csv")
    lung = lung_split(manifest, split_config.test_slices, split_config.val_slices, split_config.seed, data.lung_subset_per_patient)
    write_text_atomic(root / SPLITS / "covid_ct.csv", covid.to_csv(index=False))
    write_text_atomic(root / SPLITS / "lung_seg.csv", lung.to_csv(index=False))
    print("COVID-CT images per split and label:\n" + covid.groupby(["split", "label"]).size().to_string())
    summary = lung.groupby("split").agg(slices=("id", "size"), patients=("patient_id", "nunique"))
    print("lung-seg slices and patients per split:\n" + summary.to_string())
