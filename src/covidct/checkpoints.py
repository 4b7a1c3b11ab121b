"""Weights on disk: a state dict plus plain metadata, loaded with ``weights_only=True`` so a
checkpoint can never run code when it is opened."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from covidct.atomic import atomic_path


def save_checkpoint(path: Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)


def load_checkpoint(path: Path, device: torch.device, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``what`` names the producing stage for the error message (e.g. "train_segmenter")."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found (run the {what} stage)")
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    return checkpoint["state_dict"], checkpoint["meta"]
