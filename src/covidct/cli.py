"""``covidct``: the command line over the library (the DVC stages live in ``pipelines/``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from covidct.config import ConfigError, load_params, validate_all
from covidct.profiles import apply_profile, available


def _sweep(args: argparse.Namespace, root: Path) -> None:
    from covidct.sweep.config import load_sweep
    from covidct.sweep.study import apply_best, best_overrides, finished_trials, open_study, run_sweep, summarise

    config = load_sweep(args.config)
    if args.n_trials:
        config = dataclasses.replace(config, n_trials=args.n_trials)
    if args.command == "sweep":
        study = run_sweep(root, config, args.storage, args.worker_index)
        out = summarise(root, config, study)
        print(f"study {config.study}: {finished_trials(study)} finished trials; plots and trials.csv in {out}")
        if any(t.state.name == "COMPLETE" for t in study.trials):
            print(f"best validation {config.objective} {study.best_value:.4f} (trial {study.best_trial.number}): {study.best_trial.params}")
    else:
        study = open_study(root, config, args.storage)
        overrides = apply_best(root, study) if args.apply else best_overrides(study)
        for key, value in overrides.items():
            print(f"{key}: {value}")
        if args.apply:
            print("written to params.yaml; `dvc repro` (or `dvc exp run`) reproduces this trial's pipeline")


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    parser = argparse.ArgumentParser(prog="covidct", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    profile = sub.add_parser("profile", help="merge a profile from pipelines/profiles/ into params.yaml")
    profile.add_argument("name", nargs="?", help="profile name; omit to list them")
    sub.add_parser("check-params", help="validate every section of params.yaml")
    for name, help_text in (("sweep", "run (or resume) an Optuna study over the pipeline"), ("sweep-best", "print the best trial's parameters")):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("config", help="sweep definition, e.g. pipelines/sweeps/cpu-smoke.yaml")
        command.add_argument("--storage", help="Optuna storage URL (overrides the config's), e.g. postgresql+psycopg://host/db")
        command.add_argument("--n-trials", type=int, help="finished trials the study should hold (overrides the config's)")
        if name == "sweep":
            command.add_argument("--worker-index", type=int, default=0, help="distinct per concurrent worker (sampler seed offset)")
        else:
            command.add_argument("--apply", action="store_true", help="write them into params.yaml")
    args = parser.parse_args(argv)
    root = Path.cwd()
    try:
        if args.command == "profile":
            if not args.name:
                print("\n".join(available(root)))
                return
            apply_profile(root, args.name)
            print(f"params.yaml now uses profile {args.name!r}; run `dvc repro` (or `dvc status` to see what changes)")
        elif args.command == "check-params":
            validate_all(load_params(root / "params.yaml"))
            print("params.yaml is valid")
        else:
            _sweep(args, root)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
