"""A study kept in a journal file that travels with the repository: it reopens with its trials
intact, and a trial left running by a worker that is gone is marked failed (a journal has no
heartbeat), while one whose worker still runs here is left alone."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from optuna.trial import TrialState

from covidct.config import ConfigError
from covidct.sweep.config import SweepConfig
from covidct.sweep.study import finished_trials, open_study


def _config(study: str) -> SweepConfig:
    return SweepConfig.model_validate(
        {"study": study, "storage": "journal:studies/s.log", "space": {"crop.margin": {"low": 0, "high": 5}}}
    )


def test_journal_study_reopens_and_fails_orphaned_trials(tmp_path: Path) -> None:
    config = _config("travels")
    study = open_study(tmp_path, config)
    done = study.ask()
    study.tell(done, 0.7)
    elsewhere, gone, alive = study.ask(), study.ask(), study.ask()
    elsewhere.set_user_attr("worker", "another-machine-4242")  # the file came from another clone
    gone.set_user_attr("worker", f"{socket.gethostname()}-999999999")  # no such process here
    alive.set_user_attr("worker", f"{socket.gethostname()}-{os.getpid()}")
    assert (tmp_path / "studies" / "s.log").stat().st_size > 0

    again = open_study(tmp_path, config)
    states = {t.number: t.state for t in again.trials}
    assert states == {
        done.number: TrialState.COMPLETE,
        elsewhere.number: TrialState.FAIL,
        gone.number: TrialState.FAIL,
        alive.number: TrialState.RUNNING,
    }
    assert again.trials[done.number].value == 0.7 and finished_trials(again) == 1
    assert again.metric_names == ["val_auc"]

    journal = (tmp_path / "studies" / "s.log").read_bytes()
    read = open_study(tmp_path, config, read_only=True)  # what sweep-best and sweep-confirm open
    assert read.best_value == 0.7 and (tmp_path / "studies" / "s.log").read_bytes() == journal
    with pytest.raises(ConfigError, match="no study 'elsewhere' in journal:"):
        open_study(tmp_path, _config("elsewhere"), read_only=True)
    for storage in ("journal:studies/none.log", "sqlite:///studies/none.db"):  # a study never run: nothing made
        with pytest.raises(ConfigError, match="none.* does not exist"):
            open_study(tmp_path, _config("travels"), storage, read_only=True)
    assert sorted(p.name for p in (tmp_path / "studies").iterdir()) == ["s.log"]


def test_a_resumed_study_does_not_draw_its_first_trials_again(tmp_path: Path) -> None:
    """A new process on a study (``covidct sweep`` again, on any clone) draws start-up trials the
    study has not had: with the sampler seeded as in the first process, its first trial would
    repeat trial 0's values exactly (it did, on the classifier study)."""
    config = _config("resumed")
    first = open_study(tmp_path, config)
    drawn = []
    for _ in range(3):
        trial = first.ask()
        drawn.append(trial.suggest_float("x", 0.0, 1.0))
        first.tell(trial, 0.5)
    resumed = open_study(tmp_path, config).ask().suggest_float("x", 0.0, 1.0)
    assert resumed not in drawn
    fresh = open_study(tmp_path / "elsewhere", config).ask().suggest_float("x", 0.0, 1.0)
    assert fresh == drawn[0]  # a new study with the same seed draws as before
