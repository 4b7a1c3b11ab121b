"""A study's verdict from its slices: a CT study is COVID-19 when some of its lung slices are,
so its score is the mean of its highest slice scores, taken over the slices the input gate let
through. How many (:class:`TopSlices`) is chosen on validation scans (evaluate_sources)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TopSlices:
    """The slice scores a study's score averages: its ``count`` highest (0: all), or, with
    ``share``, its highest ``share`` of slices (at least one). A share judges a 6-slice scan and
    a 300-slice series alike; a fixed count over a long series of mostly healthy slices takes its
    highest chance scores, so a threshold chosen on short scans calls healthy series COVID."""

    count: int = 0
    share: float = 0.0

    def __post_init__(self) -> None:
        if self.count < 0 or not 0.0 <= self.share < 1.0 or (self.count and self.share):
            raise ValueError(f"top slices: a count >= 0 or a share in (0, 1), not both; got {self!r}")

    def of(self, slices: int) -> int:
        """How many of ``slices`` scores are averaged."""
        if self.share:
            return max(1, math.ceil(self.share * slices))
        return min(self.count, slices) if self.count else slices

    def __str__(self) -> str:
        if self.share:
            return f"top {100 * self.share:g} %"
        return f"top {self.count}" if self.count else "all"

    def describe(self) -> str:
        if self.share:
            return f"the highest {100 * self.share:g} % of its slice scores"
        return f"its {self.count} highest slice scores" if self.count else "all its slice scores"

    def settings(self) -> dict[str, int | float]:
        return {"top_k": self.count, "top_share": self.share}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], prefix: str = "") -> TopSlices:
        """Versions and reports from before shares were chosen have only ``top_k``."""
        return cls(int(settings.get(f"{prefix}top_k", 0)), float(settings.get(f"{prefix}top_share", 0.0)))


ALL_SLICES = TopSlices()  # the mean of every slice's score, the default where none was chosen


def top_mean(probabilities: Sequence[float | None], top: TopSlices) -> float | None:
    """None when no slice of the study was scored."""
    scores = np.sort(np.array([p for p in probabilities if p is not None and not np.isnan(p)], dtype=float))[::-1]
    return float(scores[: top.of(scores.size)].mean()) if scores.size else None


def study_probabilities(
    studies: Sequence[str], probabilities: Sequence[float | None], top: TopSlices
) -> dict[str, float | None]:
    """Study id -> its score; an empty id is no study."""
    members: dict[str, list[float | None]] = {}
    for study, probability in zip(studies, probabilities, strict=True):
        if study:
            members.setdefault(study, []).append(probability)
    return {study: top_mean(scores, top) for study, scores in members.items()}
