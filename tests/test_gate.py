"""The input gate (covidct.gate): pictures that are no CT slice are refused with a reason, real
slices of every source pass, and the registered pipeline gives a refused scan no label."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from covidct.config import GateConfig
from covidct.gate import REFUSED, LungEvidence, body_midline, image_problem, lung_evidence, lung_problem
from covidct.images import read_grayscale, read_mask
from covidct.registry.pipeline_model import TwoStagePipeline, predictions_table
from helpers.configs import make_config
from helpers.paths import DATA, REPO
from helpers.tiny import save_tiny_networks

pytestmark = pytest.mark.data  # reads the real data (skipped without it)

GATE = GateConfig(**yaml.safe_load((REPO / "params.yaml").read_text())["gate"])
LUNG = DATA / "lung-seg"


def _real_slices() -> list[Path]:
    """A few real slices of each source, the smallest COVID-CT picture among them."""
    covid = (
        sorted((DATA / "covid-ct" / "CT_NonCOVID").glob("*.*"))[:4]
        + sorted((DATA / "covid-ct" / "CT_COVID").glob("*.*"))[:4]
    )
    cc = [p for cls in ("NCP", "CP", "Normal") for p in sorted((DATA / "cc-ccii" / "images" / cls).glob("*.png"))[:3]]
    return [*covid, *cc, *sorted((LUNG / "images").glob("*.png"))[::200]]


NOT_CT = {
    "all black": np.zeros((512, 512), np.uint8),
    "all white": np.full((512, 512), 255, np.uint8),
    "one pixel": np.full((1, 1), 90, np.uint8),
    "grey with a little noise": np.random.default_rng(0).normal(128, 3, (256, 256)).clip(0, 255).astype(np.uint8),
    "a thumbnail": np.random.default_rng(0).integers(0, 256, (32, 40), dtype=np.uint8),
}


@pytest.mark.parametrize("name", NOT_CT)
def test_pictures_that_are_no_ct_slice_are_refused_with_a_reason(name: str) -> None:
    reason = image_problem(NOT_CT[name], GATE)
    assert reason is not None and reason.startswith(REFUSED) and "not a CT slice" in reason


@pytest.mark.parametrize("path", _real_slices(), ids=lambda p: p.name)
def test_real_slices_of_every_source_pass_the_picture_checks(path: Path) -> None:
    assert image_problem(read_grayscale(path), GATE) is None


def test_smallest_real_slice_is_above_the_minimum_side() -> None:
    # params.yaml says the smallest real slice of the three sources is 61 px: the gate must leave it
    smallest = min(min(read_grayscale(p).shape) for p in (DATA / "covid-ct").glob("CT_*/*.*"))
    assert smallest == 61 and smallest >= GATE.min_side


def test_lung_set_masks_show_two_lungs() -> None:
    """The lung set's own masks (drawn by radiologists) are two lungs either side of the midline."""
    manifest = pd.read_csv(LUNG / "manifest.csv")
    for slice_id in manifest["id"].iloc[::50]:
        gray, mask = read_grayscale(LUNG / "images" / f"{slice_id}.png"), read_mask(LUNG / "masks" / f"{slice_id}.png")
        evidence = lung_evidence(mask, gray)
        assert evidence.balance > 0.3 and abs(evidence.left + evidence.right - evidence.fraction) < 0.01, slice_id


def test_one_sided_or_tiny_lung_is_refused() -> None:
    gray = read_grayscale(LUNG / "images" / f"{pd.read_csv(LUNG / 'manifest.csv')['id'].iloc[500]}.png")
    mask = np.zeros(gray.shape, bool)
    mask[80:180, 20:100] = True  # one lung's worth, all left of the midline
    two_lungs = GATE.replace(min_lung_balance=0.05)  # params.yaml keeps this check off (see its comment)
    one_sided = lung_problem(lung_evidence(mask, gray), two_lungs)
    assert one_sided is not None and "both sides" in one_sided
    assert lung_problem(LungEvidence(0.2, 0.2, 0.0), GATE) is None  # off by default: one lung is not refused
    assert "lung mask covers" in lung_problem(LungEvidence(0.001, 0.0005, 0.0005), GATE)
    assert lung_problem(LungEvidence(0.2, 0.1, 0.09), two_lungs) is None


def test_midline_follows_the_body_not_the_image() -> None:
    body = np.zeros((100, 200), np.uint8)
    body[20:80, 110:190] = 200  # a patient off to the right of the picture
    assert body_midline(body) == pytest.approx(149.5)


def test_pipeline_refuses_what_the_gate_refuses_and_scores_the_rest(tmp_path: Path) -> None:
    weights = save_tiny_networks(tmp_path)
    pictures_only = GATE.replace(min_lung_fraction=0.0, min_lung_balance=0.0)  # an untrained segmenter finds no lungs
    gated = TwoStagePipeline(
        *weights, make_config("crop", min_lung_fraction=0.0), 0.5, pictures_only, torch.device("cpu")
    )
    open_ = TwoStagePipeline(*weights, make_config("crop", min_lung_fraction=0.0), 0.5, None, torch.device("cpu"))
    real = [read_grayscale(p) for p in _real_slices()[:2]]
    images = [NOT_CT["all black"], real[0], NOT_CT["one pixel"], real[1], NOT_CT["all white"]]
    names = [f"scan {i}" for i in range(len(images))]
    answers = gated.predict_arrays(names, images)
    table = predictions_table(answers)
    assert table["label"].isna().tolist() == [True, False, True, False, True]
    assert (
        all(table["error"][i].startswith(REFUSED) for i in (0, 2, 4)) and table["error"][1] == table["error"][3] == ""
    )
    # the scans the gate lets through get exactly the scores they get without a gate
    assert [answers[1].probability, answers[3].probability] == [
        p.probability for p in open_.predict_arrays(names[1::2], real)
    ]
    assert all(
        p.error == "" for p in open_.predict_arrays(names, images)
    )  # no gate: everything gets a label, as before
