"""Configs for unit tests. A config dataclass has no defaults (params.yaml and the profiles are
the only recipe), so the tests state every key here once, the paper's settings where it has
one, and each test changes only what it is about. Built through the same validating reader as
params.yaml, so a test config can never be one the stages would refuse."""

from __future__ import annotations

import copy
from typing import Any

from covidct.config import SECTIONS

BASE: dict[str, dict[str, Any]] = {
    "preprocess": {"size": 256, "clahe_clip": 7.0},
    "crop": {"margin": 5, "min_lung_fraction": 0.02, "keep_components": 2, "batch_size": 16},
    "segmenter": {
        "channels": [8, 16, 32, 64, 128],
        "epochs": 10,
        "batch_size": 8,
        "lr": 1e-3,
        "tversky_alpha": 0.7,
        "tversky_beta": 0.3,
        "tversky_gamma": 1.3,
        "augment": True,
        "precision": "auto",
        "seed": 0,
    },
    "classifier": {
        "model": "efficientnet_b0",
        "image_size": 224,
        "epochs": 25,
        "batch_size": 16,
        "lr": 1e-4,
        "schedule": "constant",
        "class_weight": "none",
        "head_init": "timm",
        "tta": False,
        "ema_decay": 0.0,
        "select_metric": "auc",
        "augment": {
            "scale": 0.1,
            "rotate": 5.0,
            "hflip": 0.5,
            "translate": 0.0,
            "brightness_contrast": 0.0,
            "downscale": 0.0,
            "jpeg_quality": 0,
            "mixup": 0.0,
            "cutmix": 0.0,
        },
        "pretrained": "none",
        "sources": ["covid-ct"],
        "cc_ccii_per_scan": 0,
        "lung_mask": False,
        "standardise": False,
        "equalise": False,
        "source_batchnorm": False,
        "precision": "auto",
        "seed": 0,
    },
    "evaluate": {"threshold": 0.5, "val_recall_floor": 0.9, "n_bootstrap": 1000, "seed": 0},
}


def yaml_like(value: Any) -> Any:
    """Tuples as the lists YAML would give."""
    if isinstance(value, dict):
        return {k: yaml_like(v) for k, v in value.items()}
    return [yaml_like(v) for v in value] if isinstance(value, tuple) else value


def make_config(name: str, **changes: Any) -> Any:
    """The validated config of section ``name`` with ``changes``; ``augment`` may be a partial mapping."""
    raw = copy.deepcopy(BASE[name])
    for key, value in yaml_like(changes).items():
        raw[key] = raw[key] | value if isinstance(value, dict) else value
    return SECTIONS[name].of({name: raw})


def augment(**changes: Any) -> Any:
    """The classifier's augmentation settings with ``changes``."""
    return make_config("classifier", augment=changes).augment
