"""Test-time BatchNorm adaptation (AdaBN, Li et al. 2016): a new site's scans, unlabelled, set the
classifier's BatchNorm statistics, so its grey levels and resolution are normalised the way the
training sources' were. Only the statistics change, never a weight. Measured on the
leave-one-source-out folds: ``reports/levers/holdout_adabn.md`` (``scripts/holdout_adabn.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.optim.swa_utils import update_bn

from covidct.classification.data import to_model_input

#: Fewer scans than this estimate the statistics too noisily to adapt on.
MIN_ADAPTATION_SCANS = 32


def adapt_batchnorm(
    model: torch.nn.Module,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int = 32,
) -> torch.nn.Module:
    """Re-estimate ``model``'s BatchNorm statistics on uint8 (N, S, S) classifier inputs in one
    pass (torch's ``update_bn``: reset, then a cumulative average over the batches); returns it in
    eval mode. Raises ValueError with fewer than :data:`MIN_ADAPTATION_SCANS` images."""
    if len(images) < MIN_ADAPTATION_SCANS:
        raise ValueError(
            f"BatchNorm adaptation needs at least {MIN_ADAPTATION_SCANS} scans of the site, got {len(images)}"
        )
    batches = (
        to_model_input(torch.from_numpy(images[start : start + batch_size])[:, None], mean, std, device)
        for start in range(0, len(images), batch_size)
    )
    with torch.no_grad():
        update_bn(batches, model)
    return model.eval()
