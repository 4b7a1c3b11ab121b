"""Batched lung-probability maps for preprocessed images."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from covidct.runtime import autocast, autocast_dtype


def segmenter_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The AttentionUnet gains from bf16 on a CPU that has it (``auto`` takes it there)."""
    return autocast_dtype(device, precision, cpu_auto_bf16=True)


@torch.inference_mode()
def predict_probabilities(
    model: torch.nn.Module,
    images: np.ndarray,
    device: torch.device,
    batch_size: int = 16,
    progress: str | None = None,
    dtype: torch.dtype | None | str = "auto",
) -> np.ndarray:
    """uint8 (N, S, S) segmenter inputs -> float32 (N, S, S) lung probabilities; ``dtype``: the
    autocast's, from :func:`segmenter_dtype` and the checkpoint's ``precision``."""
    model.eval()
    out = np.empty(images.shape, dtype=np.float32)
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device)
        batch = batch.float().div_(255.0).unsqueeze(1)
        with autocast(device, dtype):
            logits = model(batch)
        out[start : start + batch_size] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
    return out
