"""A trial's suggestions from the study's search space.

Optuna stores only scalar choices, so a list choice (a network's widths) or a mapping choice
(a network with its weights) is stored by its JSON text and turned back here, for the trial and
for ``sweep-best``; a stepped float comes back rounded (0.6, not 0.6000000000000001).
"""

from __future__ import annotations

import json
from typing import Any

import optuna

from covidct.schema import dotted_keys
from covidct.sweep.config import Distribution


def _label(choice: Any) -> Any:
    return json.dumps(choice) if isinstance(choice, (list, tuple, dict)) else choice


def decode(space: dict[str, Distribution], stored: dict[str, Any]) -> dict[str, Any]:
    """A trial's stored parameters as params.yaml values (list choices back from their labels)."""
    values = dict(stored)
    for key, dist in space.items():
        if key not in values:
            continue
        if dist.choices is not None:
            values[key] = next((c for c in dist.choices if _label(c) == values[key]), values[key])
        elif dist.step is not None and isinstance(values[key], float):
            values[key] = round(values[key], 10)
    return values


def as_params(space: dict[str, Distribution], stored: dict[str, Any]) -> dict[str, Any]:
    """Stored values as params.yaml's dotted keys; a mapping choice sets the keys below its own
    (``classifier: {model: m, pretrained: w}`` as ``classifier.model``, ``classifier.pretrained``)."""
    return dotted_keys(decode(space, stored))


def suggest(trial: optuna.Trial, space: dict[str, Distribution]) -> dict[str, Any]:
    """The trial's values as params.yaml's dotted keys."""
    values: dict[str, Any] = {}
    for key, dist in space.items():
        if dist.choices is not None:
            values[key] = trial.suggest_categorical(key, [_label(c) for c in dist.choices])
        elif isinstance(dist.low, int) and isinstance(dist.high, int):
            values[key] = trial.suggest_int(key, dist.low, dist.high, step=int(dist.step or 1), log=dist.log)
        else:
            values[key] = trial.suggest_float(key, float(dist.low), float(dist.high), step=dist.step, log=dist.log)
    return as_params(space, values)
