"""A sweep's definition (``pipelines/sweeps/*.yaml``): study, storage, budget, search space.

The space and budget use params.yaml's dotted keys (``crop.margin``), so a trial is just
params.yaml with overrides, and the best trial can be written back into it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, StrictBool, StrictFloat, StrictInt, model_validator

from covidct.schema import ConfigError, FieldError, Model, read_yaml_mapping, validated

Objective = Literal["val_auc", "val_accuracy", "val_f1", "val_recall", "val_dice"]
#: What a trial trains. pipeline: its own segmenter, then crops of COVID-CT, then the classifier on
#: them; segmenter: the lung segmenter alone (val_dice); classifier: the classifier on every source
#: it trains on, from the crop stage's segmenter (crops at another margin made and kept).
Trains = Literal["pipeline", "segmenter", "classifier"]
Number = StrictInt | StrictFloat


class Distribution(Model):
    """``{low, high[, step][, log]}`` (int when the bounds are ints) or ``{choices: [...]}``.

    A step or choices make values repeat across trials, which is what lets trials reuse a
    trained segmenter or a set of crops.
    """

    low: Number | None = None
    high: Number | None = None
    step: Annotated[Number, Field(gt=0)] | None = None
    log: StrictBool = False
    choices: Annotated[tuple[Any, ...], Field(min_length=1, strict=False)] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        if self.choices is not None:
            return self
        if self.low is None or self.high is None or self.low >= self.high:
            raise ValueError(f"needs numeric low < high, got low={self.low!r} high={self.high!r}")
        if self.log and self.low <= 0:
            raise FieldError("low", "must be > 0 on a log scale")
        if self.log and self.step is not None:
            raise FieldError("step", "must not be combined with log")
        return self


class SweepConfig(Model):
    study: Annotated[str, Field(min_length=1)]
    storage: str = "sqlite:///optuna/studies.db"  # or journal:<file>, a file that travels with the repository
    trains: Trains = "pipeline"
    objective: Objective = "val_auc"  # a validation metric (classifier or segmenter); never a test metric
    n_trials: Annotated[int, Field(ge=1)] = 8  # finished (complete or pruned) trials across every worker and restart
    timeout_s: Number | None = None
    sampler_seed: int = 0
    pruning: bool = True
    pruner_startup_trials: Annotated[int, Field(ge=0)] = 2
    pruner_warmup_epochs: Annotated[int, Field(ge=0)] = 1
    heartbeat_s: Annotated[int, Field(ge=1)] = 30  # a trial silent for heartbeat_s + grace_s is marked failed
    grace_s: Annotated[int, Field(ge=1)] = 60
    budget: dict[str, Any] = Field(default_factory=dict)  # params.yaml overrides for every trial
    space: Annotated[dict[str, Distribution], Field(min_length=1)]

    @model_validator(mode="after")
    def _objective_fits(self) -> Self:
        if (self.trains == "segmenter") != (self.objective == "val_dice"):
            raise FieldError("objective", f"must be val_dice exactly when trains is segmenter, got {self.objective!r}")
        return self


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep config")
    if "space" in raw and not raw["space"]:
        raise ConfigError(f"{path}: space must list at least one parameter")
    return validated(SweepConfig, {**raw, "budget": raw.get("budget") or {}}, str(path))
