"""The one place a decision threshold is chosen: on validation scores only (never the test
split); the evaluate and evaluate_sources stages, the levers and the registered pipeline all
carry the number this gives."""

from __future__ import annotations

import pandas as pd

from covidct.config import EvaluateConfig
from covidct.metrics import threshold_for_recall


def decision_threshold(val: pd.DataFrame, config: EvaluateConfig) -> float:
    """``val``: validation rows with ``label`` and ``score``. The highest threshold that keeps
    ``val_recall_floor`` of the COVID rows, or the fixed ``threshold`` when the floor is 0."""
    if config.val_recall_floor > 0:
        return threshold_for_recall(val["label"].to_numpy(), val["score"].to_numpy(), config.val_recall_floor)
    return config.threshold
