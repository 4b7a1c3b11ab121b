"""A trial's suggestions from the study's search space."""

from __future__ import annotations

from typing import Any

import optuna

from covidct.sweep.config import Distribution


def suggest(trial: optuna.Trial, space: dict[str, Distribution]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, dist in space.items():
        if dist.choices is not None:
            values[key] = trial.suggest_categorical(key, list(dist.choices))
        elif isinstance(dist.low, int) and isinstance(dist.high, int):
            values[key] = trial.suggest_int(key, dist.low, dist.high, step=int(dist.step or 1), log=dist.log)
        else:
            values[key] = trial.suggest_float(key, float(dist.low), float(dist.high), step=dist.step, log=dist.log)
    return values
