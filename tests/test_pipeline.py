"""The real ``dvc repro`` on the tiny profile, in a temporary copy of the repository.

Checks every stage's outputs, metric ranges and MLflow runs (the repro shared with
test_team.py, logged through the team's server), then, in a pulled clone logging to its own
SQLite store as one researcher's checkout does: the crop and the registration run again to
the same bytes, a second repro does nothing, a changed crop margin re-runs only the crop and
what follows, and the registered pipeline is promoted, verified and served.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from covidct.profiles import set_params
from covidct.source_figures import TOP_SLICES_CANDIDATES
from covidct.verdicts import TopSlices
from helpers.paths import REPO
from helpers.serving import free_port, wait_until_serving
from helpers.tiny import TOY, TrackedRepro, clean_env, pulled_clone, ran_stages, run_ok

pytestmark = [pytest.mark.slow, pytest.mark.data]
#: The declared sources of the tiny repro: the three real ones, and a toy fourth one the test made.
SOURCES = ("covid-ct", "cc-ccii", "sars-cov-2-ct", TOY)

STAGES = {
    "prepare_data",
    "audit_data",
    "train_segmenter",
    "evaluate_segmenter",
    "train_lesion",
    "evaluate_lesion",
    "crop_images",
    "train_classifier@cropped",
    "train_classifier@raw",
    "evaluate",
    "evaluate_sources",
    "register_model",
}


@pytest.fixture(scope="module")
def tiny_repo(tracked_repro: TrackedRepro) -> tuple[Path, dict[str, str]]:
    assert ran_stages(tracked_repro.output) == STAGES
    return tracked_repro.repo, tracked_repro.env


# Run again in the pulled clone: the crop (the stage that reads image files by path) and the
# registration (it bundles code and weights into the pipeline, and logs to this clone's store).
RERUN = ("crop_images", "register_model")


@pytest.fixture(scope="module")
def local_clone(tracked_repro: TrackedRepro, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A pulled clone with no tracking server: the crop and the registration run again (forced,
    and without the run cache, which would restore, not re-run, them), logging to its own SQLite
    store. Training repeats bit for bit in tests/test_resume.py and tests/test_training.py."""
    env = clean_env()
    clone = pulled_clone(tracked_repro.repo, tmp_path_factory.mktemp("local") / "clone", env)
    rerun = run_ok(["dvc", "repro", "--force", "--single-item", "--no-run-cache", *RERUN], clone, env)
    assert ran_stages(rerun.stdout) == set(RERUN)
    return clone, env


def test_every_output_is_written(tiny_repo: tuple[Path, dict[str, str]]) -> None:
    repo, _ = tiny_repo
    for path in [
        "models/segmenter/model.safetensors",
        "models/lesion/model.safetensors",
        "models/classifier_cropped/model.safetensors",
        "models/classifier_raw/model.safetensors",
        "reports/results.md",
        "reports/lesion/overlays.png",
        "reports/lesion/training_curves.png",
        "reports/segmenter/overlays.png",
        "reports/crop/gallery.png",
        "reports/figures/roc.png",
        "reports/figures/confusion.png",
        "models/classifier_cropped/training_curves.png",
        "reports/segmenter/training_curves.png",
        "reports/roc/cropped.csv",
        "reports/roc/raw.csv",
    ]:
        assert (repo / path).is_file(), path
    for png in repo.glob("reports/**/*.png"):
        with Image.open(png) as image:
            image.verify()
    split = pd.read_csv(repo / "data/splits/covid_ct.csv")
    assert len(split) == 3 * 2 * 3  # tiny profile: 3 per class and split
    boxes = pd.read_csv(repo / "reports/crop/boxes.csv")
    sources = {name: len(pd.read_csv(repo / "data/splits" / f"{name.replace('-', '_')}.csv")) for name in SOURCES}
    assert boxes.groupby("source").size().to_dict() == sources  # every slice of every declared source, the toy one too
    assert (
        (boxes["x_min"] >= 0)
        & (boxes["x_max"] < boxes["width"])
        & (boxes["y_min"] >= 0)
        & (boxes["y_max"] < boxes["height"])
    ).all()
    for crop in boxes["crop"]:
        with Image.open(repo / "data/crops/images" / crop) as image:
            original = boxes.loc[boxes["crop"] == crop].iloc[0]
            assert image.size == (original["width"], original["height"])  # resized back to the original size
        with Image.open(repo / "data/crops/lung" / crop) as lung:  # the crop's own lung mask, aligned with it
            assert lung.size == image.size
    report = (repo / "reports/results.md").read_text()
    assert "87.2" in report and "Zhao" in report  # published figures beside this run's


def test_metrics_are_in_range(tiny_repo: tuple[Path, dict[str, str]]) -> None:
    repo, _ = tiny_repo
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    for variant in ("cropped", "raw"):
        test = metrics[variant]["test"]
        for name in ("accuracy", "precision", "recall", "specificity", "f1", "auc"):
            assert 0.0 <= test[f"{name}_ci_low"] <= test[name] <= test[f"{name}_ci_high"] <= 1.0, (variant, name)
        assert sum(metrics[variant]["test_confusion"].values()) == 6
    gain = metrics["segmentation_gain"]
    assert gain["test_auc"] == pytest.approx(metrics["cropped"]["test"]["auc"] - metrics["raw"]["test"]["auc"])
    assert gain["test_auc_ci_low"] <= gain["test_auc"] <= gain["test_auc_ci_high"]
    assert "Is the segmentation gain real?" in (repo / "reports/results.md").read_text()
    dice = json.loads((repo / "reports/segmenter/metrics.json").read_text())
    assert 0.0 <= dice["dice_mean"] <= 1.0 and 0.0 <= dice["dice_pooled"] <= 1.0 and dice["n_patients"] == 3
    lesion = json.loads((repo / "reports/lesion/metrics.json").read_text())
    assert lesion["dice_mean_ci_low"] <= lesion["dice_mean"] <= lesion["dice_mean_ci_high"] <= 1.0
    assert lesion["n_patients"] == 3 and 0.0 <= lesion["burden_error_slice_mae"] <= 1.0
    per_patient = pd.read_csv(repo / "reports/lesion/per_patient.csv")
    assert per_patient["burden_true"].between(0, 1).all() and len(per_patient) == 3
    crop = json.loads((repo / "reports/crop/metrics.json").read_text())
    assert crop["n_images"] == sum(crop[f"{name}.n_images"] for name in SOURCES) and crop[f"{TOY}.n_images"] == 18


def test_every_source_is_scored_and_held_out_sources_say_so(tiny_repo: tuple[Path, dict[str, str]]) -> None:
    repo, _ = tiny_repo
    sources = json.loads((repo / "reports/sources/metrics.json").read_text())
    # trained on the three real sources: figures from each one's test split (3 per class, CC-CCII's 3 classes);
    # the toy source declared beside them, never trained on: all of it; the lung set's 3 held-out patients
    names = [*SOURCES, "lung-seg"]
    assert [sources[s]["slices"] for s in names] == [6, 9, 6, 18, 9]
    assert [sources[s]["held_out"] for s in names] == [0, 0, 0, 1, 1]
    cc = sources["cc-ccii"]
    assert cc["patients"] >= 3 and cc["auc_ci_low"] <= cc["auc"] <= cc["auc_ci_high"]
    assert {"ncp_vs_normal.auc", "ncp_vs_cp.auc", "ncp_vs_normal.specificity"} <= set(cc)
    assert "covid-19_vs_healthy.auc" not in sources[TOY]  # one non-COVID class: no contrast of its own
    assert (
        sources["cc-ccii.studies"]["studies"] >= 3
        and TopSlices.from_settings(sources["studies"]) in TOP_SLICES_CANDIDATES
    )
    # every scan at three shares, but for a Normal scan with no other Normal scan in its split to fill it
    assert 0 < sources["cc-ccii.diluted"]["studies"] <= 3 * sources["cc-ccii.studies"]["studies"]
    assert 0.0 <= sources["lung-seg"]["recall"] <= 1.0 and sources["gate"]["refused"] == 0
    scores = pd.read_csv(repo / "reports/sources/scores.csv")
    # validation splits too (for choices), the held-out toy source whole, the lung set's held-out patients
    assert len(scores) == 12 + 18 + 12 + 18 + 9 and scores["probability"].between(0, 1).all()
    assert set(scores.loc[scores["source"] == "cc-ccii", "split"]) == {"val", "test"}
    scored = scores.dropna(subset=["probability"])
    assert (scored["lesion_pixels"] <= scored["lung_pixels"]).all() and scored["lung_fraction"].between(0, 1).all()
    assert set(scores.loc[scores["source"] == TOY, "split"]) == {"train", "val", "test"}
    report = (repo / "reports/sources/report.md").read_text()
    for line in ("CC-CCII, its test split", "SARS-CoV-2 CT, its test split", "Toy hospital, all (held out)"):
        assert line in report
    assert "Source-held-out table" in report and "lung set, held-out patients (held out)" in report


def test_mlflow_has_one_parent_and_every_stage(tracked_repro: TrackedRepro) -> None:
    client = MlflowClient(tracked_repro.server)
    experiment = client.get_experiment_by_name("covidct")
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("covidct.role") == "pipeline"]
    stages = {r.info.run_name: r for r in runs if r.data.tags.get("covidct.role") == "stage"}
    assert set(stages) == {
        "audit_data",
        "train_segmenter",
        "evaluate_segmenter",
        "train_lesion",
        "evaluate_lesion",
        "crop_images",
        "train_classifier_cropped",
        "train_classifier_raw",
        "evaluate",
        "evaluate_sources",
        "register_model",
    }
    for run in stages.values():
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    classifier = stages["train_classifier_cropped"]
    assert [m.step for m in client.get_metric_history(classifier.info.run_id, "val_auc")] == [1, 2]
    assert classifier.data.params["classifier.model"] == "tf_efficientnet_lite0"
    artifacts = {a.path for a in client.list_artifacts(classifier.info.run_id)}
    assert {"model.safetensors", "predictions.csv", "training_curves.png"} <= artifacts
    assert "cropped.test.auc" in stages["evaluate"].data.metrics


def test_registered_pipeline_is_promoted_and_reproduces_the_evaluate_stage(
    local_clone: tuple[Path, dict[str, str]],
) -> None:
    repo, env = local_clone
    version = MlflowClient(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}").get_model_version("covidct", "1")
    metrics = json.loads((repo / "reports/metrics.json").read_text())["cropped"]
    assert (
        version.tags["val.auc"] == f"{metrics['val']['auc']:.6g}"
        and version.tags["covidct.variant"] == "tf_efficientnet_lite0"
    )
    sums = hashlib.sha256((repo / "data/raw/sars-cov-2-ct/SHA256SUMS").read_bytes()).hexdigest()
    assert version.tags["data.sars-cov-2-ct.sha256sums"] == sums and version.tags["param.crop.margin"] == "5"
    assert version.tags[f"param.sources.{TOY}.split"] == "manifest"
    assert version.tags["source.cc-ccii.held_out"] == "0" and "source.cc-ccii.auc" in version.tags
    assert version.tags["source.lung-seg.held_out"] == "1"
    lesion = json.loads((repo / "reports/lesion/metrics.json").read_text())
    assert (
        version.tags["lesion.dice_mean"] == f"{lesion['dice_mean']:.6g}"
        and version.tags["param.study.outside_lungs"] == "0.05"
    )
    assert (repo / "models/pipeline/MLmodel").is_file()
    covidct = [sys.executable, "-m", "covidct"]
    promoted = run_ok([*covidct, "promote", "--min-val-recall", "0"], repo, env)
    assert "version 1 promoted" in promoted.stdout
    # A fresh process loads models:/covidct@champion and scores the raw test scans end to end.
    verified = run_ok([*covidct, "verify-model", "--split", "test", "--external"], repo, env)
    assert "reproduces the evaluate stage's test metrics exactly" in verified.stdout
    unseen = verified.stdout.split("unseen scans")[1].splitlines()
    assert (
        len([line for line in unseen if "radiopaedia" in line or "coronacases" in line]) == 3
    )  # the held-out lung patients
    assert re.search(r"^\s*all\s+9\s+[01]\.\d{3}$", verified.stdout, re.M)


def _readme_line(start: str) -> str:
    # the first such line: the loop's, pasted in order (the team section's export comes later)
    line = next(
        line.strip() for line in (REPO / "README.md").read_text().splitlines() if line.strip().startswith(start)
    )
    return line.split(" #")[0].strip()


def test_readmes_serve_command_works_as_written(local_clone: tuple[Path, dict[str, str]]) -> None:
    """A newcomer pastes the README's lines into a fresh shell at the repo root: the export that
    points the plain ``mlflow`` CLI at the project's store, then the serve command (its port
    swapped for a free one), and the champion answers; no stray ./mlflow.db is left behind."""
    repo, env = local_clone
    run_ok(
        [sys.executable, "-m", "covidct", "promote", "--min-val-recall", "0"], repo, env
    )  # a champion, if no test made one yet
    export, serve = (
        _readme_line("export MLFLOW_TRACKING_URI="),
        _readme_line("mlflow models serve -m models:/covidct@champion"),
    )
    port = free_port()
    command = f"{export} && {serve.replace('-p 5001', f'-p {port}')} -w 1"
    server = subprocess.Popen(
        ["bash", "-c", command],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_until_serving(server, port)
        scan = next((repo / "data/raw/covid-ct/CT_COVID").iterdir()).read_bytes()
        body = json.dumps(
            {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(scan).decode()]]}}
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())["predictions"][0]
        assert answer["error"] == "" and 0.0 <= answer["probability"] <= 1.0
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    assert not (repo / "mlflow.db").exists()


def test_rerun_writes_the_same_bytes_and_margin_reruns_only_downstream(
    local_clone: tuple[Path, dict[str, str]],
) -> None:
    """The crop and the registration, run again in another checkout, wrote the same bytes (the
    crops, their report, the saved pipeline), so a reproduction that matches leaves ``dvc.lock``
    (and ``git status``) unchanged; training and weight files repeat bit for bit too
    (tests/test_resume.py, tests/test_training.py). A second repro does nothing, and a changed
    margin re-runs only the crop and what follows (DVC's dry run: nothing upstream of the crop)."""
    repo, env = local_clone
    before = run_ok(["git", "show", "HEAD:dvc.lock"], repo, env).stdout
    after = (repo / "dvc.lock").read_text()
    changed = [line.strip() for line in difflib.unified_diff(before.splitlines(), after.splitlines(), n=0)]
    assert before == after, "\n".join(changed[:20])
    assert ran_stages(run_ok(["dvc", "repro"], repo, env).stdout) == set()
    margin = yaml.safe_load((repo / "params.yaml").read_text())["crop"]["margin"]
    set_params(repo, {"crop.margin": margin + 2})
    # the stages that read crop.margin (the registered pipeline crops too); the rest follow the new crops
    assert ran_stages(run_ok(["dvc", "repro", "--dry"], repo, env).stdout) == {
        "crop_images",
        "evaluate_sources",
        "register_model",
    }
    set_params(repo, {"crop.margin": margin})
