"""MLflow grouping of stage runs, against a real SQLite store in a temporary directory."""

from __future__ import annotations

import re
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from covidct.config import ConfigError
from covidct.tracking import GROUP_TAG, TrackingServerError, flatten, log_pipeline_metrics, stage_run, tracking_uri
from helpers.serving import free_port


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "covidct-test")
    return tmp_path


def test_default_store_is_sqlite_inside_mlruns(store: Path) -> None:
    assert tracking_uri() == f"sqlite:///{store / 'mlruns' / 'mlflow.db'}"


def test_stage_runs_of_one_pipeline_share_a_parent(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COVIDCT_PIPELINE_RUN", "repro-1")
    with stage_run("train_segmenter", {"segmenter": {"epochs": 3}}):
        mlflow.log_metric("val_dice", 0.5, step=1)
    with stage_run("crop_images", {"crop": {"margin": 5}}):
        pass
    monkeypatch.setenv("COVIDCT_PIPELINE_RUN", "repro-2")
    with stage_run("crop_images", {"crop": {"margin": 7}}):
        pass

    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name("covidct-test")
    assert experiment.artifact_location == (store / "mlruns" / "artifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    parents = {r.data.tags[GROUP_TAG]: r for r in runs if r.data.tags.get("covidct.role") == "pipeline"}
    stages = [r for r in runs if r.data.tags.get("covidct.role") == "stage"]
    assert set(parents) == {"repro-1", "repro-2"}
    assert len(stages) == 3
    for run in stages:
        assert run.data.tags["mlflow.parentRunId"] == parents[run.data.tags[GROUP_TAG]].info.run_id
        assert run.info.status == "FINISHED"
        assert "covidct.git_commit" in run.data.tags
    segmenter = next(r for r in stages if r.info.run_name == "train_segmenter")
    assert segmenter.data.params["segmenter.epochs"] == "3"
    first = parents["repro-1"].info
    last_stage_end = max(r.info.end_time for r in stages if r.data.tags[GROUP_TAG] == "repro-1")
    assert first.start_time <= segmenter.info.start_time and first.end_time >= last_stage_end  # spans its stages
    assert segmenter.data.metrics["val_dice"] == 0.5


def test_experiment_opens_as_model_training_and_parent_runs_carry_the_headlines(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COVIDCT_PIPELINE_RUN", "repro-headline")
    with stage_run("evaluate", {}):
        log_pipeline_metrics({"cropped.test.auc": 0.85})
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name("covidct-test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the runs table, not the GenAI view
    [parent] = [
        r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("covidct.role") == "pipeline"
    ]
    assert parent.data.metrics == {"cropped.test.auc": 0.85}
    assert re.fullmatch(r"pipeline \d{4}-\d{2}-\d{2} \d{2}:\d{2} \S+", parent.info.run_name), (
        parent.info.run_name
    )  # date and commit


def test_failed_stage_is_recorded_as_failed(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COVIDCT_PIPELINE_RUN", "repro-fail")
    with pytest.raises(RuntimeError), stage_run("train_classifier_raw", {}):
        raise RuntimeError("boom")
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name("covidct-test")
    [run] = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "train_classifier_raw"]
    assert run.info.status == "FAILED"


def test_flatten_nested_params() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_a_tracking_server_that_does_not_answer_stops_a_stage_at_once_naming_it(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    started = time.monotonic()
    with pytest.raises(TrackingServerError, match=re.escape(dead)) as raised:
        with stage_run("crop_images", {"crop": {"margin": 5}}):
            pytest.fail("the stage body must not run")
    assert time.monotonic() - started < 10 and isinstance(raised.value, ConfigError)  # a stage prints it in one line
    assert not (store / "mlruns").exists()  # nothing written locally instead
