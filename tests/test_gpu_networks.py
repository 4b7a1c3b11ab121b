"""Every network the GPU profiles and the full sweep name is built and trained for one step on the
CPU, through the stages' own training functions (``pretrained: none``: no hub here), so a GPU
user's first ``covidct profile paper && dvc repro`` or sweep does not meet a network that breaks.
The sizes are each model's own (timm's data config), as the sweep would run them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml

from covidct.checkpoints import load_checkpoint
from covidct.classification.data import resize_for_classifier
from covidct.classification.train import train_classifier
from covidct.config import ClassifierConfig, PreprocessConfig, SegmenterConfig, load_params
from covidct.images import read_grayscale, read_mask
from covidct.profiles import apply_profile
from covidct.segmentation.inputs import segmenter_input
from covidct.segmentation.train import train_segmenter
from helpers.paths import DATA, REPO

pytestmark = [pytest.mark.slow, pytest.mark.data]

SWEEP = yaml.safe_load((REPO / "pipelines/sweeps/gpu-full.yaml").read_text())
SWEPT = SWEEP["space"]["classifier.model"]["choices"]
TWO_SCANS = [DATA / "covid-ct" / "CT_COVID" / "kjr-21-e25-p1-6.png", DATA / "covid-ct" / "CT_NonCOVID" / "0.jpg"]
TWO_SLICES = ["coronacases_001_101", "radiopaedia_10_85902_1_009"]


def _profile(tmp_path: Path, name: str) -> dict:
    """params.yaml with the profile merged in, as `covidct profile <name>` leaves it."""
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "profiles").symlink_to(REPO / "pipelines" / "profiles")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    apply_profile(tmp_path, name)
    return load_params(tmp_path / "params.yaml")


def _native_size(name: str) -> int:
    return int(
        timm.data.resolve_model_data_config(timm.create_model(name, pretrained=False, num_classes=1))["input_size"][-1]
    )


def _one_step(config: ClassifierConfig, tmp_path: Path) -> None:
    images = np.stack([resize_for_classifier(read_grayscale(p), config.image_size) for p in TWO_SCANS])
    labels = np.array([1.0, 0.0], dtype=np.float32)
    history = train_classifier(
        (images, labels),
        (images, labels),
        config,
        torch.device("cpu"),
        tmp_path / "model.safetensors",
        {"model": config.model},
    )
    assert len(history) == 1 and np.isfinite(history["train_loss"]).all() and np.isfinite(history["val_loss"]).all()
    state, meta = load_checkpoint(tmp_path / "model.safetensors", torch.device("cpu"), "test")
    assert meta["model"] == config.model and all(
        torch.isfinite(t).all() for t in state.values() if t.is_floating_point()
    )


@pytest.mark.parametrize("name", SWEPT)
def test_every_swept_efficientnet_trains_a_step_at_its_own_size(name: str, tmp_path: Path) -> None:
    base = ClassifierConfig.of(load_params(REPO / "params.yaml"))
    size = _native_size(name)
    config = ClassifierConfig(
        **{**base.__dict__, "model": name, "pretrained": "none", "image_size": size, "epochs": 1, "batch_size": 2}
    )
    _one_step(config, tmp_path)


@pytest.mark.parametrize("profile", ["paper", "gpu"])
def test_the_gpu_profiles_classifier_trains_a_step(profile: str, tmp_path: Path) -> None:
    config = ClassifierConfig.of(_profile(tmp_path, profile))
    assert (config.model, config.image_size) == ("efficientnet_b4", 320)
    _one_step(ClassifierConfig(**{**config.__dict__, "pretrained": "none", "epochs": 1, "batch_size": 2}), tmp_path)


def test_the_paper_size_segmenter_trains_a_step(tmp_path: Path) -> None:
    params = _profile(tmp_path, "paper")
    config, pre = SegmenterConfig.of(params), PreprocessConfig.of(params)
    assert config.channels == (16, 32, 64, 128, 256)
    lung = DATA / "lung-seg"
    images = np.stack(
        [segmenter_input(read_grayscale(lung / "images" / f"{s}.png"), pre.size, pre.clahe_clip) for s in TWO_SLICES]
    )
    masks = np.stack([read_mask(lung / "masks" / f"{s}.png") for s in TWO_SLICES])
    one = SegmenterConfig(**{**config.__dict__, "epochs": 1, "batch_size": 2})
    history = train_segmenter(
        (images, masks),
        (images, masks),
        one,
        torch.device("cpu"),
        tmp_path / "segmenter.safetensors",
        {"channels": list(one.channels)},
    )
    assert len(history) == 1 and np.isfinite(history["train_loss"]).all() and 0.0 <= history["val_dice"].iloc[0] <= 1.0


def test_the_full_sweep_validates() -> None:
    from covidct.sweep.config import load_sweep

    sweep = load_sweep(REPO / "pipelines/sweeps/gpu-full.yaml")
    assert sweep.study == "gpu-full" and len(SWEPT) == 8
