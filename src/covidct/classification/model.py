"""The EfficientNet classifier, reached by name through timm, and how it is rebuilt from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch

from covidct.checkpoints import load_checkpoint


def build_classifier(name: str) -> torch.nn.Module:
    """A timm model with one logit (COVID); randomly initialised: hub weights cannot be fetched offline."""
    return timm.create_model(name, pretrained=False, num_classes=1)


def normalisation(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the model says it wants, rather than constants in the caller."""
    data_config = timm.data.resolve_model_data_config(model)
    return tuple(data_config["mean"]), tuple(data_config["std"])


def load_classifier(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network in eval mode, and its meta (variant, input size, normalisation, epoch)."""
    state, meta = load_checkpoint(path, device, "train_classifier")
    model = build_classifier(meta["model"]).to(device)
    model.load_state_dict(state)
    return model.eval(), meta
