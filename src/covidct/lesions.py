"""Where the disease is: lesion masks from the lesion segmenter, and the lesion burden
(lesion area over lung area) that radiologists' CT severity scores are built on.

The burden counts lesion pixels inside the cleaned lung mask only, so it is a share of the lung
(0-1) and a false alarm on the chest wall or the abdomen cannot raise it. Per lung: the two sides
of the body's midline (:func:`covidct.gate.body_midline`) as the image shows them; in the
radiological convention the image's left is the patient's right lung, but figure crops are not
always in that convention, so the columns say "image left" and "image right".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from covidct.lung_box import resize_mask
from covidct.segmentation.inference import predict_probabilities, segmenter_dtype
from covidct.segmentation.inputs import segmenter_input


@dataclass(frozen=True)
class LesionBurden:
    """Pixel counts, so a study's burden is a sum over its slices, not a mean of ratios."""

    lung: int
    lesion: int
    lung_left: int  # the image's left of the body's midline
    lesion_left: int
    lung_right: int
    lesion_right: int

    @staticmethod
    def _share(lesion: int, lung: int) -> float | None:
        return lesion / lung if lung else None

    @property
    def fraction(self) -> float | None:
        """Lesion over lung; None where there is no lung to take a share of."""
        return self._share(self.lesion, self.lung)

    @property
    def left(self) -> float | None:
        return self._share(self.lesion_left, self.lung_left)

    @property
    def right(self) -> float | None:
        return self._share(self.lesion_right, self.lung_right)

    def __add__(self, other: LesionBurden) -> LesionBurden:
        return LesionBurden(*(a + b for a, b in zip(self.counts(), other.counts(), strict=True)))

    def counts(self) -> tuple[int, int, int, int, int, int]:
        return (self.lung, self.lesion, self.lung_left, self.lesion_left, self.lung_right, self.lesion_right)


def lesion_burden(lesion: np.ndarray, lung: np.ndarray, midline: float) -> LesionBurden:
    """``lesion`` and ``lung``: bool masks of one slice at one size; ``midline``: a column."""
    if lesion.shape != lung.shape:
        raise ValueError(f"lesion mask {lesion.shape} and lung mask {lung.shape} differ in size")
    inside = lesion & lung
    left = np.arange(lung.shape[1]) < midline
    lung_columns, lesion_columns = lung.sum(axis=0), inside.sum(axis=0)
    return LesionBurden(
        int(lung_columns.sum()),
        int(lesion_columns.sum()),
        int(lung_columns[left].sum()),
        int(lesion_columns[left].sum()),
        int(lung_columns[~left].sum()),
        int(lesion_columns[~left].sum()),
    )


def study_burden(burdens: Iterable[LesionBurden | None]) -> LesionBurden | None:
    """The share of the series' lung volume involved: lesion pixels over lung pixels, summed
    over its slices (slices of one series share a size); None when no slice has a burden."""
    known = [b for b in burdens if b is not None]
    return sum(known[1:], known[0]) if known else None


def segment_lesions(
    originals: Sequence[np.ndarray], model: torch.nn.Module, meta: dict, device: torch.device
) -> list[np.ndarray]:
    """uint8 grayscale images of any size -> bool lesion masks at each image's size, one batch;
    the input is normalised as the lung segmenter's (the lesion net was trained on the same slices)."""
    if not originals:
        return []
    inputs = np.stack([segmenter_input(image, meta["size"], meta["clahe_clip"]) for image in originals])
    dtype = segmenter_dtype(device, meta.get("precision", "auto"))
    probabilities = predict_probabilities(model, inputs, device, batch_size=len(inputs), dtype=dtype)
    return [resize_mask(p > 0.5, *image.shape[:2]) for image, p in zip(originals, probabilities, strict=True)]
