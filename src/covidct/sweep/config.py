"""A sweep's definition (``pipelines/sweeps/*.yaml``): study, storage, budget, search space.

The space and budget use params.yaml's dotted keys (``crop.margin``), so a trial is just
params.yaml with overrides, and the best trial can be written back into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from covidct.config import ConfigError, read_yaml_mapping

OBJECTIVES = ("val_auc", "val_accuracy", "val_f1", "val_recall")


@dataclass(frozen=True)
class Distribution:
    """``{low, high[, step][, log]}`` (int when the bounds are ints) or ``{choices: [...]}``.

    A step or choices make values repeat across trials, which is what lets trials reuse a
    trained segmenter or a set of crops.
    """

    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class SweepConfig:
    study: str
    storage: str = "sqlite:///optuna/studies.db"
    objective: str = "val_auc"  # validation metric of the cropped-image classifier; never a test metric
    n_trials: int = 8  # finished (complete or pruned) trials across every worker and restart
    timeout_s: float | None = None
    sampler_seed: int = 0
    pruning: bool = True
    pruner_startup_trials: int = 2
    pruner_warmup_epochs: int = 1
    heartbeat_s: int = 30  # a trial silent for heartbeat_s + grace_s is marked failed
    grace_s: int = 60
    budget: dict[str, Any] = field(default_factory=dict)  # params.yaml overrides for every trial
    space: dict[str, Distribution] = field(default_factory=dict)


def _fail(path: Path, key: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {key} {message}")


def _distribution(path: Path, key: str, spec: Any) -> Distribution:
    if not isinstance(spec, dict):
        raise _fail(path, f"space.{key}", "must be a mapping with low/high or choices")
    unknown = set(spec) - {"low", "high", "step", "log", "choices"}
    if unknown:
        raise _fail(path, f"space.{key}.{sorted(unknown)[0]}", "is not a known key (low, high, step, log, choices)")
    if "choices" in spec:
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise _fail(path, f"space.{key}.choices", "must be a non-empty list")
        return Distribution(choices=tuple(spec["choices"]))
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
        raise _fail(path, f"space.{key}", f"needs numeric low < high, got low={low!r} high={high!r}")
    if spec.get("log") and low <= 0:
        raise _fail(path, f"space.{key}.low", "must be > 0 on a log scale")
    step = spec.get("step")
    if step is not None and (not isinstance(step, (int, float)) or step <= 0 or spec.get("log")):
        raise _fail(path, f"space.{key}.step", f"must be a positive number and not combined with log, got {step!r}")
    return Distribution(low=low, high=high, step=step, log=bool(spec.get("log", False)))


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep config")
    known = set(SweepConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _fail(path, unknown[0], f"is not a known key (known: {', '.join(sorted(known))})")
    if not isinstance(raw.get("study"), str) or not raw["study"]:
        raise _fail(path, "study", "must name the study")
    if raw.get("objective", "val_auc") not in OBJECTIVES:
        raise _fail(path, "objective", f"must be one of {', '.join(OBJECTIVES)}, got {raw.get('objective')!r}")
    for key in ("n_trials", "heartbeat_s", "grace_s"):
        if key in raw and (not isinstance(raw[key], int) or raw[key] < 1):
            raise _fail(path, key, f"must be a positive integer, got {raw[key]!r}")
    space = {key: _distribution(path, key, spec) for key, spec in (raw.get("space") or {}).items()}
    if not space:
        raise _fail(path, "space", "must list at least one parameter")
    return SweepConfig(**{**raw, "space": space, "budget": raw.get("budget") or {}})
