"""A study's verdict from its slices: a CT study is COVID-19 when some of its lung slices are,
so its score is the mean of its ``top_k`` highest slice scores (0: all of them), taken over the
slices the input gate let through. ``top_k`` is chosen on validation scans (evaluate_sources)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def top_k_mean(probabilities: Sequence[float | None], top_k: int) -> float | None:
    """None when no slice of the study was scored."""
    scores = np.sort(np.array([p for p in probabilities if p is not None and not np.isnan(p)], dtype=float))[::-1]
    return float(scores[: top_k or None].mean()) if scores.size else None


def study_probabilities(
    studies: Sequence[str], probabilities: Sequence[float | None], top_k: int
) -> dict[str, float | None]:
    """Study id -> its score; an empty id is no study."""
    members: dict[str, list[float | None]] = {}
    for study, probability in zip(studies, probabilities, strict=True):
        if study:
            members.setdefault(study, []).append(probability)
    return {study: top_k_mean(scores, top_k) for study, scores in members.items()}
