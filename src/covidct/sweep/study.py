"""Opening, running and summarising a study: Optuna RDB storage (SQLite by default, PostgreSQL
for several machines) with heartbeats so a killed trial is marked failed, or a journal file
that travels with the repository from one machine to the next; and a cap on finished trials
shared by every worker and restart."""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
import sqlalchemy
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from covidct.atomic import atomic_path, write_text_atomic
from covidct.config import ConfigError, load_params
from covidct.paths import CONFIRMATIONS, SWEEP_REPORTS
from covidct.profiles import set_params
from covidct.sweep.config import SweepConfig
from covidct.sweep.objective import TrialObjective, study_parent
from covidct.sweep.space import as_params
from covidct.tracking import child_run

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


JOURNAL = "journal:"


def storage_url(root: Path, url: str) -> str:
    """Relative SQLite and journal paths are taken from the repo root (also under ``dvc exp run --temp``)."""
    for prefix in ("sqlite:///", JOURNAL):
        if url.startswith(prefix) and not url.startswith(prefix + "/"):
            path = root / url[len(prefix) :]
            path.parent.mkdir(parents=True, exist_ok=True)
            return prefix + str(path)
    return url


def _journal_storage(path: str) -> JournalStorage:
    """A study in one append-only file: commit it, and the next machine resumes the study."""
    return JournalStorage(JournalFileBackend(path))


def fail_orphaned_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[int]:
    """A journal has no heartbeat: a trial still RUNNING whose worker is a process that no longer
    runs here, or that ran on another machine (the file travelled with the repository), was
    killed. Marked failed so the study runs it again rather than waiting on it."""
    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition("-")
        if worker_host == host and pid.isdigit() and _alive(int(pid)):
            continue
        study_id = storage.get_study_id_from_name(study.study_name)
        storage.set_trial_state_values(
            storage.get_trial_id_from_study_id_trial_number(study_id, trial.number), TrialState.FAIL
        )
        failed.append(trial.number)
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rdb_storage(url: str, engine: dict[str, Any], config: SweepConfig, attempts: int = 5) -> RDBStorage:
    """Workers started together race to create Optuna's tables on a new database; the losers
    see a duplicate-object error and simply connect again once the tables exist."""
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and exactly what resuming needs
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=config.heartbeat_s, grace_period=config.grace_s
                )
        except sqlalchemy.exc.SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def resumed_sampler(seed: int, worker_index: int, trials_so_far: int) -> optuna.samplers.TPESampler:
    """TPE seeded by the study's seed, the worker and the trials already in the study: workers
    started together, and a study resumed in a new process, must not draw the start-up trials
    already drawn (a fixed seed would repeat the first process's draws from trial one)."""
    if worker_index == 0 and trials_so_far == 0:
        return optuna.samplers.TPESampler(seed=seed)  # a new study draws as it always did
    entropy = np.random.SeedSequence([seed, worker_index, trials_so_far]).generate_state(1)[0]
    return optuna.samplers.TPESampler(seed=int(entropy))


def open_study(
    root: Path, config: SweepConfig, storage: str | None = None, worker_index: int = 0, read_only: bool = False
) -> optuna.Study:
    """``read_only`` (sweep-best, sweep-confirm): an existing study, opened without a write, so
    reading the best trial leaves a committed journal as it was."""
    url = storage_url(root, storage or config.storage)
    local = next((url[len(p) :] for p in (JOURNAL, "sqlite:///") if url.startswith(p)), None)
    if read_only and local is not None and not Path(local).is_file():  # opening would create an empty one
        raise ConfigError(f"no study {config.study!r}: {url} does not exist (run `covidct sweep` first)")
    if url.startswith(JOURNAL):
        backend: optuna.storages.BaseStorage = _journal_storage(url[len(JOURNAL) :])
    else:
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        backend = _rdb_storage(url, engine, config)
    if read_only:
        try:
            return optuna.load_study(study_name=config.study, storage=backend)
        except KeyError:
            raise ConfigError(f"no study {config.study!r} in {url}: run `covidct sweep` on it first") from None
    pruner = (
        optuna.pruners.MedianPruner(
            n_startup_trials=config.pruner_startup_trials, n_warmup_steps=config.pruner_warmup_epochs
        )
        if config.pruning
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        study_name=config.study,
        storage=backend,
        direction="maximize",
        pruner=pruner,
        load_if_exists=True,
    )
    study.sampler = resumed_sampler(config.sampler_seed, worker_index, len(study.trials))
    if study.metric_names != [config.objective]:  # optuna-dashboard and the trials table show it by name
        study.set_metric_names([config.objective])
    if url.startswith(JOURNAL):
        fail_orphaned_trials(study, backend)
    return study


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run_sweep(root: Path, config: SweepConfig, storage: str | None = None, worker_index: int = 0) -> optuna.Study:
    """Run trials until the study holds ``config.n_trials`` finished ones (or the timeout).

    Safe to start again after a kill, and on several processes or machines at once: each
    asks the storage how many trials are finished before and after every trial. Stale
    running trials (no heartbeat) are marked failed by Optuna when a worker starts one.
    Workers running at once may each finish one trial past ``n_trials``: a worker only
    learns the cap was reached when its own trial ends.
    """
    study = open_study(root, config, storage, worker_index)
    remaining = config.n_trials - finished_trials(study)
    if remaining > 0:
        worker = f"{socket.gethostname()}-{os.getpid()}"
        objective = TrialObjective(root, load_params(root / "params.yaml"), config, worker)
        study.optimize(
            objective,
            timeout=config.timeout_s,
            callbacks=[MaxTrialsCallback(config.n_trials, states=FINISHED)],
            gc_after_trial=True,
        )
    return study


def summarise(root: Path, config: SweepConfig, study: optuna.Study) -> Path:
    """Trials table and the study's plots (history, importances, parallel coordinates) as files,
    logged to the study's MLflow parent run."""
    out = report_dir(root, config)
    write_text_atomic(out / "trials.csv", study.trials_dataframe().to_csv(index=False))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    write_text_atomic(out / "summary.json", json.dumps(_summary(config, study), indent=2) + "\n")
    plots = {"optimization_history.png": optuna.visualization.matplotlib.plot_optimization_history}
    if len(complete) >= 2:
        plots |= {
            "param_importances.png": optuna.visualization.matplotlib.plot_param_importances,
            "parallel_coordinate.png": optuna.visualization.matplotlib.plot_parallel_coordinate,
        }
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            axes = plot(study, target_name=config.objective)  # the axis names the objective, not "Objective Value"
        figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
        figure.set_size_inches(9, 5)
        with atomic_path(out / name) as tmp:
            figure.savefig(tmp, dpi=120, bbox_inches="tight")
    parent_key, parent_name = study_parent(config)
    best = {"best_value": study.best_value, "best_trial": study.best_trial.number} if complete else {}
    with child_run(
        parent_key,
        parent_name,
        f"summary {config.study}",
        {},
        {"covidct.role": "study_summary", "covidct.verdicts": config.study},
    ):
        mlflow.log_metrics({**best, "finished_trials": finished_trials(study)})
        for name in ["trials.csv", "summary.json", *plots]:  # by name: another worker's temp files come and go in `out`
            mlflow.log_artifact(str(out / name))
    return out


def _summary(config: SweepConfig, study: optuna.Study) -> dict[str, Any]:
    """What docs/sweeps.md quotes: counts by state, compute spent, the best trial."""
    trials = study.get_trials(deepcopy=False)
    states = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    spent = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials if t.datetime_complete]
    summary: dict[str, Any] = {"study": config.study, "objective": config.objective, "trials": states}
    summary["compute_minutes"] = sum(spent) / 60
    if states["complete"]:
        best = study.best_trial
        summary |= {
            "best_trial": best.number,
            "best_value": best.value,
            "best_params": as_params(config.space, best.params),
        }
    return summary


def report_dir(root: Path, config: SweepConfig) -> Path:
    """Committed beside the study's journal: trials, plots, confirmation."""
    return root / SWEEP_REPORTS / config.study


def best_overrides(study: optuna.Study, config: SweepConfig) -> dict[str, Any]:
    """The best trial's suggested values, as params.yaml dotted keys (budget keys excluded)."""
    try:
        return as_params(config.space, study.best_trial.params)
    except ValueError as exc:
        raise ConfigError(f"study {study.study_name}: no completed trial yet") from exc


def apply_best(root: Path, study: optuna.Study, config: SweepConfig, arm: str | None = None) -> dict[str, Any]:
    """Write the best trial's parameters into params.yaml, so ``dvc repro`` reproduces it; with
    ``arm``, the values of that arm of its confirmation (a part of the trial, say)."""
    overrides = best_overrides(study, config) if arm is None else confirmed_arm(root, config, arm)
    set_params(root, overrides)
    return overrides


def confirmed_arm(root: Path, config: SweepConfig, arm: str) -> dict[str, Any]:
    """An arm's values from the study's confirmation record, if the confirmation adopted it."""
    path = root / CONFIRMATIONS / f"{config.study}.json"
    arms = json.loads(path.read_text()).get("arms", {}) if path.is_file() else {}
    if arm not in arms:
        named = ", ".join(arms) or "none: run `covidct sweep-confirm` when its lever study has run"
        raise ConfigError(f"{path}: no confirmed arm {arm!r} (arms: {named})")
    if not arms[arm]["adopt"]:
        raise ConfigError(f"{path}: arm {arm!r} was not adopted (its validation interval is not above 0)")
    return arms[arm]["overrides"]
