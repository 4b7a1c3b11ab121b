"""The epoch-budget comparison of the lung and lesion nets (scripts/segmenter_budget.py) on the
tiny profile's real slices: both nets trained per arm and seed, paired per slice, runs reused by
their settings, and weights a pipeline run wrote scored instead of trained again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from covidct.config import ConfigError
from covidct.levers.segmenter_budget import RUNS, budget_markdown, compare_budgets
from helpers.tiny import prepare_tiny_root

pytestmark = [pytest.mark.slow, pytest.mark.data]
ARMS = {"one": {"segmenter.epochs": 1, "lesion.epochs": 1}, "two": {"segmenter.epochs": 2, "lesion.epochs": 2}}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_tiny_root(tmp_path_factory.mktemp("budget"))


def test_arms_over_seeds_paired_and_reused(root: Path) -> None:
    cpu = torch.device("cpu")
    record = compare_budgets(root, ARMS, [0, 1], cpu)
    assert set(record["runs"]) == {"one seed 0", "one seed 1", "two seed 0", "two seed 1"}
    assert record["base"] == "one" and set(record["deltas"]) == {"two"}
    for part in record["deltas"]["two"].values():
        assert part["ci_low"] <= part["delta"] <= part["ci_high"]
        assert part["patient_ci_low"] <= part["delta"] <= part["patient_ci_high"]
    run = record["runs"]["two seed 1"]
    assert run["settings"]["segmenter"]["epochs"] == 2 and run["settings"]["lesion"]["seed"] == 1
    assert set(run["minutes"]) == {"segmenter", "lesion"}
    history = (root / RUNS / "two_seed1" / "history_lesion.csv").read_text().splitlines()
    assert len(history) == 3  # header and two epochs: the lesion net ran the arm's budget
    # each arm's delta is the difference of the runs' means, seed against seed
    lung = record["deltas"]["two"]["segmenter_val"]["delta"]
    means = {name: r["segmenter_val"] for name, r in record["runs"].items()}
    expected = (means["two seed 0"] - means["one seed 0"] + means["two seed 1"] - means["one seed 1"]) / 2
    assert lung == pytest.approx(expected)
    assert record["means"]["two"]["segmenter_val"] == pytest.approx((means["two seed 0"] + means["two seed 1"]) / 2)
    assert "**two**" in budget_markdown(record)

    stamps = {p: p.stat().st_mtime_ns for p in (root / RUNS).glob("*/run.json")}
    again = compare_budgets(root, ARMS, [0, 1], cpu)  # reused: nothing trains or is rewritten
    assert again["runs"] == record["runs"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_weights_from_a_pipeline_run_are_scored_not_trained(root: Path, tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    compare_budgets(root, ARMS, [0], cpu)
    models = tmp_path / "models"
    for net in ("segmenter", "lesion"):
        (models / net).mkdir(parents=True)
        (models / net / "model.safetensors").write_bytes(
            (root / RUNS / "one_seed0" / f"{net}.safetensors").read_bytes()
        )
    arms = {"one": ARMS["one"], "three": {"segmenter.epochs": 3, "lesion.epochs": 1}}
    record = compare_budgets(root, arms, [0], cpu, {("three", 0): models})
    run = record["runs"]["three seed 0"]
    assert run["minutes"] == {} and str(models) in run["weights"]
    # the same weights score the same Dice as the run they came from
    for key in ("segmenter_val", "segmenter_test", "lesion_val", "lesion_test"):
        assert run[key] == record["runs"]["one seed 0"][key]
        assert record["deltas"]["three"][key]["delta"] == 0


def test_weights_from_a_folder_without_them_is_one_error(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no segmenter weights to score"):
        compare_budgets(root, {"one": ARMS["one"]}, [5], torch.device("cpu"), {("one", 5): tmp_path})
    assert not (root / RUNS / "one_seed5").exists()


@pytest.mark.parametrize(
    ("arm", "message"),
    [
        ("broken", "--arm 'broken': expected NAME=key=value"),
        ("bad=segmenter.epochs", "--arm 'bad=segmenter.epochs': expected NAME=key=value"),
        ("bad=segmenter.epoch=3", "segmenter.epoch"),
    ],
)
def test_script_names_a_malformed_arm(root: Path, arm: str, message: str) -> None:
    script = Path(__file__).parents[1] / "scripts" / "segmenter_budget.py"
    done = subprocess.run(
        [sys.executable, str(script), "--arm", arm], cwd=root, capture_output=True, text=True, check=False
    )
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr
    assert not (root / "reports" / "segmenter" / "budget.json").exists()
