"""The EfficientNet classifier, reached by name through timm, and its checkpoint format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch

from covidct.atomic import atomic_path


def build_classifier(name: str) -> torch.nn.Module:
    """A timm model with one logit (COVID); randomly initialised: hub weights cannot be fetched offline."""
    return timm.create_model(name, pretrained=False, num_classes=1)


def normalisation(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the model says it wants, rather than constants in the caller."""
    data_config = timm.data.resolve_model_data_config(model)
    return tuple(data_config["mean"]), tuple(data_config["std"])


def save_classifier(path: Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)


def load_classifier(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: classifier checkpoint not found (run the train_classifier stage)")
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    meta = checkpoint["meta"]
    model = build_classifier(meta["model"]).to(device)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return model, meta
