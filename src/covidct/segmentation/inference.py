"""Batched lung-probability maps for preprocessed images."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from covidct.runtime import autocast


@torch.inference_mode()
def predict_probabilities(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 16, progress: str | None = None) -> np.ndarray:
    """uint8 (N, S, S) segmenter inputs -> float32 (N, S, S) lung probabilities."""
    model.eval()
    out = np.empty(images.shape, dtype=np.float32)
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device)
        batch = batch.float().div_(255.0).unsqueeze(1)
        with autocast(device):
            logits = model(batch)
        out[start : start + batch_size] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
    return out
