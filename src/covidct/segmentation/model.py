"""The lung segmenter network and its checkpoint format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import AttentionUnet

from covidct.atomic import atomic_path


def build_segmenter(channels: tuple[int, ...] | list[int]) -> AttentionUnet:
    """MONAI AttentionUnet, 1 channel in, 1 logit out; each level halves the resolution."""
    return AttentionUnet(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(channels), strides=(2,) * (len(channels) - 1))


def save_segmenter(path: Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """State dict plus what inference needs (channels, input size, CLAHE): no pickled objects."""
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)


def load_segmenter(path: Path, device: torch.device) -> tuple[AttentionUnet, dict[str, Any]]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: segmenter checkpoint not found (run the train_segmenter stage)")
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    meta = checkpoint["meta"]
    model = build_segmenter(meta["channels"]).to(device)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return model, meta
