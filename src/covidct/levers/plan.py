"""A lever study as its YAML file says it: the levers (params.yaml overrides), the base under
all of them, the seeds, the sources held out in turn (leave-one-source-out folds), and the runs
those make."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covidct.config import ConfigError, read_yaml_mapping, sources_section
from covidct.experiments.overrides import with_overrides
from covidct.paths import VARIANTS

BASELINE = "baseline"


@dataclass(frozen=True)
class LeverRun:
    name: str  # its directory and MLflow run: the lever, or <lever>_seed<k> in a study with seeds
    lever: str
    seed: int | None  # None: the recipe's own classifier.seed
    overrides: dict[str, Any]
    fold: str | None = None  # the source held out (trained on every other declared source), or None


@dataclass(frozen=True)
class LeverStudy:
    study: str
    variant: str  # cropped (the segmented pipeline) or raw
    levers: dict[str, dict[str, Any]]  # name -> dotted params overrides; "baseline" has none
    base: dict[str, Any]  # overrides under every lever, baseline included: pins the study's starting recipe
    seeds: tuple[int, ...] = ()  # every lever once per seed; empty: once, with the recipe's seed
    folds: tuple[str, ...] = ()  # every lever and seed once per source held out; empty: trained as the recipe says

    def run_name(self, lever: str, seed: int | None, fold: str | None = None) -> str:
        name = lever if fold is None else f"{lever}_without_{fold}"
        return name if seed is None else f"{name}_seed{seed}"

    def runs(self, levers: list[str] | None = None, sources: list[str] | None = None) -> list[LeverRun]:
        """``sources``: every declared source (a fold trains on all but the one it holds out)."""
        unknown = sorted(set(levers or []) - set(self.levers))
        if unknown:
            raise ConfigError(f"--only: no lever named {unknown[0]!r} (levers: {', '.join(self.levers)})")
        runs = []
        for lever in levers or list(self.levers):
            for seed in self.seeds or (None,):  # every fold of a seed before the next seed: early reads span the folds
                for fold in self.folds or (None,):
                    held = {} if fold is None else {"classifier.sources": [s for s in sources or [] if s != fold]}
                    overrides = self.levers[lever] | held | ({} if seed is None else {"classifier.seed": seed})
                    runs.append(LeverRun(self.run_name(lever, seed, fold), lever, seed, overrides, fold))
        return runs

    def checked_runs(self, base: dict[str, Any], levers: list[str] | None = None) -> list[LeverRun]:
        """Every run, each override applied to ``base`` and validated: a bad study fails in a
        second, before torch is imported or the first lever trains."""
        declared = list(sources_section(with_overrides(base, self.base)))
        unknown = [f for f in self.folds if f not in declared]
        if unknown or len(self.folds) == 1 or (self.folds and len(declared) < 2):
            raise ConfigError(
                f"holdout: must list two or more declared sources ({', '.join(declared)}), got {list(self.folds)}"
            )
        runs = self.runs(levers, declared)
        for run in runs:
            with_overrides(base, self.base | run.overrides)
        return runs


def load_levers(path: str | Path) -> LeverStudy:
    raw = read_yaml_mapping(path, "lever study")
    levers = raw.get("levers")
    if not isinstance(levers, dict) or BASELINE not in levers:
        raise ConfigError(f"{path}: levers: must be a mapping of name -> overrides that includes {BASELINE!r}")
    if raw.get("variant", "cropped") not in VARIANTS:
        raise ConfigError(f"{path}: variant: must be one of {', '.join(VARIANTS)}, got {raw.get('variant')!r}")
    for name, overrides in levers.items():
        if not isinstance(overrides, dict) or (name == BASELINE and overrides):
            raise ConfigError(
                f"{path}: levers.{name}: must be a mapping of dotted keys (baseline: {{}}; common settings go under base:)"
            )
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: base: must be a mapping of dotted keys")
    seeds = raw.get("seeds") or []
    if not isinstance(seeds, list) or any(type(s) is not int or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: seeds: must be a list of distinct integers >= 0, got {seeds!r}")
    if seeds and any("classifier.seed" in overrides for overrides in [base, *levers.values()]):
        raise ConfigError(f"{path}: classifier.seed: set by seeds:, not by a lever or base")
    folds = raw.get("holdout") or []
    if not isinstance(folds, list) or len(set(map(str, folds))) != len(folds):
        raise ConfigError(f"{path}: holdout: must be a list of distinct source names, got {folds!r}")
    if folds and any("classifier.sources" in overrides for overrides in [base, *levers.values()]):
        raise ConfigError(
            f"{path}: classifier.sources: set by holdout: (all but the source held out), not by a lever or base"
        )
    return LeverStudy(
        str(raw.get("study", Path(path).stem)),
        raw.get("variant", "cropped"),
        {str(k): dict(v) for k, v in levers.items()},
        dict(base),
        tuple(seeds),
        tuple(map(str, folds)),
    )


def lever_dir(root: Path, study: str, name: str) -> Path:
    return root / "levers" / study / name
