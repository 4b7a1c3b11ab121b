"""Crops at an experiment's own crop settings (``crop.*``), so a sweep trial or a lever run that
changes the margin trains on pixels that margin made, never silently on the crop stage's."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from covidct.catalog import load_source
from covidct.config import CropConfig, declared_sources
from covidct.experiments.cache import CACHE, cache_key, get_or_build
from covidct.lung_crop import crop_dataset
from covidct.paths import CROPS, SEGMENTER, raw
from covidct.segmentation.model import load_segmenter


def crops_for(
    root: Path, base: dict[str, Any], params: dict[str, Any], device: torch.device
) -> tuple[Path, bool, float]:
    """The crop stage's folder when ``params``' crop settings are ``base``'s (params.yaml's); else
    every declared source cropped again by the pipeline's segmenter at those settings, kept for the
    next experiment that asks. Returns the folder, whether it was reused, and the seconds spent."""
    crop, segmenter = CropConfig.of(params), root / SEGMENTER
    if crop == CropConfig.of(base) and (root / CROPS).is_dir():
        return root / CROPS, True, 0.0
    if not segmenter.is_file():
        raise FileNotFoundError(
            f"{segmenter}: crops at other crop settings are made with the pipeline's segmenter; "
            "run `dvc repro train_segmenter` first"
        )
    sources = declared_sources(params)
    weights = hashlib.sha256(segmenter.read_bytes()).hexdigest()
    key = cache_key({"segmenter": weights, "crop": crop.model_dump(), "sources": list(sources)})

    def build(out: Path) -> None:
        model, meta = load_segmenter(segmenter, device)
        for name in sources:
            crop_dataset(load_source(root, name), root / raw(name), out, model, meta, crop, device, name)

    return get_or_build(root / CACHE, "source-crops", key, build)
