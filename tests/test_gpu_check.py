"""The prepared device check (scripts/gpu_check.py) dry-runs end to end on the CPU, on the tiny
profile's real data, as a session lent a GPU would run it there: every stage and network timed,
the headline metrics read back, the imported modules recorded, and the wheels made from them
leave out what the device already has."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers.paths import REPO
from helpers.tiny import clean_env, prepare_tiny_root

pytestmark = [pytest.mark.slow, pytest.mark.data]


def test_the_device_check_dry_runs_every_stage_and_network(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    root = prepare_tiny_root(tmp_path / "root")
    out = tmp_path / "out"
    bundle = _gpu_bundle()
    command = bundle.dry_run_command(REPO, root, out)  # as gpu_bundle.py runs it: what stays behind is blocked
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "check.json").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert len(report["stages"]) == len(stages) + 1 - 2  # train_classifier twice; prepare_data and audit_data before
    assert {"train_segmenter", "crop_images", "train_classifier@raw", "register_model"} <= set(report["stages"])
    assert all(stage["seconds"] > 0 for stage in report["stages"].values())
    assert list(report["networks"]) == ["efficientnet_b0", "efficientnet_b1"]
    assert all(n["train_images_per_s"] > 0 for n in report["networks"].values())
    assert 0.0 <= report["results"]["segmenter_dice_mean"] <= 1.0
    assert (root / "models/pipeline/MLmodel").is_file()  # registered, as register_model does under DVC
    modules = json.loads((out / "modules.json").read_text())
    assert {"covidct", "monai", "mlflow", "albumentations", "timm"} <= set(modules)
    assert not {"gdcm", "pylibjpeg"} & set(modules)  # blocked: the check ran without them
    wheels = bundle.needed_distributions(modules)
    assert {"monai", "mlflow-skinny", "albumentations", "timm"} <= set(wheels)  # timm travels: its API is pinned here
    on_device = ("torch", "torchvision", "triton", "nvidia-", "cuda-", "numpy", "pandas")
    assert not [name for name in wheels if name.startswith(on_device)]  # torch's own CUDA libraries are gigabytes
    assert not bundle.LEFT_BEHIND & set(wheels)


def _gpu_bundle():
    spec = importlib.util.spec_from_file_location("gpu_bundle", REPO / "scripts/gpu_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
