"""MLflow runs for pipeline stages: one store (``mlruns/``, or the team's server), one experiment,
and every stage run of one ``dvc repro`` nested under a shared parent run so the UI compares
them side by side.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from covidct.config import ConfigError

DEFAULT_EXPERIMENT = "covidct"
GROUP_TAG = "covidct.pipeline_run"


def repo_root() -> Path:
    """The real repository, also under ``dvc exp run --temp`` (which runs in a temporary copy)."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri(root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` (a team server) or SQLite in ``mlruns/`` (MLflow 3 refuses a plain file store)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = (root or repo_root()) / "mlruns"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


class TrackingServerError(ConfigError):
    """The tracking server in ``MLFLOW_TRACKING_URI`` does not answer."""


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def connect(root: Path | None = None, timeout_s: float = 5.0) -> str:
    """Point MLflow at the project's store. A server that does not answer ends the command here,
    in seconds and naming the URI, before anything is written: MLflow's own client would retry
    every request for minutes first."""
    uri = tracking_uri(root)
    if is_server(uri):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
                pass
        except urllib.error.HTTPError:
            pass  # it answers (a proxy or an auth layer may guard /health)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingServerError(
                f"MLFLOW_TRACKING_URI={uri} does not answer ({reason}): start the team's MLflow server "
                "(docs/team.md) or unset MLFLOW_TRACKING_URI to log to mlruns/"
            ) from None
    mlflow.set_tracking_uri(uri)
    return uri


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.strip() else "")


def _dvc_ancestor() -> str | None:
    """``pid-starttime`` of the ``dvc`` process that launched this stage (Linux /proc), if any.

    DVC gives stages no invocation id; the launching process identifies one ``dvc repro``.
    """
    pid = os.getppid()
    for _ in range(8):
        proc = Path("/proc") / str(pid)
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        if any(Path(arg.decode(errors="replace")).name == "dvc" for arg in cmdline[:2]):
            return f"{pid}-{stat[19]}"
        pid = int(stat[1])
        if pid <= 1:
            return None
    return None


def pipeline_group_id() -> str:
    """Groups the stage runs of one pipeline execution: ``COVIDCT_PIPELINE_RUN``, else the dvc process."""
    return os.environ.get("COVIDCT_PIPELINE_RUN") or _dvc_ancestor() or uuid.uuid4().hex


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


#: MLflow 3's UI opens an experiment in its GenAI (traces) view unless it says it trains models.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(client: MlflowClient, name: str, root: Path) -> str:
    """A server stores artifacts where its ``--artifacts-destination`` says (clients upload
    through it); only a local store keeps them beside itself, under ``mlruns/artifacts``."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get("mlflow.experimentKind") is None:  # made before the tag was set
            client.set_experiment_tag(experiment.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return experiment.experiment_id
    local = None if is_server(mlflow.get_tracking_uri()) else (root / "mlruns" / "artifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=local, tags=EXPERIMENT_KIND)
    except MlflowException:  # another worker created it a moment ago
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _parent_run(
    client: MlflowClient, experiment_id: str, key: Mapping[str, str], name: str, tags: Mapping[str, str]
) -> str:
    """The run whose tags match ``key`` (created, already finished, if there is none): its
    children are the stages of one pipeline execution or the trials of one study.

    Two workers may create it at the same moment; both then keep the oldest and the
    newer one is deleted, so their children still share one parent.
    """
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in key.items())

    def oldest() -> str | None:
        found = client.search_runs(
            [experiment_id], filter_string=query, order_by=["attributes.start_time ASC"], max_results=1
        )
        return found[0].info.run_id if found else None

    existing = oldest()
    if existing:
        return existing
    run = client.create_run(experiment_id, run_name=name, tags={**key, **tags})
    client.set_terminated(run.info.run_id)
    winner = oldest()
    if winner != run.info.run_id:
        client.delete_run(run.info.run_id)
    return winner


@contextlib.contextmanager
def child_run(
    parent_key: Mapping[str, str], parent_name: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run nested under the parent identified by ``parent_key`` (see ``_parent_run``)."""
    root = repo_root()
    connect(root)
    client = MlflowClient()
    experiment_id = _experiment_id(client, os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT), root)
    commit = git_commit(root)
    parent = _parent_run(client, experiment_id, parent_key, parent_name, {"covidct.git_commit": commit})
    try:
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name,
            parent_run_id=parent,
            tags={**tags, "covidct.git_commit": commit},
        ) as run:
            mlflow.log_params(flatten(params))
            yield run
    finally:
        # the parent spans its children: the runs table shows a pipeline's (a study's) duration
        client.set_terminated(parent, end_time=int(time.time() * 1000))


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any]) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one DVC stage, nested under the run of its pipeline execution."""
    group = pipeline_group_id()
    commit = git_commit(repo_root())[:7]
    name = f"pipeline {time.strftime('%Y-%m-%d %H:%M')} {commit}" + (
        f" {os.environ['DVC_EXP_NAME']}" if os.environ.get("DVC_EXP_NAME") else ""
    )
    tags = {GROUP_TAG: group, "covidct.role": "stage", "covidct.stage": os.environ.get("DVC_STAGE", stage)}
    with child_run({GROUP_TAG: group, "covidct.role": "pipeline"}, name, stage, params, tags) as run:
        yield run


def log_epoch(row: Mapping[str, float]) -> None:
    """One epoch's row of a training history as metrics of the active run, at its epoch as the step."""
    mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def log_pipeline_metrics(metrics: Mapping[str, float]) -> None:
    """Headline figures on the parent run of the active stage run too, so ``dvc repro`` runs
    compare in the MLflow runs table without opening their children."""
    run = mlflow.active_run()
    parent = run.data.tags.get("mlflow.parentRunId") if run is not None else None
    if parent:
        client = MlflowClient()
        for key, value in metrics.items():
            client.log_metric(parent, key, float(value))
