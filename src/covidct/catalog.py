"""The labelled sources, each declared once under ``sources:`` in params.yaml, and the one loader
every stage, the audit, levers, sweeps and the registry read a source's split through.

A source's split table (``data/splits/<name>.csv``, written by prepare_data) holds the same
columns whatever the dataset: ``relpath`` under its verified copy, ``label`` (1 = COVID-19),
``split``, ``patient`` (the unit a bootstrap resamples), ``scan`` (a study verdict's unit) and
``subclass`` (the dataset's own class name, e.g. CC-CCII's NCP / CP / Normal). A fourth source is
one more entry in params.yaml and a folder with a SHA256SUMS and a manifest.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from covidct.datasets import SPLIT_COLUMNS, DatasetError
from covidct.paths import SPLITS, raw


def split_path(name: str) -> Path:
    """Where prepare_data writes a source's split table, relative to the repo root."""
    return SPLITS / f"{name.replace('-', '_')}.csv"


def load_source(root: Path, name: str) -> pd.DataFrame:
    """One source's split table with ``source`` and ``path`` (its image under data/raw) added."""
    path = root / split_path(name)
    if not path.is_file():
        raise DatasetError(f"{path}: split table not found (run `dvc repro prepare_data`)")
    table = pd.read_csv(path, dtype={"patient": str, "scan": str, "subclass": str})
    missing = [c for c in SPLIT_COLUMNS if c not in table.columns]
    if missing:
        raise DatasetError(f"{path}: column {missing[0]!r} is missing (written by an older prepare_data? re-run it)")
    return table.assign(source=name, path=[str(root / raw(name) / p) for p in table["relpath"]])
