"""The images a classifier trains, chooses and is scored on, over every declared source.

Rows of the sources in ``classifier.sources`` are trained on (train split), choose the checkpoint
and threshold (validation split, pooled over those sources) and are scored on their test split;
every other declared source is scored whole, held out: no choice was made on it (the
leave-one-source-out folds of covidct.levers.holdout read those rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidct.catalog import load_source
from covidct.classification.inputs import load_views
from covidct.config import ClassifierConfig, SourceConfig, check_declared
from covidct.paths import CROPS, classifier_inputs, lung_masks

COLUMNS = ["source", "relpath", "label", "split", "patient", "scan", "subclass", "trained"]


def evenly_spaced(table: pd.DataFrame, per_scan: int) -> pd.DataFrame:
    """``per_scan`` slices of each scan, spread over it (neighbouring slices are near-copies, so
    they add time more than evidence); 0 keeps every slice. Relpaths sort in slice order."""
    if per_scan == 0:
        return table
    picks = []
    for _, scan in table.sort_values(["scan", "relpath"]).groupby("scan", sort=True):
        picks.append(scan.iloc[np.unique(np.linspace(0, len(scan) - 1, min(per_scan, len(scan))).round().astype(int))])
    return pd.concat(picks)


def classifier_table(root: Path, config: ClassifierConfig, declared: dict[str, SourceConfig]) -> pd.DataFrame:
    """Every declared source's slices (thinned per scan where declared), with ``trained`` marking
    the sources the classifier learns from; ``patient`` is what a bootstrap resamples."""
    check_declared(declared, config.sources)
    parts = []
    for name, source in declared.items():
        table = load_source(root, name)
        parts.append(evenly_spaced(table, config.cc_ccii_per_scan) if source.thin else table)
    table = pd.concat(parts, ignore_index=True)
    return table.assign(trained=table["source"].isin(config.sources))[COLUMNS]


def load_classifier_inputs(
    root: Path,
    table: pd.DataFrame,
    variant: str,
    config: ClassifierConfig,
    progress: str | None = "decode",
    crops: Path = CROPS,
) -> np.ndarray:
    """Every row's classifier input, in table order. The raw variant is the paper's "without
    segmentation": no lung mask reaches it, so ``lung_mask`` and ``standardise`` apply to crops only.
    ``crops``: where the cropped variant's images are (the crop stage's folder by default)."""
    views = variant == "cropped" and (config.lung_mask or config.standardise)
    parts = []
    for source in table["source"].unique():
        relpaths = table.loc[table["source"] == source, "relpath"]
        masks = lung_masks(root, relpaths, source, crops) if views else None
        parts.append(
            (
                relpaths.index,
                load_views(
                    classifier_inputs(root, relpaths, variant, source, crops),
                    masks,
                    config.image_size,
                    config.lung_mask and views,
                    config.standardise and views,
                    config.equalise,
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
        "equalise": config.equalise,
    }
