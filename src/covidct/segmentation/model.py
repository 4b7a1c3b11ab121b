"""The lung segmenter network and how it is rebuilt from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import AttentionUnet

from covidct.checkpoints import load_checkpoint


def build_segmenter(channels: tuple[int, ...] | list[int]) -> AttentionUnet:
    """MONAI AttentionUnet, 1 channel in, 1 logit out; each level halves the resolution.

    Channels-last weights: on 2 CPU cores the training loop runs 1.2x and inference 1.7-1.8x
    faster than NCHW (benchmarks/segmenter_training.py, benchmarks/flop_ceiling.py).
    """
    net = AttentionUnet(
        spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(channels), strides=(2,) * (len(channels) - 1)
    )
    return net.to(memory_format=torch.channels_last)


def load_segmenter(path: Path, device: torch.device) -> tuple[AttentionUnet, dict[str, Any]]:
    """The network in eval mode, and its meta (channels, input size, CLAHE clip, epoch)."""
    state, meta = load_checkpoint(path, device, "train_segmenter")
    model = build_segmenter(meta["channels"]).to(device)
    model.load_state_dict(state)
    return model.eval(), meta
