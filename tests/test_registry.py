"""The two-stage pipeline as one MLflow model: same scores as the DVC stages' path, DICOM,
per-scan errors, registration tags, gated promotion, loading by alias in a fresh process
(``covidct predict``) and REST serving with ``mlflow models serve``.

Uses a real SQLite MLflow store in a temp dir and small randomly initialised networks: the
point is that every route gives the same answer, not that the answer is good.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from covidct.checkpoints import load_checkpoint, save_state_dict
from covidct.classification.data import load_resized
from covidct.classification.train import predict_scores
from covidct.cli import main
from covidct.config import GateConfig
from covidct.images import read_grayscale
from covidct.lung_crop import crop_dataset, crop_relpath
from covidct.registry.pipeline_model import OUTPUT, TwoStagePipeline, predictions_table
from covidct.registry.promote import PromotionError, promote_if_better
from covidct.registry.register import build_and_register
from helpers.configs import make_config
from helpers.images import write_ct_dicom
from helpers.paths import DATA
from helpers.serving import free_port, wait_until_serving
from helpers.tiny import save_tiny_lesion, save_tiny_networks

pytestmark = pytest.mark.data  # reads the real data (skipped without it)

COVID = DATA / "covid-ct" / "CT_COVID"
NONCOVID = DATA / "covid-ct" / "CT_NonCOVID"
SCANS = [
    COVID / "2020.03.16.20035105-p6-64-1.png",  # JPEG bytes behind a .png name
    COVID / "2019-novel-Coronavirus-severe-adult-respiratory-dist_2020_International-Jour-p3-89%0.png",  # RGBA
    NONCOVID / "0.jpg",
    NONCOVID / "1%0.jpg",
]
CROP = make_config("crop", min_lung_fraction=0.0, batch_size=16)  # random segmenter: crop whatever it finds
NAME = "covidct-test"
OPEN_GATE = GateConfig(
    min_side=1, min_std=0.0, min_lung_fraction=0.0, min_lung_balance=0.0
)  # untrained networks: let everything through
LESION_METRICS = {"dice_mean": 0.71, "dice_mean_ci_low": 0.6, "dice_pooled": 0.75}
SOURCES = {"covid-ct": {"held_out": 0, "auc": 0.9}, "cc-ccii": {"held_out": 1, "auc": 0.74, "slices": 5605}}
METRICS = {
    "threshold": 0.5,
    "val": {"auc": 0.80, "recall": 0.95, "accuracy": 0.8},
    "test": {"auc": 0.70, "recall": 0.90, "accuracy": 0.7},
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Small, seeded, untrained networks saved as the training stages save theirs."""
    return save_tiny_networks(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def lesion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_lesion(tmp_path_factory.mktemp("lesion"))


@pytest.fixture(scope="module")
def pipeline(weights: tuple[Path, Path], lesion: Path) -> TwoStagePipeline:
    return TwoStagePipeline(*weights, CROP, 0.5, device=torch.device("cpu"), lesion_path=lesion)


@pytest.fixture(scope="module")
def store(
    tmp_path_factory: pytest.TempPathFactory, weights: tuple[Path, Path], lesion: Path
) -> Iterator[tuple[str, Path]]:
    """A real SQLite tracking store with version 1 registered by the register_model code."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # also sets MLFLOW_TRACKING_URI in os.environ: restored below
    experiment = mlflow.create_experiment("test", artifact_location=(root / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        params = {"classifier": {"model": "efficientnet_b0", "image_size": 64}, "crop": {"margin": 5}}
        build_and_register(
            root,
            root / "pipeline",
            NAME,
            (*weights, lesion),
            CROP,
            OPEN_GATE,
            METRICS,
            params,
            (SCANS[0].name, SCANS[0].read_bytes()),
            SOURCES,
            lesion=LESION_METRICS,
        )
    yield uri, root
    mlflow.set_tracking_uri(previous)  # None unsets both the URI and the variable


def test_pipeline_scores_exactly_as_the_crop_and_classifier_stages(
    pipeline: TwoStagePipeline, weights: tuple[Path, Path], tmp_path: Path
) -> None:
    # The stages' route: crop_images writes PNG crops, train_classifier decodes and scores them.
    table = pd.DataFrame(
        {"relpath": [str(p.relative_to(DATA / "covid-ct")) for p in SCANS], "split": "test", "label": [1, 1, 0, 0]}
    )
    boxes = crop_dataset(
        table, DATA / "covid-ct", tmp_path, pipeline.segmenter, pipeline.segmenter_meta, CROP, pipeline.device
    )
    crops = load_resized([tmp_path / "images" / crop_relpath(p) for p in table["relpath"]], 64, progress=None)
    meta = pipeline.classifier_meta
    stage_scores = predict_scores(pipeline.classifier, crops, pipeline.device, meta["mean"], meta["std"], 32)

    predictions = pipeline.predict_encoded([p.name for p in SCANS], [p.read_bytes() for p in SCANS])
    assert [p.probability for p in predictions] == stage_scores.tolist()
    assert [p.box for p in predictions] == list(
        boxes[["x_min", "y_min", "x_max", "y_max"]].itertuples(index=False, name=None)
    )
    assert not any(p.crop_fallback for p in predictions)  # the crop path really ran
    for p, scan in zip(predictions, SCANS, strict=True):
        assert p.mask.shape == read_grayscale(scan).shape and p.error == ""


def test_pipeline_applies_the_checkpoints_test_time_augmentation(
    pipeline: TwoStagePipeline, weights: tuple[Path, Path], tmp_path: Path
) -> None:
    # classifier.tta: true marks the checkpoint; the registered pipeline then scores as the stages did
    state, meta = load_checkpoint(weights[1], torch.device("cpu"), "train_classifier")
    save_state_dict(tmp_path / "classifier.safetensors", state, meta | {"tta": True})
    with_tta = TwoStagePipeline(weights[0], tmp_path / "classifier.safetensors", CROP, 0.5, device=torch.device("cpu"))
    table = pd.DataFrame(
        {"relpath": [str(p.relative_to(DATA / "covid-ct")) for p in SCANS], "split": "test", "label": [1, 1, 0, 0]}
    )
    crop_dataset(
        table, DATA / "covid-ct", tmp_path / "crops", pipeline.segmenter, pipeline.segmenter_meta, CROP, pipeline.device
    )
    crops = load_resized([tmp_path / "crops" / "images" / crop_relpath(p) for p in table["relpath"]], 64, progress=None)
    stage_scores = predict_scores(with_tta.classifier, crops, with_tta.device, meta["mean"], meta["std"], 32, tta=True)
    scored = with_tta.predict_encoded([p.name for p in SCANS], [p.read_bytes() for p in SCANS])
    assert [p.probability for p in scored] == stage_scores.tolist()
    assert [p.probability for p in scored] != [
        p.probability for p in pipeline.predict_encoded([p.name for p in SCANS], [p.read_bytes() for p in SCANS])
    ]


def test_a_bad_scan_gets_its_error_and_the_others_are_unchanged(pipeline: TwoStagePipeline) -> None:
    alone = pipeline.predict_encoded(["a", "b"], [SCANS[0].read_bytes(), SCANS[2].read_bytes()])
    truncated = SCANS[2].read_bytes()[:500]
    mixed = pipeline.predict_encoded(
        ["a", "text", "b", "cut", "empty"], [SCANS[0].read_bytes(), b"hello", SCANS[2].read_bytes(), truncated, b""]
    )
    assert [m.probability for m in (mixed[0], mixed[2])] == [a.probability for a in alone]
    assert "not an image" in mixed[1].error and "truncated" in mixed[3].error.lower() and "empty" in mixed[4].error
    assert all(m.probability is None for m in (mixed[1], mixed[3], mixed[4]))


def test_ct_dicom_scores_like_its_png(pipeline: TwoStagePipeline, tmp_path: Path) -> None:
    write_ct_dicom(tmp_path / "slice.dcm", read_grayscale(SCANS[1]))
    png, dicom = pipeline.predict_encoded(
        ["png", "dicom"], [SCANS[1].read_bytes(), (tmp_path / "slice.dcm").read_bytes()]
    )
    assert dicom.probability == png.probability and dicom.box == png.box


def test_pipeline_gives_the_lesion_burden_inside_the_lung_and_per_study(
    pipeline: TwoStagePipeline, weights: tuple[Path, Path]
) -> None:
    scored = pipeline.predict_encoded([p.name for p in SCANS], [p.read_bytes() for p in SCANS])
    for prediction in scored:
        inside = prediction.lesion
        assert inside is not None and not (inside & ~prediction.mask).any()  # no lesion outside the lung
        assert prediction.burden.lung == prediction.mask.sum() and prediction.burden.lesion == inside.sum()
        assert prediction.burden.lesion_left + prediction.burden.lesion_right == prediction.burden.lesion
    assert any(p.burden.lesion for p in scored)  # the untrained net marks something: the sums are not vacuous
    table = predictions_table(scored, ["a", "a", "b", ""])
    a = scored[0].burden + scored[1].burden
    assert table.loc[0, "study_lesion_burden"] == pytest.approx(a.lesion / a.lung)
    assert table.loc[0, "lesion_burden"] == pytest.approx(scored[0].burden.lesion / scored[0].burden.lung)
    assert table.loc[3, "study_lesion_burden"] is None
    without = TwoStagePipeline(*weights, CROP, 0.5, device=torch.device("cpu"))
    plain = predictions_table(without.predict_encoded(["x"], [SCANS[0].read_bytes()]))
    assert plain.loc[0, "probability"] == scored[0].probability and plain.loc[0, "lesion_burden"] is None


def test_registered_version_carries_its_tags(store: tuple[str, Path]) -> None:
    uri, root = store
    version = MlflowClient(uri).get_model_version(NAME, "1")
    tags = version.tags
    assert tags["covidct.variant"] == "efficientnet_b0" and tags["covidct.threshold"] == "0.5"
    assert tags["val.auc"] == "0.8" and tags["test.recall"] == "0.9"
    assert tags["param.crop.margin"] == "5" and "covidct.git_commit" in tags
    assert tags["lesion.dice_mean"] == "0.71" and tags["lesion.dice_pooled"] == "0.75"
    local = root / "pipeline"
    assert (local / "MLmodel").is_file() and (local / "model_code.py").is_file()
    assert not list(local.rglob("*.pkl"))  # models from code: nothing to unpickle
    assert json.loads((local / "artifacts" / "settings.json").read_text())["threshold"] == 0.5
    assert json.loads((local / "artifacts" / "settings.json").read_text())["gate"]["min_side"] == 1
    assert (
        tags["source.cc-ccii.held_out"] == "1"
        and tags["source.cc-ccii.auc"] == "0.74"
        and tags["source.covid-ct.held_out"] == "0"
    )


def test_promotion_holds_back_a_pipeline_below_the_source_held_out_floor(store: tuple[str, Path]) -> None:
    uri, _ = store
    client = MlflowClient(uri)
    source, name = (
        client.get_model_version(NAME, "1").source,
        "covidct-heldout-floor",
    )  # its own model: other tests' versions stay as they are
    client.create_registered_model(name)

    def version(folds: dict[str, float] | None = None, **sources: float) -> str:
        tags = {
            "covidct.variant": "efficientnet_b0",
            "val.auc": "0.9",
            "val.recall": "0.95",
            "source.covid-ct.held_out": "0",
            "source.covid-ct.auc": "0.99",
        }
        tags |= {f"source.{src.replace('_', '-')}.held_out": "1" for src in sources}
        tags |= {f"source.{src.replace('_', '-')}.auc": str(auc) for src, auc in sources.items() if auc >= 0}
        if folds:  # as register_model tags the recipe's leave-one-source-out figures
            worst = min(folds, key=folds.__getitem__)
            tags |= {"holdout.study": "holdout", "holdout.worst_fold": worst, "holdout.worst_auc": str(folds[worst])}
        return str(client.create_model_version(name, source, tags=tags).version)

    weak = version(cc_ccii=0.70, lung_seg=-1)  # the lung set has no AUC (all COVID): it does not count
    held = promote_if_better(client, name, version=weak, min_heldout_auc=0.8)
    assert not held.promoted
    assert held.reason == "source-held-out AUC on cc-ccii (held out by this version) 0.7000 is below the floor 0.8"
    assert client.get_model_version(name, weak).tags["promotion.min_heldout_auc"] == "0.8"
    untested = version()
    assert "has no source-held-out AUC" in promote_if_better(client, name, version=untested, min_heldout_auc=0.8).reason
    # trained on every source: the floor reads its recipe's worst fold, and the reason names that fold
    all_sources = version(folds={"covid-ct": 0.86, "cc-ccii": 0.91, "sars-cov-2-ct": 0.62})
    held = promote_if_better(client, name, version=all_sources, min_heldout_auc=0.8)
    assert not held.promoted and held.reason.startswith("source-held-out AUC on sars-cov-2-ct (its recipe's worst")
    assert "0.6200 is below the floor 0.8" in held.reason
    strong = version(cc_ccii=0.85)
    assert promote_if_better(client, name, version=strong, min_heldout_auc=0.8).promoted
    assert promote_if_better(
        client, name, version=weak, alias="floor-off"
    ).promoted  # floor off (0): the old rule alone


def _version(client: MlflowClient, source: str, variant: str, auc: float, recall: float) -> str:
    tags = {"covidct.variant": variant, "val.auc": str(auc), "val.recall": str(recall)}
    return str(client.create_model_version(NAME, source, tags=tags).version)


def test_promotion_moves_the_alias_only_for_a_better_pipeline_above_the_recall_floor(store: tuple[str, Path]) -> None:
    uri, _ = store
    client = MlflowClient(uri)
    source = client.get_model_version(NAME, "1").source
    first = promote_if_better(client, NAME, version="1")
    assert first.promoted and first.champion == "1" and "no version held" in first.reason
    worse = _version(client, source, "efficientnet_b0", 0.75, 0.95)
    assert not promote_if_better(client, NAME, version=worse).promoted
    low_recall = _version(client, source, "efficientnet_b0", 0.99, 0.50)
    refused = promote_if_better(client, NAME, version=low_recall)
    assert not refused.promoted and "below the floor" in refused.reason
    assert client.get_model_version(NAME, low_recall).tags["promotion.decision"] == "kept"
    better = _version(client, source, "efficientnet_b0", 0.85, 0.92)
    b4 = _version(client, source, "efficientnet_b4", 0.78, 0.93)
    best = promote_if_better(client, NAME)  # no version given: the best one above the floor
    assert best.promoted and best.candidate == better and best.champion == better
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == better
    assert client.get_model_version(NAME, better).tags["promotion.compared_with"] == "1"
    assert client.get_model_version(NAME, "1").tags["promotion.replaced_by"] == better
    # "The best B4 pipeline": a champion of another variant does not count.
    assert promote_if_better(client, NAME, variant="efficientnet_b4", alias="champion-b4").champion == b4
    restricted = promote_if_better(client, NAME, variant="efficientnet_b4")
    assert restricted.promoted and restricted.candidate == b4 and "not efficientnet_b4" in restricted.reason
    with pytest.raises(PromotionError, match="efficientnet_b7"):
        promote_if_better(client, NAME, variant="efficientnet_b7")
    back = promote_if_better(client, NAME, version="1")  # unrestricted again: 0.80 beats the B4's 0.78
    assert back.promoted and str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    # A tie goes to the newer registration (same figures, newer code), never back to the older one.
    first_tags = client.get_model_version(NAME, "1").tags
    same = _version(client, source, "efficientnet_b0", float(first_tags["val.auc"]), float(first_tags["val.recall"]))
    tie = promote_if_better(client, NAME, version=same)
    assert tie.promoted and "ties, and is newer than, version 1" in tie.reason
    assert not promote_if_better(client, NAME, version="1").promoted


def _env(uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    return env | {
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        "COVIDCT_DEVICE": "cpu",
    }


@pytest.fixture(scope="module")
def cli_predictions(store: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    """``covidct predict`` in a fresh process, model loaded by alias, on files and a folder."""
    uri, _ = store
    client = MlflowClient(uri)
    client.set_registered_model_alias(NAME, "serving", "1")
    out = tmp_path_factory.mktemp("predict")
    folder = out / "scans"
    folder.mkdir()
    write_ct_dicom(folder / "slice.dcm", read_grayscale(SCANS[1]))
    (folder / "notes.txt").write_text("not a scan")  # skipped inside folders
    (folder / "broken.png").write_bytes(SCANS[2].read_bytes()[:300])
    args = [
        *map(str, SCANS),
        str(folder),
        str(out / "missing.png"),
        "--model",
        f"models:/{NAME}@serving",
        "--out",
        str(out / "p.csv"),
    ]
    result = subprocess.run(
        [sys.executable, "-m", "covidct", "predict", *args, "--overlays", str(out / "overlays")],
        env=_env(uri),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return pd.read_csv(out / "p.csv", keep_default_na=False), out


def test_predict_cli_loads_by_alias_and_reports_errors_per_file(
    cli_predictions: tuple[pd.DataFrame, Path], pipeline: TwoStagePipeline
) -> None:
    table, out = cli_predictions
    assert list(table.columns) == ["file", *OUTPUT]
    assert [Path(f).name for f in table["file"]] == [p.name for p in SCANS] + ["broken.png", "slice.dcm", "missing.png"]
    expected = pipeline.predict_encoded([p.name for p in SCANS], [p.read_bytes() for p in SCANS])
    assert table["probability"][:4].astype(float).tolist() == pytest.approx([p.probability for p in expected], abs=1e-6)
    assert table["label"][:4].tolist() == [("COVID" if p.probability >= 0.5 else "non-COVID") for p in expected]
    assert float(table["probability"][5]) == pytest.approx(expected[1].probability, abs=1e-6)  # the DICOM of scan 1
    assert (
        "truncated" in table["error"][4].lower()
        and table["error"][6] == "file not found"
        and table["probability"][6] == ""
    )
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == sorted([*(f"{p.stem}.png" for p in SCANS), "slice.png"])
    with Image.open(out / "overlays" / f"{SCANS[0].stem}.png") as image:
        assert image.mode == "RGB" and image.size == Image.open(SCANS[0]).size


def test_adapting_to_a_site_moves_batchnorm_statistics_not_weights(weights: tuple[Path, Path], tmp_path: Path) -> None:
    """``predict --adapt-batchnorm``: the site's scored scans set the classifier's BatchNorm
    statistics and are scored again from the inputs they were scored on (nothing decoded or
    segmented twice): the same probabilities as scoring them afresh; error rows stay; no weight moves."""
    from covidct.predict import predict_files

    pipeline = TwoStagePipeline(*weights, CROP, 0.5, device=torch.device("cpu"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(SCANS[2].read_bytes()[:300])
    site = [*sorted(NONCOVID.glob("*.png"))[:33], broken, tmp_path / "missing.png"]
    before = {k: v.clone() for k, v in pipeline.classifier.state_dict().items()}
    first = predict_files(pipeline, site, batch_size=16)
    adapted = pipeline.adapt_batchnorm(first)
    after = pipeline.classifier.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved)
    assert [p.error for p in adapted] == [p.error for p in first] and adapted[-1].error == "file not found"
    scores = [p.probability for p in adapted[:33]]
    assert scores != pytest.approx([p.probability for p in first[:33]], abs=1e-4)
    afresh = predict_files(pipeline, site[:33], batch_size=16)
    assert scores == pytest.approx([p.probability for p in afresh], abs=1e-6)


def test_predict_refuses_to_adapt_on_too_few_scans(
    store: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In this process, as the CLI runs it (a fresh interpreter's imports would take ~15 s)."""
    uri, _ = store
    MlflowClient(uri).set_registered_model_alias(NAME, "serving", "1")
    for key, value in _env(uri).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    args = [
        *map(str, SCANS),
        "--model",
        f"models:/{NAME}@serving",
        "--out",
        str(tmp_path / "p.csv"),
        "--adapt-batchnorm",
    ]
    with pytest.raises(SystemExit) as exited:
        main(["predict", *args])
    torch.set_num_threads(threads)
    stderr = capsys.readouterr().err
    assert exited.value.code == 2 and "--adapt-batchnorm" in stderr and "at least 32 scans" in stderr, stderr
    assert "Traceback" not in stderr and not (tmp_path / "p.csv").exists()


def _post(port: int, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        return error.code, json.loads(text) if text.startswith("{") else {"message": text}


def _rows(scans: list[tuple[str, bytes]]) -> bytes:
    data = [[base64.b64encode(blob).decode(), name] for name, blob in scans]
    return json.dumps({"dataframe_split": {"columns": ["image", "name"], "data": data}}).encode()


def test_served_model_answers_like_predict_and_survives_malformed_requests(
    store: tuple[str, Path], cli_predictions: tuple[pd.DataFrame, Path]
) -> None:
    uri, _ = store
    table, _ = cli_predictions
    port = free_port()
    command = [
        "mlflow",
        "models",
        "serve",
        "-m",
        f"models:/{NAME}@serving",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
    ]
    server = subprocess.Popen(
        command, env=_env(uri), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_until_serving(server, port)
        status, answer = _post(port, _rows([(p.name, p.read_bytes()) for p in SCANS] + [("text", b"hello")]))
        assert status == 200
        served = answer["predictions"]
        assert [r["probability"] for r in served[:4]] == pytest.approx(
            table["probability"][:4].astype(float).tolist(), abs=1e-6
        )
        assert [r["label"] for r in served[:4]] == table["label"][:4].tolist()
        assert [r["x_min"] for r in served[:4]] == table["x_min"][:4].astype(int).tolist()
        assert served[4]["probability"] is None and "not an image" in served[4]["error"]  # valid JSON: null, not NaN
        for body, content_type in [
            (b"{not json", "application/json"),
            (json.dumps({"dataframe_split": {"columns": ["img"], "data": [["aGk="]]}}).encode(), "application/json"),
            (
                json.dumps({"dataframe_split": {"columns": ["image"], "data": [["!!!notbase64"]]}}).encode(),
                "application/json",
            ),
            (json.dumps({"rows": [1]}).encode(), "application/json"),
            (b"image\n1\n", "text/plain"),
        ]:
            status, error = _post(port, body, content_type)
            assert 400 <= status < 500 and error["message"], (body, status)
        status, answer = _post(port, _rows([(SCANS[2].name, SCANS[2].read_bytes())]))
        assert status == 200 and answer["predictions"][0]["probability"] == pytest.approx(
            float(table["probability"][2]), abs=1e-6
        )
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_a_version_names_the_confirmed_study_its_params_came_from(tmp_path: Path) -> None:
    from covidct.registry.register import sweep_tags

    record = {
        "study": "seg",
        "trial": 4,
        "adopt": True,
        "overrides": {"segmenter.channels": [16, 32], "crop.margin": 3},
    }
    (tmp_path / "seg.json").write_text(json.dumps(record))
    params = {"segmenter": {"channels": [16, 32]}, "crop": {"margin": 3}}
    assert sweep_tags(tmp_path, params) == {"sweep.seg.trial": "4", "sweep.seg.adopted_on_val": "true"}
    assert sweep_tags(tmp_path, {"segmenter": {"channels": [16, 32]}, "crop": {"margin": 5}}) == {}
    assert sweep_tags(tmp_path, {"segmenter": {"channels": [16, 32]}}) == {}  # a key params no longer has
    # epochs cut for the time bound: still the trial, and the cut is named; any other change is not
    record["overrides"] |= {"segmenter.epochs": 24}
    (tmp_path / "seg.json").write_text(json.dumps(record))
    cut = {"segmenter": {"channels": [16, 32], "epochs": 18}, "crop": {"margin": 3}}
    assert sweep_tags(tmp_path, cut) == {
        "sweep.seg.trial": "4",
        "sweep.seg.adopted_on_val": "true",
        "sweep.seg.cut": "segmenter.epochs=18 (trial: 24)",
    }
    assert sweep_tags(tmp_path, {"segmenter": {"channels": [16, 32], "epochs": 18}, "crop": {"margin": 5}}) == {}
    assert sweep_tags(tmp_path, {"segmenter": {"channels": [16, 32], "epochs": 30}, "crop": {"margin": 3}}) == {}
    (tmp_path / "seg.json").unlink()
    # a classifier study's confirmation has arms: the whole trial and a part of it; the version is
    # named by the arm with the most values params.yaml holds
    arms = {
        "trial_2": {"overrides": {"classifier.lr": 0.001, "classifier.epochs": 10}, "adopt": False},
        "trial_2_short": {"overrides": {"classifier.lr": 0.001}, "adopt": True},
    }
    (tmp_path / "clf.json").write_text(json.dumps({"study": "clf", "trial": 2, "arms": arms}))
    short, whole = {"classifier": {"lr": 0.001, "epochs": 6}}, {"classifier": {"lr": 0.001, "epochs": 10}}
    assert sweep_tags(tmp_path, short) == {
        "sweep.clf.trial": "2",
        "sweep.clf.adopted_on_val": "true",
        "sweep.clf.arm": "trial_2_short",
    }
    assert sweep_tags(tmp_path, whole)["sweep.clf.arm"] == "trial_2"
    assert sweep_tags(tmp_path, whole)["sweep.clf.adopted_on_val"] == "false"
    assert sweep_tags(tmp_path, {"classifier": {"lr": 0.0003, "epochs": 10}}) == {}
