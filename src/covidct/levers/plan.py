"""A lever study as its YAML file says it: the levers (params.yaml overrides), the base under
all of them, the seeds, the sources held out in turn (leave-one-source-out folds), and the runs
those make."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, StrictInt, model_validator

from covidct.config import declared_sources
from covidct.experiments.overrides import with_overrides
from covidct.schema import ConfigError, FieldError, Model, read_yaml_mapping, validated

BASELINE = "baseline"
#: What a lever may change: it trains a classifier on crops by the pipeline's segmenter (made again
#: at its own crop.* settings), so a segmenter or data setting would change nothing it trains on.
OVERRIDABLE = ("classifier", "crop", "evaluate")


@dataclass(frozen=True)
class LeverRun:
    name: str  # its directory and MLflow run: the lever, or <lever>_seed<k> in a study with seeds
    lever: str
    seed: int | None  # None: the recipe's own classifier.seed
    overrides: dict[str, Any]
    fold: str | None = None  # the source held out (trained on every other declared source), or None


class LeverStudy(Model):
    study: Annotated[str, Field(min_length=1)]
    variant: Literal["cropped", "raw"] = "cropped"  # cropped (the segmented pipeline) or raw
    levers: dict[str, dict[str, Any]]  # name -> dotted params overrides; "baseline" has none
    base: dict[str, Any] = Field(default_factory=dict)  # overrides under every lever, baseline included
    seeds: tuple[Annotated[StrictInt, Field(ge=0)], ...] = Field((), strict=False)  # empty: the recipe's seed
    # every lever and seed once per source held out; empty: trained as the recipe says
    folds: tuple[str, ...] = Field((), strict=False, alias="holdout")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if BASELINE not in self.levers or self.levers[BASELINE]:
            raise FieldError("levers", f"must include {BASELINE!r} with no overrides (common settings go under base:)")
        for where, overrides in [("base", self.base), *((f"levers.{n}", o) for n, o in self.levers.items())]:
            for key in overrides:
                if key.split(".")[0] not in OVERRIDABLE:
                    sections = ", ".join(f"{s}.*" for s in OVERRIDABLE)
                    raise FieldError(
                        where, f"sets {key}: a lever study trains the classifier, so it changes {sections} only"
                    )
        for key, values in (("seeds", self.seeds), ("holdout", self.folds)):
            if len(set(values)) != len(values):
                raise FieldError(key, f"must not repeat a value, got {list(values)}")
        for key, by in (("classifier.seed", self.seeds), ("classifier.sources", self.folds)):
            setters = [n for n, o in [("base", self.base), *self.levers.items()] if key in o]
            if by and setters:
                where = "base" if setters[0] == "base" else f"levers.{setters[0]}"
                raise FieldError(where, f"sets {key}, which {'seeds' if by is self.seeds else 'holdout'}: sets")
        return self

    def run_name(self, lever: str, seed: int | None, fold: str | None = None) -> str:
        name = lever if fold is None else f"{lever}_without_{fold}"
        return name if seed is None else f"{name}_seed{seed}"

    def runs(
        self, levers: list[str] | None = None, sources: list[str] | None = None, seeds: list[int] | None = None
    ) -> list[LeverRun]:
        """``sources``: every declared source (a fold trains on all but the one it holds out).
        ``seeds``: a part of the study's seeds, for a session too short for all of them (the rest
        run later, the finished ones reused)."""
        unknown = sorted(set(levers or []) - set(self.levers))
        if unknown:
            raise ConfigError(f"--only: no lever named {unknown[0]!r} (levers: {', '.join(self.levers)})")
        stray = sorted(set(seeds or []) - set(self.seeds))
        if stray:
            raise ConfigError(f"--seeds: {stray[0]} is not one of the study's seeds ({list(self.seeds)})")
        chosen = [s for s in self.seeds if not seeds or s in seeds] or [None]  # None: the recipe's own seed
        runs = []
        for lever in levers or list(self.levers):
            for seed in chosen:  # every fold of a seed before the next seed: early reads span the folds
                for fold in self.folds or (None,):
                    held = {} if fold is None else {"classifier.sources": [s for s in sources or [] if s != fold]}
                    overrides = self.levers[lever] | held | ({} if seed is None else {"classifier.seed": seed})
                    runs.append(LeverRun(self.run_name(lever, seed, fold), lever, seed, overrides, fold))
        return runs

    def checked_runs(
        self, base: dict[str, Any], levers: list[str] | None = None, seeds: list[int] | None = None
    ) -> list[LeverRun]:
        """Every run, each override applied to ``base`` and validated: a bad study fails in a
        second, before torch is imported or the first lever trains."""
        declared = list(declared_sources(with_overrides(base, self.base)))
        unknown = [f for f in self.folds if f not in declared]
        if unknown or len(self.folds) == 1 or (self.folds and len(declared) < 2):
            raise ConfigError(
                f"holdout must list two or more declared sources ({', '.join(declared)}), got {list(self.folds)}"
            )
        runs = self.runs(levers, declared, seeds)
        for run in runs:
            with_overrides(base, self.base | run.overrides)
        return runs


def load_levers(path: str | Path) -> LeverStudy:
    raw = read_yaml_mapping(path, "lever study")
    return validated(LeverStudy, {"study": Path(path).stem} | raw, str(path))


def lever_dir(root: Path, study: str, name: str) -> Path:
    return root / "levers" / study / name
