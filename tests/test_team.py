"""A research group's setup, with real servers: PostgreSQL, ``mlflow server`` with proxied
artifacts, and a DVC remote. One clone runs the tiny ``dvc repro`` through the server and pushes;
a teammate's clone, sharing nothing with it but the server URL and the remote, pulls, finds
nothing to re-run, and scores scans with the champion exactly as the first clone does.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers.serving import free_port, wait_until_serving
from helpers.tiny import TrackedRepro, git_clone, pulled_clone, ran_stages, run_ok

pytestmark = [pytest.mark.slow, pytest.mark.data]
COVIDCT = [sys.executable, "-m", "covidct"]


@pytest.fixture(scope="module")
def server(tracked_repro: TrackedRepro) -> str:
    return tracked_repro.server


@pytest.fixture(scope="module")
def first(tracked_repro: TrackedRepro) -> tuple[Path, dict[str, str], Path]:
    """The clone that trains: `dvc repro` logging to the server, `dvc push` to a directory remote."""
    return tracked_repro.repo, tracked_repro.env, tracked_repro.remote


@pytest.fixture(scope="module")
def teammate(first: tuple[Path, dict[str, str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh clone that never trained: `dvc pull` is all it runs."""
    repo, env, _ = first
    return pulled_clone(repo, tmp_path_factory.mktemp("teammate") / "clone", env)


def _scans(repo: Path) -> list[str]:
    return sorted(str(p) for p in (repo / "data/raw/covid-ct/CT_COVID").iterdir())[:4]


def test_runs_artifacts_and_models_live_on_the_server(first: tuple[Path, dict[str, str], Path], server: str) -> None:
    repo, _, _ = first
    client = MlflowClient(server)
    runs = client.search_runs([client.get_experiment_by_name("covidct").experiment_id])
    assert {r.data.tags.get("covidct.role") for r in runs} == {"pipeline", "stage"} and len(
        runs
    ) == 12  # 11 stages, one parent
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in runs)  # uploaded through the server
    assert not (repo / "mlruns").exists()  # no client-side store, no artifact written by path
    assert client.get_model_version("covidct", "1").status == "READY"


def test_a_pulled_clone_is_up_to_date_and_reproduces_nothing(
    first: tuple[Path, dict[str, str], Path], teammate: Path
) -> None:
    _, env, _ = first
    status = run_ok(["dvc", "status"], teammate, env)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    assert ran_stages(run_ok(["dvc", "repro"], teammate, env).stdout) == set()
    assert (teammate / "models/pipeline/MLmodel").is_file() and (
        teammate / "models/segmenter/model.safetensors"
    ).is_file()


def test_the_teammate_promotes_and_predicts_through_the_server_as_the_first_clone_does(
    first: tuple[Path, dict[str, str], Path], teammate: Path, tmp_path: Path
) -> None:
    repo, env, _ = first
    promoted = run_ok([*COVIDCT, "promote", "--min-val-recall", "0"], teammate, env)
    assert "promoted" in promoted.stdout
    # the first clone scores with the model directory it trained; the teammate with the champion, through the server
    mine = [*COVIDCT, "predict", *_scans(repo), "--model", "models/pipeline", "--out", str(tmp_path / "first.csv")]
    run_ok(mine, repo, env)
    run_ok([*COVIDCT, "predict", *_scans(teammate), "--out", str(tmp_path / "teammate.csv")], teammate, env)
    first_scores, teammate_scores = (
        pd.read_csv(tmp_path / f"{name}.csv").assign(file=lambda s: s["file"].map(lambda f: Path(f).name))
        for name in ("first", "teammate")  # each clone's own path
    )
    assert first_scores["error"].isna().all() and len(first_scores) == 4
    pd.testing.assert_frame_equal(first_scores, teammate_scores)
    verified = run_ok([*COVIDCT, "verify-model", "--split", "test"], teammate, env)
    assert "reproduces the evaluate stage's test metrics exactly" in verified.stdout


def test_the_pulled_model_directory_serves(first: tuple[Path, dict[str, str], Path], teammate: Path) -> None:
    _, env, _ = first
    port = free_port()
    command = ["mlflow", "models", "serve", "-m", "models/pipeline", "-p", str(port), "--env-manager", "local"]
    server = subprocess.Popen(
        [*command, "-w", "1"], cwd=teammate, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    try:
        wait_until_serving(server, port)
        scan = Path(_scans(teammate)[0]).read_bytes()
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(scan).decode()]]}})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body.encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())["predictions"][0]
        assert answer["error"] == "" and 0.0 <= answer["probability"] <= 1.0
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_remote_missing_an_object_or_missing_altogether_says_what_is_missing(
    first: tuple[Path, dict[str, str], Path], tmp_path: Path
) -> None:
    repo, env, remote = first
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    [segmenter] = [
        o for o in lock["stages"]["train_segmenter"]["outs"] if o["path"] == "models/segmenter/model.safetensors"
    ]
    damaged = shutil.copytree(remote, tmp_path / "damaged")
    md5 = segmenter["md5"]
    (damaged / "files" / "md5" / md5[:2] / md5[2:]).unlink()
    clone = git_clone(repo, tmp_path / "clone", env)
    run_ok(["dvc", "remote", "modify", "--local", "team", "url", str(damaged)], clone, env)
    pulled = subprocess.run(["dvc", "pull"], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    said = pulled.stdout + pulled.stderr
    assert pulled.returncode != 0 and md5[2:] in said and "failed to download" in said, said  # DVC names the object
    assert not (clone / "models/segmenter/model.safetensors").exists()  # nothing half-written in its place
    status = subprocess.run(["dvc", "status", "--cloud"], cwd=clone, env=env, capture_output=True, text=True)
    assert "models/segmenter/model.safetensors" in status.stdout, status.stdout  # and which output that is
    assert (clone / "dvc.lock").is_file() and (clone / "params.yaml").is_file()  # the clone itself untouched
    run_ok(["dvc", "remote", "modify", "--local", "team", "url", str(tmp_path / "nowhere")], clone, env)
    gone = subprocess.run(["dvc", "pull"], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert gone.returncode != 0, gone.stdout + gone.stderr
    assert (clone / "dvc.lock").is_file() and not (clone / "models/segmenter/model.safetensors").exists()


def test_a_tracking_server_that_does_not_answer_stops_a_stage_in_seconds_writing_nothing(
    first: tuple[Path, dict[str, str], Path], teammate: Path
) -> None:
    _, env, _ = first
    dead = f"http://127.0.0.1:{free_port()}"
    before = {p: p.stat().st_mtime_ns for p in teammate.rglob("*") if p.is_file() and ".git" not in p.parts}
    for command in ([sys.executable, "pipelines/evaluate.py"], [*COVIDCT, "promote"]):
        started = time.monotonic()
        result = subprocess.run(
            command, cwd=teammate, env=env | {"MLFLOW_TRACKING_URI": dead}, capture_output=True, text=True, timeout=120
        )
        assert time.monotonic() - started < 30, command  # seconds, not MLflow's minute of retries
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
        assert dead in result.stderr and "does not answer" in result.stderr
    after = {p: p.stat().st_mtime_ns for p in teammate.rglob("*") if p.is_file() and ".git" not in p.parts}
    assert after == before
