"""Tests for covidct.config (typed, validated params.yaml) and covidct.profiles (comment-keeping merges)."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from covidct.cli import DEFAULT_MODEL
from covidct.config import (
    SECTIONS,
    ClassifierConfig,
    ConfigError,
    CropConfig,
    DataConfig,
    Params,
    PreprocessConfig,
    RegistryConfig,
    SegmenterConfig,
    load_params,
)
from covidct.profiles import PROFILES, apply_profile, available, set_params
from covidct.schema import set_dotted
from helpers.configs import yaml_like
from helpers.paths import REPO

PARAMS = REPO / "params.yaml"
PROFILE_FILES = sorted((REPO / PROFILES).glob("*.yaml"))


@pytest.fixture(scope="module")
def params() -> dict[str, Any]:
    return load_params(PARAMS)


def _with(params: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """``params`` with one key set and not checked: the tests hand the reader bad values."""
    out = copy.deepcopy(params)
    set_dotted(out, {dotted: value}, new_keys=True)
    return out


# ---------------------------------------------------------------- config


def test_every_section_of_params_yaml_reads_back_whole(params: dict[str, Any]) -> None:
    """Each section becomes its own model with every key it holds, as written: the reader
    neither drops a key nor invents one (a config has no defaults), and the whole file reads
    into the same values section by section."""
    whole = Params.of(params)
    assert set(SECTIONS) | {"sources"} == set(params)
    for name, kind in SECTIONS.items():
        config = kind.of(params)
        assert kind.KEY == name and getattr(whole, name) == config, name
        assert yaml_like(config.model_dump()) == params[name], name
    assert {k: yaml_like(v.model_dump()) for k, v in whole.sources.items()} == params["sources"]


def test_a_config_is_frozen_and_replace_checks_the_change(params: dict[str, Any]) -> None:
    crop = CropConfig.of(params)
    with pytest.raises(ValidationError):
        crop.margin = 3  # type: ignore[misc]
    assert crop.replace(margin=3).margin == 3 and crop.margin == params["crop"]["margin"]
    with pytest.raises(ConfigError, match=r"CropConfig: margin must be in \[-200, 200\], got 500"):
        crop.replace(margin=500)


def test_the_cli_default_outside_a_checkout_is_the_registry_params_name(params: dict[str, Any]) -> None:
    """`covidct predict` run where there is no params.yaml falls back to a constant; it must name
    the model and alias every checkout registers, or it loads nothing."""
    registry = RegistryConfig.of(params)
    assert f"models:/{registry.model_name}@{registry.alias}" == DEFAULT_MODEL


def test_int_given_for_float_is_converted(params: dict[str, Any]) -> None:
    seg = SegmenterConfig.of(_with(params, "segmenter.tversky_gamma", 2))
    assert seg.tversky_gamma == 2.0 and isinstance(seg.tversky_gamma, float)


@pytest.mark.parametrize(
    ("dotted", "value", "key"),
    [
        ("classifier.model", "efficientnet_b9", "classifier.model"),
        ("segmenter.tversky_alpha", 1.5, "segmenter.tversky_alpha"),
        ("segmenter.tversky_beta", -0.1, "segmenter.tversky_beta"),
        ("segmenter.tversky_gamma", 0, "segmenter.tversky_gamma"),
        ("segmenter.tversky_gamma", 5.5, "segmenter.tversky_gamma"),
        ("lesion.tversky_alpha", 1.5, "lesion.tversky_alpha"),  # the lesion net's own key, not the lung net's
        ("lesion.channels", [16], "lesion.channels"),
        ("lesion.init", "imagenet", "lesion.init"),
        ("crop.margin", 1000, "crop.margin"),
        ("crop.margin", -201, "crop.margin"),
        ("crop.margin", 2.5, "crop.margin"),  # not an integer
        ("segmenter.lr", "fast", "segmenter.lr"),  # a string where a number is expected
        ("classifier.epochs", "25", "classifier.epochs"),
        ("segmenter.augment", "yes", "segmenter.augment"),
        ("evaluate.n_bootstrap", True, "evaluate.n_bootstrap"),  # a bool is not a number
        ("classifier.augment.rotate", 270.0, "classifier.augment.rotate"),
        ("classifier.augment.zoom", 0.1, "classifier.augment.zoom"),  # unknown nested key
        ("segmenter.dropout", 0.1, "segmenter.dropout"),  # unknown key
        ("segmenter.channels", 16, "segmenter.channels"),  # not a list
        ("segmenter.channels", [16], "segmenter.channels"),  # one level only
        ("preprocess.size", 100, "preprocess.size"),  # not a multiple of 16
        ("classifier.batch_size", 1, "classifier.batch_size"),
        ("classifier.ema_decay", 1.0, "classifier.ema_decay"),  # 1 would never move from the initial weights
        ("evaluate.threshold", 1.0, "evaluate.threshold"),
        ("classifier.select_metric", "loss", "classifier.select_metric"),
        ("crop", [1, 2], "crop"),  # a section that is not a mapping
        ("classifier.pretrained", "", "classifier.pretrained"),
        ("evaluate.val_recall_floor", 1.5, "evaluate.val_recall_floor"),
        ("registry.min_val_recall", -0.1, "registry.min_val_recall"),
        ("registry.select_metric", "loss", "registry.select_metric"),
        ("registry.alias", "champion!", "registry.alias"),
    ],
)
def test_bad_value_names_key(params: dict[str, Any], dotted: str, value: Any, key: str) -> None:
    bad = _with(params, dotted, value)
    with pytest.raises(ConfigError) as info:
        Params.of(bad)
    assert key in str(info.value)
    with pytest.raises(ConfigError, match=re.escape(key)):
        SECTIONS[dotted.split(".")[0]].of(bad)


@pytest.mark.parametrize(
    ("dotted", "value", "message"),
    [
        (
            "sources.sars-cov-2-ct.split",
            "random",
            "sources.sars-cov-2-ct.split must be one of lists, patients, manifest",
        ),
        ("sources.cc-ccii.covid", [], "sources.cc-ccii.covid must name at least one class"),
        ("sources.cc-ccii.patient", " ", "sources.cc-ccii.patient must not be empty"),
        ("sources.covid-ct.thin", "no", "sources.covid-ct.thin must be true or false"),
        ("classifier.sources", ["covid-ct", "mosmed"], "classifier.sources names 'mosmed', which is not declared"),
    ],
)
def test_bad_source_declaration_names_the_source_and_key(
    params: dict[str, Any], dotted: str, value: Any, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Params.of(_with(params, dotted, value))


def test_a_source_declaration_has_no_defaults(params: dict[str, Any]) -> None:
    bad = copy.deepcopy(params)
    del bad["sources"]["sars-cov-2-ct"]["scan"]
    with pytest.raises(ConfigError, match=re.escape("sources.sars-cov-2-ct.scan is missing")):
        Params.of(bad)
    bad["sources"] = {}
    with pytest.raises(ConfigError, match="sources must map each labelled dataset"):
        Params.of(bad)


def test_value_named_in_message(params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"segmenter\.tversky_alpha.*1\.5"):
        Params.of(_with(params, "segmenter.tversky_alpha", 1.5))
    with pytest.raises(ConfigError, match=r"classifier\.model.*efficientnet_b9"):
        Params.of(_with(params, "classifier.model", "efficientnet_b9"))


def test_lite0_wheel_needs_a_lite0_model(params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"classifier\.pretrained.*efficientnet_b4"):
        ClassifierConfig.of(_with(params, "classifier.model", "efficientnet_b4"))


def test_string_inside_channels_list_names_key(params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"segmenter\.channels"):
        Params.of(_with(params, "segmenter.channels", [8, "16", 32]))


def test_accepted_values_and_boundaries(params: dict[str, Any]) -> None:
    for i in range(8):
        for name in (f"efficientnet_b{i}", f"tf_efficientnet_b{i}"):
            assert (
                ClassifierConfig.of(
                    _with(_with(params, "classifier.pretrained", "none"), "classifier.model", name)
                ).model
                == name
            )
    assert SegmenterConfig.of(_with(params, "segmenter.tversky_alpha", 1.0)).tversky_alpha == 1.0
    assert SegmenterConfig.of(_with(params, "segmenter.tversky_gamma", 5.0)).tversky_gamma == 5.0
    assert CropConfig.of(_with(params, "crop.margin", 200)).margin == 200
    assert CropConfig.of(_with(params, "crop.margin", -200)).margin == -200
    with pytest.raises(ConfigError, match=r"crop\.margin must be an integer, got 3\.0"):
        CropConfig.of(_with(params, "crop.margin", 3.0))  # no silent conversion, even of an integral float
    for size in (32, 48, 512):
        assert PreprocessConfig.of(_with(params, "preprocess.size", size)).size == size


def test_unknown_section_names_it(params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="training"):
        Params.of({**params, "training": {"epochs": 3}})


def test_missing_section_names_it(params: dict[str, Any]) -> None:
    without = {k: v for k, v in params.items() if k != "crop"}
    with pytest.raises(ConfigError, match="'crop'"):
        CropConfig.of(without)


@pytest.mark.parametrize(
    "dotted",
    ["classifier.lr", "classifier.augment.rotate", "segmenter.tversky_gamma", "gate.min_std", "registry.alias"],
)
def test_missing_key_names_it_instead_of_taking_a_default(params: dict[str, Any], dotted: str) -> None:
    """Configs have no defaults: params.yaml (or a profile) is the one recipe, never a stale second one."""
    changed = copy.deepcopy(params)
    *parents, leaf = dotted.split(".")
    node = changed
    for key in parents:
        node = node[key]
    del node[leaf]
    with pytest.raises(ConfigError, match=rf"params.yaml: {re.escape(dotted)} is missing"):
        Params.of(changed)


def test_validate_all_rejects_missing_section(params: dict[str, Any]) -> None:
    without = {k: v for k, v in params.items() if k != "crop"}
    with pytest.raises(ConfigError, match="crop"):
        Params.of(without)


def test_missing_params_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_params(missing)


def test_invalid_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("segmenter:\n  epochs: [1, 2\n  lr: 0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(bad)


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- profiles


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    shutil.copy2(PARAMS, tmp_path / "params.yaml")
    shutil.copytree(REPO / PROFILES, tmp_path / PROFILES)
    return tmp_path


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _comments(text: str) -> list[str]:
    return [line.split("#", 1)[1].strip() for line in text.splitlines() if "#" in line]


def test_profiles_exist() -> None:
    assert {p.stem for p in PROFILE_FILES} >= {"paper", "tiny"}
    assert available(REPO) == [p.stem for p in PROFILE_FILES]


@pytest.mark.parametrize("profile", PROFILE_FILES, ids=lambda p: p.stem)
def test_apply_profile(root: Path, profile: Path) -> None:
    before_text = (root / "params.yaml").read_text(encoding="utf-8")
    before = yaml.safe_load(before_text)
    overrides = _leaves(yaml.safe_load(profile.read_text(encoding="utf-8")))
    assert overrides, f"{profile} sets nothing"

    apply_profile(root, profile.stem)

    after_text = (root / "params.yaml").read_text(encoding="utf-8")
    after = load_params(root / "params.yaml")
    Params.of(after)
    after_leaves, before_leaves = _leaves(after), _leaves(before)
    for key, value in overrides.items():
        assert after_leaves[key] == value, key
    # nothing else changed
    assert set(after_leaves) == set(before_leaves)
    for key in set(before_leaves) - set(overrides):
        assert after_leaves[key] == before_leaves[key], key
    # every comment of params.yaml survives, in order
    assert "weight of false NEGATIVES" in after_text
    assert any("weight of false NEGATIVES" in line and "tversky_alpha" in line for line in after_text.splitlines())
    assert _comments(after_text) == _comments(before_text)
    # applying twice is idempotent
    apply_profile(root, profile.stem)
    assert (root / "params.yaml").read_text(encoding="utf-8") == after_text


def test_set_params_rewrites_only_the_keys_it_sets(root: Path) -> None:
    """`sweep-best --apply` and profiles edit a file people read: quotes, block lists and long
    lines stay as written, and a list set lands on its key's line, beside its comment."""
    before = (root / "params.yaml").read_text(encoding="utf-8")
    segmenter = load_params(root / "params.yaml")["segmenter"]
    set_params(root, {"segmenter.epochs": segmenter["epochs"]})
    assert (root / "params.yaml").read_text(encoding="utf-8") == before
    wider = [2 * c for c in segmenter["channels"]]
    set_params(root, {"segmenter.channels": wider})
    after = (root / "params.yaml").read_text(encoding="utf-8").splitlines()
    changed = [line for line in after if line not in before.splitlines()]
    assert len(changed) == 1 and changed[0].startswith(f"  channels: {wider}") and "#" in changed[0]


def test_tiny_profile_values(root: Path) -> None:
    alpha = SegmenterConfig.of(load_params(root / "params.yaml")).tversky_alpha
    apply_profile(root, "tiny")
    params = load_params(root / "params.yaml")
    assert SegmenterConfig.of(params).channels == (4, 8, 16)
    assert SegmenterConfig.of(params).epochs == 1
    assert ClassifierConfig.of(params).image_size == 64
    assert DataConfig.of(params).subset_per_class == 3
    assert SegmenterConfig.of(params).tversky_alpha == alpha  # untouched


def test_profile_with_unknown_key_leaves_params_unchanged(root: Path) -> None:
    (root / PROFILES / "broken.yaml").write_text("segmenter:\n  epochs: 2\n  dropout: 0.5\n", encoding="utf-8")
    before = (root / "params.yaml").read_bytes()
    with pytest.raises(ConfigError, match=r"segmenter\.dropout"):
        apply_profile(root, "broken")
    assert (root / "params.yaml").read_bytes() == before
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml", "pipelines"]  # no temp file left


def test_profile_with_unknown_section_leaves_params_unchanged(root: Path) -> None:
    (root / PROFILES / "broken.yaml").write_text("training:\n  epochs: 2\n", encoding="utf-8")
    before = (root / "params.yaml").read_bytes()
    with pytest.raises(ConfigError, match="training"):
        apply_profile(root, "broken")
    assert (root / "params.yaml").read_bytes() == before


def test_profile_with_invalid_value_leaves_params_unchanged(root: Path) -> None:
    (root / PROFILES / "broken.yaml").write_text("segmenter:\n  tversky_alpha: 1.5\n", encoding="utf-8")
    before = (root / "params.yaml").read_bytes()
    with pytest.raises(ConfigError, match=r"segmenter\.tversky_alpha"):
        apply_profile(root, "broken")
    assert (root / "params.yaml").read_bytes() == before


def test_unknown_profile_lists_available(root: Path) -> None:
    with pytest.raises(ConfigError, match="no such profile") as info:
        apply_profile(root, "huge")
    for name in available(root):
        assert name in str(info.value)
