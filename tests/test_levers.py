"""`covidct levers` for real on the tiny profile: one MLflow run per lever, a table with the
validation-chosen threshold and paired deltas, reuse of finished levers, studies over seeds,
and clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

from covidct.cli import main
from covidct.config import EvaluateConfig, load_params
from covidct.experiments.cache import CACHE
from covidct.images import read_grayscale
from covidct.paths import SEGMENTER
from covidct.profiles import set_params
from helpers.paths import REPO
from helpers.tiny import prepare_tiny_root, save_tiny_networks

pytestmark = [pytest.mark.slow, pytest.mark.data]
COVIDCT = str(Path(sys.executable).parent / "covidct")

LEVERS = """\
study: t
variant: raw
base: {classifier.epochs: 1, classifier.sources: [covid-ct]}
levers:
  baseline: {}
  timm_head: {classifier.head_init: timm}
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny profile's prepared data, as `dvc repro prepare_data` leaves it."""
    root = prepare_tiny_root(tmp_path_factory.mktemp("levers"))
    (root / "t.yaml").write_text(LEVERS)
    return root


def _levers(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "COVIDCT_"))} | {
        "COVIDCT_DEVICE": "cpu"
    }
    return subprocess.run([COVIDCT, "levers", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture()
def levers_here(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Callable[..., str]]:
    """`covidct levers` in this process, as the CLI runs it in ``root``: for the calls after the
    first, which a fresh interpreter would only slow down (its imports take ~16 s here). The CLI
    sets torch's thread count; the other tests on this worker get theirs back."""
    monkeypatch.chdir(root)
    for key in [k for k in os.environ if k.startswith(("MLFLOW_", "DVC_", "COVIDCT_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("COVIDCT_DEVICE", "cpu")

    def levers(*args: str) -> str:
        main(["levers", *args])
        return capsys.readouterr().out

    threads = torch.get_num_threads()
    yield levers
    torch.set_num_threads(threads)


def _git_ignored(paths: list[Path]) -> list[Path]:
    """The paths this repository's .gitignore keeps out of git (a clone does not get them)."""
    listed = subprocess.run(
        ["git", "check-ignore", "--no-index", *map(str, paths)], cwd=REPO, capture_output=True, text=True
    )
    return [Path(line) for line in listed.stdout.splitlines()]


def _lever_runs(root: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, "tags.`covidct.role` = 'lever'")


def test_levers_table_mlflow_runs_and_reuse(root: Path, levers_here: Callable[..., str]) -> None:
    done = _levers(root, "t.yaml")
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(root / "reports" / "levers" / "t.csv").set_index("lever")
    assert list(table.index) == ["baseline", "baseline+tta", "timm_head", "timm_head+tta"]
    assert pd.isna(table.loc["baseline", "test_auc_delta"])
    # each row against the baseline scored the same way; the baseline's TTA row against no TTA
    for lever, reference in (
        ("baseline+tta", "baseline"),
        ("timm_head", "baseline"),
        ("timm_head+tta", "baseline+tta"),
    ):
        assert table.loc[lever, "test_auc_delta"] == pytest.approx(
            table.loc[lever, "test_auc"] - table.loc[reference, "test_auc"]
        )
        assert (
            table.loc[lever, "test_auc_delta_ci_low"]
            <= table.loc[lever, "test_auc_delta"]
            <= table.loc[lever, "test_auc_delta_ci_high"]
        )
    # CC-CCII's validation patients, never trained on, are scored beside COVID-CT's splits
    assert table["cc_val_auc"].between(0, 1).all() and table["cc_val_auc_ci_low"].le(table["cc_val_auc"]).all()
    # the threshold is the validation split's: its recall reaches evaluate.val_recall_floor
    assert (table["val_recall"] >= load_params(root / "params.yaml")["evaluate"]["val_recall_floor"]).all()
    markdown = (root / "reports" / "levers" / "t.md").read_text()
    assert "-S classifier.head_init=timm" in markdown and markdown.count("\n| ") == 5
    assert (root / "reports" / "levers" / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(root.glob(".covidct/**/state.pt"))  # resume states go once a lever is finished
    runs = _lever_runs(root)
    assert sorted(r.data.tags["covidct.lever"] for r in runs) == ["baseline", "timm_head"]
    timm = next(r for r in runs if r.data.tags["covidct.lever"] == "timm_head")
    assert (
        timm.data.params["override.classifier.head_init"] == "timm"
        and timm.data.params["classifier.head_init"] == "timm"
    )
    assert {r.data.params["classifier.epochs"] for r in runs} == {"1"}  # base: under every lever
    assert timm.data.metrics["test_auc"] == pytest.approx(table.loc["timm_head", "test_auc"])
    assert timm.data.metrics["tta_test_auc"] == pytest.approx(table.loc["timm_head+tta", "test_auc"])

    # a clone holds what git keeps of a run (records, predictions), never its weights: enough to reuse it
    kept = [p for p in (root / "levers").rglob("*") if p.is_file()]
    ignored = _git_ignored([p.relative_to(root) for p in kept])
    assert {p.name for p in ignored} == {"model.safetensors"}
    for path in ignored:
        (root / path).unlink()
    again = levers_here("t.yaml")
    assert "lever baseline: reused" in again and "lever timm_head: reused" in again
    assert len(_lever_runs(root)) == 2

    set_params(root, {"classifier.epochs": 3})  # pinned by base: still the same lever
    assert "lever baseline: reused" in levers_here("t.yaml", "--only", "baseline")
    set_params(root, {"classifier.lr": 0.0002})  # other settings: a finished lever is not reused
    assert "reused" not in levers_here("t.yaml", "--only", "baseline") and len(_lever_runs(root)) == 3


def test_levers_over_seeds_reuse_other_studies_and_ensemble(root: Path, levers_here: Callable[..., str]) -> None:
    """seeds: every lever once per seed, paired seed by seed; a finished run of another study
    with the same settings and pixels is reused; the seeds' averaged scores are scored too."""
    lr = load_params(root / "params.yaml")["classifier"][
        "lr"
    ]  # what the previous test left, so baseline seed 0 is t's baseline
    (root / "s.yaml").write_text(
        f"study: s\nvariant: raw\nbase: {{classifier.epochs: 1, classifier.sources: [covid-ct], classifier.lr: {lr}}}\n"
        "seeds: [0, 1]\n" + LEVERS.split("\n", 3)[3]
    )
    done = levers_here("s.yaml")
    assert f"lever baseline_seed0: reused ({root / 'levers' / 't' / 'baseline'})" in done
    assert done.count("reused") == 1
    table = pd.read_csv(root / "reports" / "levers" / "s.csv").set_index("lever")
    runs = [
        f"{lever}_seed{seed}{suffix}"
        for lever in ("baseline", "timm_head")
        for seed in (0, 1)
        for suffix in ("", "+tta")
    ]
    ensembles = [f"{lever}_ensemble{suffix}" for lever in ("baseline", "timm_head") for suffix in ("", "+tta")]
    assert list(table.index) == runs + ensembles
    for seed in (0, 1):
        lever, reference = f"timm_head_seed{seed}+tta", f"baseline_seed{seed}+tta"
        assert table.loc[lever, "test_auc_delta"] == pytest.approx(
            table.loc[lever, "test_auc"] - table.loc[reference, "test_auc"]
        )

    def predictions(run: str) -> pd.DataFrame:
        frame = pd.read_csv(root / "levers" / "s" / run / "predictions+tta.csv")
        return frame[(frame["split"] == "test") & (frame["source"] == "covid-ct")]  # the table's test: COVID-CT's

    seeds = [predictions(f"timm_head_seed{seed}") for seed in (0, 1)]
    averaged = (seeds[0]["score"].to_numpy() + seeds[1]["score"].to_numpy()) / 2
    assert table.loc["timm_head_ensemble+tta", "test_auc"] == pytest.approx(roc_auc_score(seeds[0]["label"], averaged))

    over = pd.read_csv(root / "reports" / "levers" / "s_over_seeds.csv").set_index("lever")
    assert list(over.index) == ["baseline", "baseline+tta", "timm_head", "timm_head+tta"]
    per_seed = table.loc[["timm_head_seed0", "timm_head_seed1"]]
    assert over.loc["timm_head", "test_auc_mean"] == pytest.approx(per_seed["test_auc"].mean())
    assert over.loc["timm_head", "test_auc_sd"] == pytest.approx(per_seed["test_auc"].std())
    assert over.loc["timm_head", "test_auc_delta"] == pytest.approx(per_seed["test_auc_delta"].mean())
    assert (
        over.loc["timm_head", "test_auc_delta_ci_low"]
        <= over.loc["timm_head", "test_auc_delta"]
        <= over.loc["timm_head", "test_auc_delta_ci_high"]
    )
    assert over.loc["timm_head", "seeds_better"] == (per_seed["test_auc_delta"] > 0).sum()
    gain = (
        table.loc["timm_head_ensemble+tta", "test_auc"]
        - table.loc[["timm_head_seed0+tta", "timm_head_seed1+tta"], "test_auc"].mean()
    )
    assert over.loc["timm_head+tta", "test_ensemble_gain"] == pytest.approx(gain)
    assert "## Over seeds 0, 1" in (root / "reports" / "levers" / "s.md").read_text()
    seed_runs = [r for r in _lever_runs(root) if r.data.tags["covidct.levers"] == "s"]
    assert sorted((r.data.tags["covidct.lever"], r.data.tags["covidct.seed"]) for r in seed_runs) == [
        ("baseline", "1"),
        ("timm_head", "0"),
        ("timm_head", "1"),
    ]


MARGINS = """\
study: m
base: {classifier.epochs: 1, classifier.sources: [covid-ct]}
levers:
  baseline: {}
  narrow: {crop.margin: 12}
"""


def test_a_margin_lever_trains_on_crops_at_its_own_margin(root: Path, levers_here: Callable[..., str]) -> None:
    """A lever that changes crop.* sees the crops its margin makes (by the pipeline's segmenter,
    kept for the next study), not the crop stage's at params.yaml's margin."""
    segmenter, _ = save_tiny_networks(root / "tiny-nets")
    (root / SEGMENTER).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(segmenter, root / SEGMENTER)
    (root / "m.yaml").write_text(MARGINS)
    done = levers_here("m.yaml")
    assert "reused" not in done
    records = {
        lever: json.loads((root / "levers" / "m" / lever / "metrics.json").read_text())
        for lever in ("baseline", "narrow")
    }
    margin = load_params(root / "params.yaml")["crop"]["margin"]
    assert (records["baseline"]["crops"]["crop"]["margin"], records["narrow"]["crops"]["crop"]["margin"]) == (
        margin,
        12,
    )
    assert records["baseline"]["fingerprint"] != records["narrow"]["fingerprint"]
    entries = sorted((root / CACHE / "source-crops").glob("*/images"))
    assert len(entries) == 2  # no crop stage ran here: params.yaml's margin is made and kept too
    crops = [sorted(e.rglob("*.png")) for e in entries]
    assert [p.relative_to(entries[0]) for p in crops[0]] == [p.relative_to(entries[1]) for p in crops[1]]
    differ = [not np.array_equal(read_grayscale(a), read_grayscale(b)) for a, b in zip(*crops, strict=True)]
    assert any(differ), "the two margins made the same crops"
    again = levers_here("m.yaml")
    assert "lever narrow: reused" in again and len(list((root / CACHE / "source-crops").glob("*/images"))) == 2


@pytest.mark.parametrize(
    ("study", "args", "message"),
    [
        (LEVERS, ("--only", "nope"), "no lever named 'nope'"),
        ("levers:\n  baseline: {}\n  bad: {classifier.nope: 1}\n", (), "classifier.nope"),
        ("levers:\n  bad: {classifier.lr: 0.001}\n", (), "'baseline'"),
        ("base: {classifier.nope: 1}\nlevers:\n  baseline: {}\n", (), "classifier.nope"),
        ("levers:\n  baseline: {}\n  bad: {classifier.lr: -1}\n", (), "classifier.lr"),
        ("levers:\n  baseline: {}\n  bad: {segmenter.epochs: 3}\n", (), "levers.bad sets segmenter.epochs"),
        ("seeds: [0, 0]\nlevers:\n  baseline: {}\n", (), "bad.yaml: seeds must not repeat a value"),
        (
            "seeds: [0, 1]\nlevers:\n  baseline: {}\n",
            ("--seeds", "1", "2"),
            "--seeds: 2 is not one of the study's seeds",
        ),
        (
            "seeds: [0, 1]\nlevers:\n  baseline: {}\n  bad: {classifier.seed: 3}\n",
            (),
            "levers.bad sets classifier.seed, which seeds: sets",
        ),
        ("holdout: [covid-ct, nowhere]\nlevers:\n  baseline: {}\n", (), "holdout must list two or more declared"),
        ("holdout: [covid-ct]\nlevers:\n  baseline: {}\n", (), "holdout must list two or more declared"),
        (
            "holdout: [covid-ct, cc-ccii]\nlevers:\n  baseline: {}\n  bad: {classifier.sources: [covid-ct]}\n",
            (),
            "levers.bad sets classifier.sources, which holdout: sets",
        ),
    ],
)
def test_levers_bad_study(
    root: Path,
    study: str,
    args: tuple[str, ...],
    message: str,
    levers_here: Callable[..., str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    (root / "bad.yaml").write_text(study)
    with pytest.raises(SystemExit) as exited:
        levers_here("bad.yaml", *args)
    stderr = capsys.readouterr().err
    assert exited.value.code == 2 and message in stderr, stderr
    assert stderr.count("\n") == 1


HOLDOUT = """\
study: h
variant: raw
seeds: [0, 1]
holdout: [covid-ct, cc-ccii, sars-cov-2-ct]
base: {classifier.epochs: 1}
levers:
  baseline: {}
  equalise: {classifier.equalise: true}
"""


def test_leave_one_source_out_folds_score_the_held_out_source_whole(
    root: Path, levers_here: Callable[..., str]
) -> None:
    """Each fold trains on the other sources alone and scores every slice of the one held out,
    at a threshold from the trained sources' validation rows; the study's metrics name the worst
    fold, and a registered recipe finds its own figures there (and only its own)."""
    from covidct.catalog import load_source
    from covidct.experiments.overrides import with_overrides
    from covidct.registry.register import holdout_tags
    from covidct.thresholds import decision_threshold

    (root / "h.yaml").write_text(HOLDOUT)
    levers_here("h.yaml", "--seeds", "0")  # a short session: one seed now, the rest later
    part = json.loads((root / "reports" / "levers" / "h.json").read_text())
    assert part["levers"] == {}  # no figure from part of a study
    assert "| equalise | SARS-CoV-2 CT | 1 |" in (root / "reports" / "levers" / "h.md").read_text()
    assert levers_here("h.yaml").count("reused") == 6  # seed 0's six runs, kept
    base = load_params(root / "params.yaml")
    for fold in ("covid-ct", "cc-ccii", "sars-cov-2-ct"):
        for seed in (0, 1):
            run = root / "levers" / "h" / f"equalise_without_{fold}_seed{seed}"
            predictions = pd.read_csv(run / "predictions.csv")
            held = predictions[predictions["source"] == fold]
            assert sorted(held["relpath"]) == sorted(load_source(root, fold)["relpath"])  # all of it, every split
            assert not held["trained"].any() and predictions.loc[predictions["source"] != fold, "trained"].all()
            val = predictions[(predictions["split"] == "val") & predictions["trained"]]
            record = json.loads((run / "metrics.json").read_text())["holdout"]
            assert record["threshold"] == pytest.approx(decision_threshold(val, EvaluateConfig.of(base)), abs=1e-6)
            assert record["auc"] == pytest.approx(roc_auc_score(held["label"], held["score"]))
    metrics = json.loads((root / "reports" / "levers" / "h.json").read_text())
    for lever in ("baseline", "equalise"):
        folds = metrics["levers"][lever]["folds"]
        worst = min(folds, key=lambda f: folds[f]["auc_mean"])
        assert metrics["levers"][lever]["worst_fold"] == worst
        assert metrics["levers"][lever]["worst_auc"] == folds[worst]["auc_mean"]
        assert metrics["levers"][lever]["mean_auc"] == pytest.approx(np.mean([f["auc_mean"] for f in folds.values()]))
    delta = metrics["levers"]["equalise"]["folds"]["cc-ccii"]
    assert delta["auc_delta_ci_low"] <= delta["auc_delta"] <= delta["auc_delta_ci_high"]
    assert "auc_delta" not in metrics["levers"]["baseline"]["folds"]["cc-ccii"]
    markdown = (root / "reports" / "levers" / "h.md").read_text()
    assert "| equalise | SARS-CoV-2 CT | 2 |" in markdown and "worst fold" in markdown
    held = [
        p[p["source"] == "cc-ccii"]
        for p in (
            pd.read_csv(root / "levers" / "h" / f"baseline_without_cc-ccii_seed{s}" / "predictions.csv") for s in (0, 1)
        )
    ]
    for name in ("CP", "Normal"):  # COVID against common pneumonia, and against normal lungs
        aucs = [
            roc_auc_score(h["label"], h["score"])
            for h in (h[(h["label"] == 1) | (h["subclass"] == name)] for h in held)
        ]
        cell = f"{100 * np.mean(aucs):.1f} ± {100 * np.std(aucs, ddof=1):.1f} (2)"
        assert f"| baseline | CC-CCII | {name} | {cell} |" in markdown
    aucs_normal = np.mean(aucs)  # the last: Normal
    assert "| baseline | COVID-CT | CT_NonCOVID |" not in markdown  # one non-COVID class: its AUC says it
    assert metrics["levers"]["baseline"]["folds"]["cc-ccii"]["auc_against_Normal_mean"] == pytest.approx(aucs_normal)
    assert (root / "reports" / "levers" / "h.png").read_bytes()[:4] == b"\x89PNG"
    # the registry tags a recipe with its own folds: the baseline's for params.yaml's settings (any sources or seed)
    recipe = with_overrides(base, {"classifier.epochs": 1, "classifier.sources": ["covid-ct"], "classifier.seed": 5})
    tags = holdout_tags(metrics, recipe)
    assert (
        tags["holdout.lever"] == "baseline"
        and tags["holdout.worst_fold"] == metrics["levers"]["baseline"]["worst_fold"]
    )
    baseline = metrics["levers"]["baseline"]["folds"]["cc-ccii"]["auc_mean"]
    assert float(tags["holdout.cc-ccii.auc_mean"]) == pytest.approx(baseline, abs=1e-5)
    assert holdout_tags(metrics, with_overrides(base, {"classifier.epochs": 2})) == {}
    # the same classifier on another segmenter's crops: those figures are not its own
    assert holdout_tags(metrics, with_overrides(base, {"segmenter.epochs": base["segmenter"]["epochs"] + 1})) == {}
    assert holdout_tags(metrics, with_overrides(base, {"crop.margin": base["crop"]["margin"] + 1})) == {}
    assert "reused" in levers_here("h.yaml", "--only", "baseline")
    # a run on another lung segmenter's crops is named, and left out of every figure
    from covidct.levers.holdout import summarise_holdout
    from covidct.levers.plan import load_levers

    moved = root / "levers" / "h" / "equalise_without_cc-ccii_seed1" / "metrics.json"
    record = json.loads(moved.read_text())
    record["crops"]["segmenter"]["epochs"] += 1
    moved.write_text(json.dumps(record))
    summarise_holdout(root, load_levers(root / "h.yaml"), base)
    metrics = json.loads((root / "reports" / "levers" / "h.json").read_text())
    assert "equalise" not in metrics["levers"] and "baseline" in metrics["levers"]  # no figure from part of it
    assert "so not comparable: equalise_without_cc-ccii_seed1." in (root / "reports" / "levers" / "h.md").read_text()
    assert "| equalise | CC-CCII | 1 |" in (root / "reports" / "levers" / "h.md").read_text()


def test_an_augmentation_that_is_off_keeps_the_runs_from_before_it() -> None:
    """Runs trained before ``downscale``, ``jpeg_quality``, ``mixup`` and ``cutmix`` existed are reused while they are off."""
    from covidct.levers.runner import _fingerprint

    params = load_params(REPO / "params.yaml")
    images = np.zeros((2, 4, 4), dtype=np.uint8)
    before = json.loads(json.dumps(params))
    for key in ("downscale", "jpeg_quality", "mixup", "cutmix"):
        del before["classifier"]["augment"][key]
    assert _fingerprint(params, images) == _fingerprint(before, images)
    blurred = json.loads(json.dumps(params))
    blurred["classifier"]["augment"]["downscale"] = 0.5
    assert _fingerprint(blurred, images) != _fingerprint(params, images)


@pytest.mark.parametrize("path", sorted((REPO / "pipelines" / "levers").glob("*.yaml")), ids=lambda p: p.name)
def test_each_shipped_lever_study_applies_to_params_yaml(path: Path) -> None:
    """Every run of every lever study in the repository is a valid params.yaml, checked as
    ``covidct levers`` checks it before anything trains, so none rots as keys change."""
    from covidct.levers.plan import load_levers

    study = load_levers(path)
    runs = study.checked_runs(load_params(REPO / "params.yaml"))
    assert len(runs) == len(study.levers) * max(len(study.seeds), 1) * max(len(study.folds), 1)
