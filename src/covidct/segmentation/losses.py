"""Focal Tversky loss in the paper's convention, built on MONAI's Tversky loss."""

from __future__ import annotations

import torch
from monai.losses import TverskyLoss
from torch import nn


class FocalTverskyLoss(nn.Module):
    """FTL = mean over images of (1 - TI) ** (1 / gamma), on sigmoid probabilities of logits.

    TI = TP / (TP + alpha * FN + beta * FP), with TP = sum(p g), FN = sum((1 - p) g),
    FP = sum(p (1 - g)) per image (plus MONAI's 1e-5 smoothing on both sides).

    Conventions, because the sources disagree:
    - ``alpha`` weights false NEGATIVES and ``beta`` false positives, as in the paper
      (alpha = 0.7 penalises missed lung). MONAI's ``TverskyLoss(alpha=...)`` weights false
      positives, so the two are swapped when calling it.
    - The exponent is ``1 / gamma`` as in Abraham & Khan's reference code (gamma = 1.3 gives
      0.77, which raises the loss of well-segmented images less than that of poor ones);
      the paper's equation (2) prints ``gamma`` itself.
    """

    def __init__(self, alpha: float = 0.7, beta: float = 0.3, gamma: float = 1.3) -> None:
        super().__init__()
        self.gamma = gamma
        self.tversky = TverskyLoss(sigmoid=True, alpha=beta, beta=alpha, reduction="none")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        one_minus_ti = self.tversky(logits, target).reshape(logits.shape[0], -1).mean(dim=1)
        # Clamped: d/dx x**(1/gamma) is infinite at 0 for gamma > 1.
        return one_minus_ti.clamp_min(1e-7).pow(1.0 / self.gamma).mean()
