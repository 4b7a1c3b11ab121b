"""From a trial to a full, validated params dict: budget overrides, then the trial's suggestions."""

from __future__ import annotations

import copy
from typing import Any

import optuna

from covidct.config import ConfigError, validate_all
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


def with_overrides(params: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``params`` with dotted-key ``overrides`` applied, validated like params.yaml."""
    result = copy.deepcopy(params)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = result
        for key in parents:
            if not isinstance(node, dict) or key not in node:
                raise ConfigError(f"override key {dotted} does not exist in params.yaml")
            node = node[key]
        if leaf not in node:
            raise ConfigError(f"override key {dotted} does not exist in params.yaml")
        node[leaf] = value
    validate_all(result)
    return result
