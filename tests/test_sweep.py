"""Real Optuna sweeps over the real pipeline code on a micro budget: reuse, resume after a
kill (heartbeat), and two workers sharing one study on a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import sqlalchemy.exc
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from ruamel.yaml import YAML
from sklearn.metrics import roc_auc_score

from covidct.cli import main
from covidct.config import load_params
from covidct.experiments.overrides import with_overrides
from covidct.paths import CONFIRMATIONS
from covidct.registry.register import sweep_tags
from covidct.sweep.config import load_sweep
from covidct.sweep.study import apply_best, best_overrides, finished_trials, run_sweep, summarise
from helpers.servers import Postgres, running_mlflow_server
from helpers.tiny import prepare_tiny_root, save_tiny_networks

pytestmark = [pytest.mark.slow, pytest.mark.data]
COVIDCT = str(Path(sys.executable).parent / "covidct")

MICRO = """\
study: {study}
storage: sqlite:///optuna/studies.db
n_trials: {n_trials}
heartbeat_s: 1
grace_s: 2
pruner_startup_trials: 1
pruner_warmup_epochs: 0
space:
  segmenter.tversky_alpha: {{choices: [0.6, 0.7]}}
  crop.margin: {{choices: [0, 5]}}
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory with the tiny profile's prepared data, as `dvc repro prepare_data` leaves it."""
    root = prepare_tiny_root(tmp_path_factory.mktemp("sweep"))
    return root


@pytest.fixture()
def env(root: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "COVIDCT_"))}
    return base | {"DVC_ROOT": str(root), "COVIDCT_DEVICE": "cpu", "NO_ALBUMENTATIONS_UPDATE": "1"}


def _config(root: Path, study: str, n_trials: int, extra: str = "") -> Path:
    path = root / f"{study}.yaml"
    path.write_text(MICRO.format(study=study, n_trials=n_trials) + extra)
    return path


def test_sweep_reuses_stages_resumes_and_exports_best(
    root: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = load_sweep(_config(root, "micro", 4))
    study = run_sweep(root, config)
    assert finished_trials(study) == 4
    assert study.metric_names == ["val_auc"]  # the dashboard names the objective, not "Objective 0"
    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    # 2 segmenter settings over 4 trials: at least two trials reuse a trained segmenter.
    assert sum(t.user_attrs["segmenter_reused"] for t in trials) >= 2
    assert all(t.user_attrs["segmenter_seconds"] == 0 for t in trials if t.user_attrs["segmenter_reused"])

    again = run_sweep(root, config)  # resumed: the study is complete, nothing runs
    assert len(again.trials) == len(study.trials)
    more = run_sweep(root, load_sweep(_config(root, "micro", 5)))
    assert finished_trials(more) == 5 and len(more.trials) == 5

    out = summarise(root, config, more)
    for name in ("optimization_history.png", "param_importances.png", "parallel_coordinate.png", "trials.csv"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"]["complete"] + summary["trials"]["pruned"] == 5
    assert summary["best_value"] == more.best_value and summary["best_params"] == more.best_trial.params
    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("covidct").experiment_id], filter_string="tags.`covidct.verdicts` = 'micro'"
    )
    [parent] = [r for r in runs if r.data.tags["covidct.role"] == "study"]
    trial_runs = [r for r in runs if r.data.tags["covidct.role"] == "trial"]
    assert len(trial_runs) == 5 and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trial_runs)
    assert all(
        "test_auc" in r.data.metrics and "val_auc" in r.data.metrics
        for r in trial_runs
        if r.data.tags.get("optuna.state") != "PRUNED"
    )

    best = apply_best(root, more, config)
    params = YAML(typ="safe").load((root / "params.yaml").read_text())
    assert (
        params["crop"]["margin"] == best["crop.margin"]
        and params["segmenter"]["tversky_alpha"] == best["segmenter.tversky_alpha"]
    )


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the sweep exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def test_killed_sweep_resumes_without_losing_or_repeating_trials(root: Path, env: dict[str, str]) -> None:
    # Trials long enough (seconds, not one) that a poll finds one running: the micro study
    # already trained every segmenter and crop set, so a 2-epoch trial is over in a blink.
    path = _config(root, "killed", 3, "pruning: false\nbudget:\n  classifier.epochs: 20\n")
    storage = f"sqlite:///{root / 'optuna' / 'studies.db'}"
    log = root / "killed.log"
    # Output goes to a file a failure can quote; an unread pipe, once full, would stall the sweep.
    with log.open("w") as out:
        proc = subprocess.Popen([COVIDCT, "sweep", str(path)], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)

    def finished_and_running() -> bool:
        try:
            states = {t.state for t in optuna.load_study(study_name="killed", storage=storage).trials}
        except (KeyError, sqlalchemy.exc.OperationalError):  # the study, or its database, is not there yet
            return False
        return {TrialState.COMPLETE, TrialState.RUNNING} <= states

    _wait_for(finished_and_running, proc, log, 300, "a finished and a running trial")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = optuna.load_study(study_name="killed", storage=storage)
    complete_before = {t.number: t.value for t in before.trials if t.state == TrialState.COMPLETE}
    killed = [t.number for t in before.trials if t.state == TrialState.RUNNING]
    time.sleep(3)  # past the heartbeat grace period

    result = subprocess.run(
        [COVIDCT, "sweep", str(path)], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    after = optuna.load_study(study_name="killed", storage=storage)
    assert [after.trials[n].state for n in killed] == [TrialState.FAIL] * len(killed)
    assert {n: after.trials[n].value for n in complete_before} == complete_before
    assert finished_trials(after) == 3  # no finished trial lost, none run twice


@pytest.fixture(scope="module")
def tracking_server(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The team's MLflow server: PostgreSQL backend, artifacts proxied to a directory only it writes."""
    with running_mlflow_server(postgres.create_database("mlflow_sweep"), tmp_path_factory.mktemp("artifacts")) as url:
        yield url


def test_two_workers_share_one_study_on_postgresql_and_one_tracking_server(
    root: Path, env: dict[str, str], postgres: Postgres, tracking_server: str, tmp_path: Path
) -> None:
    """Two workers (one per GPU on a GPU machine: CUDA_VISIBLE_DEVICES per process) on one Optuna
    study in PostgreSQL, logging through the team's MLflow server: one parent, no trial twice."""
    path = _config(root, "distributed", 6)
    storage, tracking = postgres.create_database("optuna"), tracking_server
    env = env | {"MLFLOW_TRACKING_URI": tracking}
    logs = [root / f"distributed-{i}.log" for i in range(2)]
    workers = []
    for i, log in enumerate(logs):  # files, not pipes: a full unread pipe would stall the worker not being waited on
        with log.open("w") as out:
            args = [COVIDCT, "sweep", str(path), "--storage", storage, "--worker-index", str(i)]
            workers.append(subprocess.Popen(args, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT))
    for worker, log in zip(workers, logs, strict=True):
        worker.wait(timeout=600)
        assert worker.returncode == 0, log.read_text()[-3000:]
    study = optuna.load_study(study_name="distributed", storage=storage)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert 6 <= len(finished) <= 7  # each worker may start one trial while the other finishes the 6th
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both workers contributed
    client = MlflowClient(tracking)
    runs = client.search_runs(
        [client.get_experiment_by_name("covidct").experiment_id],
        filter_string="tags.`covidct.verdicts` = 'distributed'",
    )
    parents = {r.info.run_id for r in runs if r.data.tags["covidct.role"] == "study"}
    assert len(parents) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in runs if r.data.tags["covidct.role"] == "trial"} == parents
    # Artifacts went through the server (no client wrote them by path): another directory reads them.
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in runs)
    [summary, *_] = [r for r in runs if r.data.tags["covidct.role"] == "study_summary"]
    elsewhere = tmp_path / "another-clone"
    mlflow.artifacts.download_artifacts(run_id=summary.info.run_id, dst_path=str(elsewhere), tracking_uri=tracking)
    assert any(elsewhere.glob("*.png"))


def test_segmenter_study_in_a_journal_then_its_confirmation(
    root: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segmenter study (objective val_dice) kept in a journal file, then its best trial trained
    against params.yaml (its alpha is 0.6, the study's 0.5 or 0.7: the trial always differs) over two seeds and compared slice by
    slice; a second confirmation reuses the runs."""
    from covidct.sweep.confirm import confirm_segmenter

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    path = root / "seg.yaml"
    path.write_text(
        "study: seg\nstorage: journal:reports/sweeps/seg/journal.log\ntrains: segmenter\nobjective: val_dice\nn_trials: 2\n"
        "pruner_startup_trials: 1\npruner_warmup_epochs: 0\n"
        "space:\n  segmenter.tversky_alpha: {choices: [0.5, 0.7]}\n  segmenter.channels: {choices: [[4, 8, 16], [8, 16, 32]]}\n"
    )
    config = load_sweep(path)
    study = run_sweep(root, config)
    assert finished_trials(study) == 2 and study.metric_names == ["val_dice"]
    assert (
        study.best_params["segmenter.tversky_alpha"] != load_params(root / "params.yaml")["segmenter"]["tversky_alpha"]
    )
    assert (root / "reports" / "sweeps" / "seg" / "journal.log").stat().st_size > 0
    assert all(0.0 <= t.value <= 1.0 for t in study.trials if t.state == TrialState.COMPLETE)

    report = confirm_segmenter(root, config, study, [0, 1])
    record = json.loads(report.with_suffix(".json").read_text())
    assert len(record["runs"]) == 4 and record["seeds"] == [0, 1]
    for split in ("val", "test"):
        part = record[split]
        assert part["ci_low"] <= part["delta"] <= part["ci_high"]
        assert part["patient_ci_low"] <= part["delta"] <= part["patient_ci_high"]
    assert record["adopt"] == (record["val"]["ci_low"] > 0 and record["val"]["patient_ci_low"] > 0)
    assert f"trial {study.best_trial.number} against params.yaml" in report.read_text()

    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiment = [client.get_experiment_by_name("covidct").experiment_id]
    confirmations = client.search_runs(experiment, "tags.`covidct.role` = 'confirmation'")
    assert len(confirmations) == 4
    [parent] = client.search_runs(experiment, "tags.`covidct.verdicts` = 'seg' and tags.`covidct.role` = 'study'")
    assert {r.data.tags["mlflow.parentRunId"] for r in confirmations} == {parent.info.run_id}
    confirm_segmenter(root, config, study, [0, 1])  # reused: no run trains again
    assert len(client.search_runs(experiment, "tags.`covidct.role` = 'confirmation'")) == 4


def test_classifier_study_crops_per_margin_then_its_confirmation_decides(
    root: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A classifier study: the pipeline's segmenter crops every declared source at a trial's
    margin (kept, so a later trial at that margin reuses them), and a choice of a network with
    its weights sets both keys. Its confirmation, through the CLI, scores the study's objective
    and gates `sweep-best --apply --arm`."""
    import shutil

    from covidct.paths import SEGMENTER

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    segmenter, _ = save_tiny_networks(root / "tiny-nets")
    (root / SEGMENTER).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(segmenter, root / SEGMENTER)
    path = root / "clf.yaml"
    path.write_text(
        "study: clf\nstorage: journal:reports/sweeps/clf/journal.log\ntrains: classifier\nn_trials: 3\npruning: false\n"
        "space:\n  crop.margin: {choices: [0, 3]}\n"
        "  classifier: {choices: [{model: efficientnet_b0, pretrained: none}, {model: tf_efficientnet_lite0, pretrained: none}]}\n"
    )
    config = load_sweep(path)
    study = run_sweep(root, config)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 3 and all(0.0 <= t.value <= 1.0 for t in trials)
    margins = [t.params["crop.margin"] for t in trials]
    assert sum(t.user_attrs["crops_reused"] for t in trials) == len(margins) - len(set(margins))
    assert len(list((root / "optuna" / "cache" / "source-crops").glob("*/images"))) == len(set(margins))
    best = best_overrides(study, config)
    assert set(best) == {"crop.margin", "classifier.model", "classifier.pretrained"}
    assert best["classifier.pretrained"] == "none"

    # confirmed before adopted: the best trial as a lever study over seeds, then its record, which
    # tags a version whose params.yaml holds the trial's values
    monkeypatch.chdir(root)
    threads = torch.get_num_threads()
    main(["sweep-confirm", "clf.yaml", "--seeds", "0", "1"])
    plan = root / "pipelines" / "levers" / "confirm-clf.yaml"
    assert f"`covidct levers {plan.relative_to(root)}`" in capsys.readouterr().out
    main(["sweep-confirm", "clf.yaml"])  # the plan is kept; nothing to record before it runs
    assert "has run all its seeds" in capsys.readouterr().out
    main(["levers", str(plan.relative_to(root))])
    main(["sweep-confirm", "clf.yaml"])
    torch.set_num_threads(threads)
    arm = f"trial_{study.best_trial.number}"
    record = json.loads((root / CONFIRMATIONS / "clf.json").read_text())["arms"][arm]
    pooled = {}  # the study's objective: validation AUC over every source trained on, each seed's run
    for lever in ("baseline", arm):
        for seed in (0, 1):
            frame = pd.read_csv(root / "levers" / "confirm-clf" / f"{lever}_seed{seed}" / "predictions.csv")
            val = frame[frame["split"] == "val"]
            assert val["source"].nunique() == 3
            pooled[(lever, seed)] = roc_auc_score(val["label"], val["score"])
            covid = val[val["source"] == "covid-ct"]
            pooled[(lever, seed, "covid-ct")] = roc_auc_score(covid["label"], covid["score"])
    per_seed = [pooled[(arm, s)] - pooled[("baseline", s)] for s in (0, 1)]
    assert record["val"]["delta"] == pytest.approx(np.mean(per_seed))
    assert record["val"]["auc_mean"] == pytest.approx(np.mean([pooled[(arm, s)] for s in (0, 1)]))
    assert record["val"]["ci_low"] <= record["val"]["delta"] <= record["val"]["ci_high"]
    assert record["val"]["seeds_better"] == sum(d > 0 for d in per_seed)
    assert record["val"]["by_source"]["covid-ct"]["auc_mean"] == pytest.approx(
        np.mean([pooled[(arm, s, "covid-ct")] for s in (0, 1)])
    )
    assert record["adopt"] == (record["val"]["ci_low"] > 0) and record["overrides"] == best
    params = load_params(root / "params.yaml")
    clf = {k: v for k, v in sweep_tags(root / CONFIRMATIONS, with_overrides(params, best)).items() if ".clf." in k}
    assert clf == {
        "sweep.clf.trial": str(study.best_trial.number),
        "sweep.clf.adopted_on_val": str(record["adopt"]).lower(),
        "sweep.clf.arm": arm,
    }
    assert not [k for k in sweep_tags(root / CONFIRMATIONS, params) if ".clf." in k]

    # `sweep-best --apply --arm` writes an arm's values, only once its confirmation adopted it
    path, saved = root / CONFIRMATIONS / "clf.json", (root / "params.yaml").read_text()
    confirmation = json.loads(path.read_text())
    confirmation["arms"][arm]["adopt"] = False
    path.write_text(json.dumps(confirmation))
    with pytest.raises(SystemExit):
        main(["sweep-best", "clf.yaml", "--apply", "--arm", arm])
    assert f"arm '{arm}' was not adopted" in capsys.readouterr().err
    assert (root / "params.yaml").read_text() == saved
    confirmation["arms"][arm]["adopt"] = True
    path.write_text(json.dumps(confirmation))
    main(["sweep-best", "clf.yaml", "--apply", "--arm", arm])
    assert load_params(root / "params.yaml") == with_overrides(params, best)
    (root / "params.yaml").write_text(saved)
    with pytest.raises(SystemExit):
        main(["sweep-best", "clf.yaml", "--arm", "trial_99"])
    assert f"no confirmed arm 'trial_99' (arms: {arm})" in capsys.readouterr().err
