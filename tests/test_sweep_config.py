"""Sweep definitions: every shipped one is valid, and a bad one names the key."""

from __future__ import annotations

import functools
from pathlib import Path

import optuna
import pytest

from covidct.config import ConfigError, Params, load_params
from covidct.experiments.overrides import with_overrides
from covidct.sweep.config import load_sweep
from covidct.sweep.space import suggest
from helpers.configs import yaml_like
from helpers.paths import REPO

SHIPPED = sorted((REPO / "pipelines" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_sweep_gives_valid_params(path: Path) -> None:
    """Every trial a sweep can draw is a valid params.yaml, and each drawn value is what the
    typed config then holds (a list choice comes back as the list, not its stored label)."""
    config = load_sweep(path)
    base = load_params(REPO / "params.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    for _ in range(20):
        trial = study.ask()
        suggested = suggest(trial, config.space)
        whole = Params.of(with_overrides(base, {**config.budget, **suggested}))
        study.tell(trial, 0.0)
        for dotted, value in suggested.items():
            held = functools.reduce(getattr, dotted.split("."), whole)
            assert yaml_like(held) == value, dotted


def test_gpu_sweep_covers_the_mission_space() -> None:
    config = load_sweep(REPO / "pipelines" / "sweeps" / "gpu-full.yaml")
    assert set(config.space["classifier.model"].choices) == {
        f"tf_efficientnet_b{i}" for i in range(8)
    }  # B0-B7, all with hub weights
    assert config.budget["classifier.pretrained"] == "timm"
    assert {"segmenter.tversky_alpha", "segmenter.tversky_beta", "segmenter.tversky_gamma", "crop.margin"} <= set(
        config.space
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("study: s\nspace: {crop.margin: {low: 5, high: 1}}\n", "space.crop.margin"),
        ("study: s\nspace: {crop.margin: {low: 0, high: 5, bogus: 1}}\n", "space.crop.margin.bogus"),
        ("study: s\nspace: {classifier.lr: {low: 0, high: 1, log: true}}\n", "space.classifier.lr.low"),
        ("study: s\nspace: {classifier.model: {choices: []}}\n", "space.classifier.model.choices"),
        ("study: s\nobjective: test_auc\nspace: {crop.margin: {low: 0, high: 5}}\n", "objective"),
        ("study: s\nn_trials: 0\nspace: {crop.margin: {low: 0, high: 5}}\n", "n_trials"),
        ("study: s\n", "space"),
        ("space: {crop.margin: {low: 0, high: 5}}\n", "study"),
        ("study: s\nbogus: 1\nspace: {crop.margin: {low: 0, high: 5}}\n", "bogus"),
        ("study: s\ntrains: segmenter\nspace: {crop.margin: {low: 0, high: 5}}\n", "objective"),
        ("study: s\nobjective: val_dice\nspace: {crop.margin: {low: 0, high: 5}}\n", "objective"),
        ("study: s\ntrains: everything\nspace: {crop.margin: {low: 0, high: 5}}\n", "trains"),
    ],
)
def test_bad_sweep_definition_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{path}: {key} "):
        load_sweep(path)


def test_override_of_an_unknown_or_out_of_range_key_is_refused() -> None:
    base = load_params(REPO / "params.yaml")
    with pytest.raises(ConfigError, match="crop.bogus"):
        with_overrides(base, {"crop.bogus": 1})
    with pytest.raises(ConfigError, match="classifier.model"):
        with_overrides(base, {"classifier.model": "efficientnet_b9"})
    assert base["crop"]["margin"] == 5  # the base is never modified


def test_a_drawn_value_reads_back_as_params_yaml_writes_it() -> None:
    """Optuna keeps a list choice as its label and a stepped float with its binary noise; the
    trial, and `sweep-best --apply`, get the list and the rounded number."""
    config = load_sweep(REPO / "pipelines" / "sweeps" / "segmenter-cpu.yaml")
    stored = {"segmenter.tversky_alpha": 0.6000000000000001, "segmenter.channels": "[16, 32, 64, 128, 256]"}
    drawn = suggest(optuna.trial.FixedTrial(stored), {k: config.space[k] for k in stored})
    assert drawn == {"segmenter.tversky_alpha": 0.6, "segmenter.channels": [16, 32, 64, 128, 256]}
