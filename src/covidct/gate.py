"""The input gate: what is not a usable axial chest CT slice gets a reason, never a label.

A classifier trained on CT answers for any picture: before the gate, an all-black, an
all-white and a 1x1 image were each called COVID with probability 0.75. Two looks decide:
the picture itself (big enough, not near-constant), then the segmenter's cleaned lung mask
(enough lung and, when asked, lung on both sides of the body's midline: two lungs, not one blob;
off by default, since the segmenter misses a consolidated lung, see docs/sources.md).
The thresholds live in ``params.yaml`` (``gate``), set on the real slices of the sources the
pipeline trains on; ``reports/sources/`` counts what it refuses of every source (``refused.csv``)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from covidct.config import GateConfig

#: Every refusal's reason starts with this, so a caller can tell "refused" from "unreadable".
REFUSED = "input gate: "


@dataclass(frozen=True)
class LungEvidence:
    """What the cleaned lung mask says, as fractions of the image's pixels."""

    fraction: float  # lung pixels
    left: float  # lung pixels left of the body's midline (image left)
    right: float

    @property
    def balance(self) -> float:
        """Smaller side over larger: 1 for two equal lungs, 0 for lung on one side only."""
        return min(self.left, self.right) / max(self.left, self.right) if max(self.left, self.right) > 0 else 0.0


def image_problem(gray: np.ndarray, config: GateConfig) -> str | None:
    """Why a decoded uint8 image is no CT slice before any network sees it, or None."""
    height, width = gray.shape[:2]
    if min(height, width) < config.min_side:
        return f"{REFUSED}{width}x{height} px is under the minimum side of {config.min_side} px: not a CT slice"
    spread = float(gray.std())
    if spread < config.min_std:
        return f"{REFUSED}near-constant image (grey-level SD {spread:.1f} < {config.min_std:g}): not a CT slice"
    return None


def body_midline(gray: np.ndarray) -> float:
    """Column of the body's midline: the centre of the bright (tissue) pixels' bounding box,
    Otsu-thresholded; patients are not always centred in a figure crop."""
    _, bright = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    columns = np.flatnonzero(bright.any(axis=0))
    return (columns[0] + columns[-1]) / 2 if columns.size else (gray.shape[1] - 1) / 2


def lung_evidence(mask: np.ndarray, gray: np.ndarray) -> LungEvidence:
    """``mask``: the cleaned bool lung mask at the image's size."""
    midline = body_midline(gray)
    columns = np.arange(mask.shape[1])
    per_column = mask.sum(axis=0)
    total = float(mask.size)
    return LungEvidence(
        float(per_column.sum()) / total,
        float(per_column[columns < midline].sum()) / total,
        float(per_column[columns > midline].sum()) / total,
    )


def lung_problem(evidence: LungEvidence, config: GateConfig) -> str | None:
    """Why the segmenter's mask shows no two plausible lungs, or None."""
    if evidence.fraction < config.min_lung_fraction:
        return f"{REFUSED}the lung mask covers {100 * evidence.fraction:.2f} % of the image (< {100 * config.min_lung_fraction:g} %): no chest CT slice with lungs"
    if evidence.balance < config.min_lung_balance:
        return (
            f"{REFUSED}no lung on both sides of the body's midline (left {100 * evidence.left:.2f} %, right {100 * evidence.right:.2f} % "
            f"of the image; smaller/larger {evidence.balance:.2f} < {config.min_lung_balance:g}): no two lungs"
        )
    return None
