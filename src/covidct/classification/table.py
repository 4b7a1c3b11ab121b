"""The images a classifier trains, chooses and is scored on, over every labelled source.

Rows of the sources in ``classifier.sources`` are trained on (train split) and choose the
checkpoint and threshold (validation split, pooled over those sources); the other sources'
validation rows are scored too, as held-out evidence no choice was made on. CC-CCII's test
split never enters: only the registered pipeline meets it (the evaluate_sources stage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidct.classification.inputs import load_views
from covidct.config import CLASSIFIER_SOURCES, ClassifierConfig
from covidct.datasets import CC_CCII, COVID_CT
from covidct.paths import CC_CCII_SPLIT, COVID_CT_SPLIT, classifier_inputs, lung_masks

COLUMNS = ["source", "relpath", "label", "split", "patient", "trained"]


def evenly_spaced(table: pd.DataFrame, per_scan: int) -> pd.DataFrame:
    """``per_scan`` slices of each scan, spread over it (neighbouring slices are near-copies, so
    they add time more than evidence); 0 keeps every slice."""
    if per_scan == 0:
        return table
    picks = []
    for _, scan in table.sort_values(["scan_id", "slice"]).groupby("scan_id", sort=True):
        picks.append(scan.iloc[np.unique(np.linspace(0, len(scan) - 1, min(per_scan, len(scan))).round().astype(int))])
    return pd.concat(picks)


def classifier_table(root: Path, config: ClassifierConfig) -> pd.DataFrame:
    """COVID-CT's official split and CC-CCII's train and validation slices, with ``trained``
    marking the sources the classifier learns from and ``patient`` what a bootstrap resamples."""
    covid = pd.read_csv(root / COVID_CT_SPLIT)
    covid = covid.assign(source=COVID_CT, patient=covid["relpath"])  # the official split lists images, not patients
    cc = pd.read_csv(root / CC_CCII_SPLIT).query("split != 'test'")
    cc = evenly_spaced(cc, config.cc_ccii_per_scan).assign(
        source=CC_CCII, patient=lambda t: t["patient_group"].astype(str)
    )
    table = pd.concat([covid, cc], ignore_index=True)
    table = table.assign(trained=table["source"].isin(config.sources))
    # A source's training rows only matter where it is trained on: the rest are never decoded.
    return table[table["trained"] | (table["split"] != "train")].reset_index(drop=True)[COLUMNS]


def load_classifier_inputs(
    root: Path, table: pd.DataFrame, variant: str, config: ClassifierConfig, progress: str | None = "decode"
) -> np.ndarray:
    """Every row's classifier input, in table order. The raw variant is the paper's "without
    segmentation": no lung mask reaches it, so ``lung_mask`` and ``standardise`` apply to crops only."""
    views = variant == "cropped" and (config.lung_mask or config.standardise)
    parts = []
    for source in CLASSIFIER_SOURCES:
        relpaths = table.loc[table["source"] == source, "relpath"]
        if relpaths.empty:
            continue
        masks = lung_masks(root, relpaths, source) if views else None
        parts.append(
            (
                relpaths.index,
                load_views(
                    classifier_inputs(root, relpaths, variant, source),
                    masks,
                    config.image_size,
                    config.lung_mask and views,
                    config.standardise and views,
                    progress,
                ),
            )
        )
    images = np.empty((len(table), config.image_size, config.image_size), dtype=np.uint8)
    for index, block in parts:
        images[table.index.get_indexer(index)] = block
    return images


def checkpoint_meta(config: ClassifierConfig, variant: str) -> dict[str, Any]:
    """What the registered pipeline needs to show a scan as training showed it."""
    views = variant == "cropped"
    return {
        "model": config.model,
        "image_size": config.image_size,
        "variant": variant,
        "sources": list(config.sources),
        "lung_mask": config.lung_mask and views,
        "standardise": config.standardise and views,
    }
