"""Tiny stand-ins built from real code: untrained networks saved as the stages save theirs, and a
root prepared as `dvc repro prepare_data` leaves it on the tiny profile."""

from __future__ import annotations

from pathlib import Path

from conftest import DATA, REPO


def save_tiny_networks(root: Path) -> tuple[Path, Path]:
    """A small seeded, untrained segmenter and B0 classifier saved as the training stages save
    theirs, for tests of what runs the networks (the registered pipeline, predict, serving)."""
    import torch

    from covidct.checkpoints import save_checkpoint
    from covidct.classification.model import build_classifier, normalisation
    from covidct.segmentation.model import build_segmenter

    torch.manual_seed(0)
    save_checkpoint(
        root / "segmenter.pt",
        build_segmenter([4, 8, 16]),
        {"channels": [4, 8, 16], "size": 64, "clahe_clip": 7.0, "epoch": 1},
    )
    classifier = build_classifier("efficientnet_b0")
    mean, std = normalisation(classifier)
    meta = {
        "model": "efficientnet_b0",
        "image_size": 64,
        "variant": "cropped",
        "epoch": 1,
        "mean": list(mean),
        "std": list(std),
    }
    save_checkpoint(root / "classifier.pt", classifier, meta)
    return root / "segmenter.pt", root / "classifier.pt"


def prepare_tiny_root(root: Path) -> Path:
    """``root`` as `dvc repro prepare_data` leaves it on the tiny profile: params, profiles, data and splits."""
    import shutil

    from covidct.config import load_params
    from covidct.profiles import apply_profile, set_params
    from covidct.stages import prepare_data

    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(REPO / "pipelines" / "profiles", root / "pipelines" / "profiles")
    apply_profile(root, "tiny")
    set_params(root, {"data.source_dir": str(DATA)})
    prepare_data.run(load_params(root / "params.yaml"), root)
    return root
