"""`covidct levers` for real on the tiny profile: one MLflow run per lever, a table with the
validation-chosen threshold and paired deltas, reuse of finished levers, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import prepare_tiny_root
from covidct.config import load_params
from covidct.profiles import set_params

pytestmark = pytest.mark.slow
COVIDCT = str(Path(sys.executable).parent / "covidct")

LEVERS = """\
study: t
variant: raw
base: {classifier.epochs: 1}
levers:
  baseline: {}
  zero_head: {classifier.head_init: zero}
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny profile's prepared data, as `dvc repro prepare_data` leaves it."""
    root = prepare_tiny_root(tmp_path_factory.mktemp("levers"))
    (root / "t.yaml").write_text(LEVERS)
    return root


def _levers(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "COVIDCT_"))} | {"COVIDCT_DEVICE": "cpu"}
    return subprocess.run([COVIDCT, "levers", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)


def _lever_runs(root: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, "tags.`covidct.role` = 'lever'")


def test_levers_table_mlflow_runs_and_reuse(root: Path) -> None:
    done = _levers(root, "t.yaml")
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(root / "reports" / "levers" / "t.csv").set_index("lever")
    assert list(table.index) == ["baseline", "baseline+tta", "zero_head", "zero_head+tta"]
    assert pd.isna(table.loc["baseline", "test_auc_delta"])
    for lever in ("baseline+tta", "zero_head", "zero_head+tta"):
        assert table.loc[lever, "test_auc_delta"] == pytest.approx(table.loc[lever, "test_auc"] - table.loc["baseline", "test_auc"])
        assert table.loc[lever, "test_auc_delta_ci_low"] <= table.loc[lever, "test_auc_delta"] <= table.loc[lever, "test_auc_delta_ci_high"]
    # the threshold is the validation split's: its recall reaches evaluate.val_recall_floor
    assert (table["val_recall"] >= load_params(root / "params.yaml")["evaluate"]["val_recall_floor"]).all()
    markdown = (root / "reports" / "levers" / "t.md").read_text()
    assert "-S classifier.head_init=zero" in markdown and markdown.count("\n| ") == 5
    assert (root / "reports" / "levers" / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(root.glob(".covidct/**/state.pt"))  # resume states go once a lever is finished
    runs = _lever_runs(root)
    assert sorted(r.data.tags["covidct.lever"] for r in runs) == ["baseline", "zero_head"]
    zero = next(r for r in runs if r.data.tags["covidct.lever"] == "zero_head")
    assert zero.data.params["override.classifier.head_init"] == "zero" and zero.data.params["classifier.head_init"] == "zero"
    assert {r.data.params["classifier.epochs"] for r in runs} == {"1"}  # base: under every lever
    assert zero.data.metrics["test_auc"] == pytest.approx(table.loc["zero_head", "test_auc"])
    assert zero.data.metrics["tta_test_auc"] == pytest.approx(table.loc["zero_head+tta", "test_auc"])

    again = _levers(root, "t.yaml")
    assert again.returncode == 0, again.stderr
    assert "lever baseline: reused" in again.stdout and "lever zero_head: reused" in again.stdout
    assert len(_lever_runs(root)) == 2

    set_params(root, {"classifier.epochs": 3})  # pinned by base: still the same lever
    assert "lever baseline: reused" in _levers(root, "t.yaml", "--only", "baseline").stdout
    set_params(root, {"classifier.lr": 0.0002})  # other settings: a finished lever is not reused
    retrained = _levers(root, "t.yaml", "--only", "baseline")
    assert retrained.returncode == 0, retrained.stderr
    assert "reused" not in retrained.stdout and len(_lever_runs(root)) == 3


@pytest.mark.parametrize(
    ("study", "args", "message"),
    [
        (LEVERS, ("--only", "nope"), "no lever named 'nope'"),
        ("levers:\n  baseline: {}\n  bad: {classifier.nope: 1}\n", (), "classifier.nope"),
        ("levers:\n  bad: {classifier.lr: 0.001}\n", (), "'baseline'"),
        ("base: {classifier.nope: 1}\nlevers:\n  baseline: {}\n", (), "classifier.nope"),
        ("levers:\n  baseline: {}\n  bad: {classifier.lr: -1}\n", (), "classifier.lr"),
    ],
)
def test_levers_bad_study(root: Path, study: str, args: tuple[str, ...], message: str) -> None:
    (root / "bad.yaml").write_text(study)
    done = _levers(root, "bad.yaml", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1
