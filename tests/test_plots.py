from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidct.plots import plot_confusion_matrices, plot_roc_curves, plot_training_curves


def _assert_only_png(directory: Path, name: str) -> None:
    assert [p.name for p in directory.iterdir()] == [name], "temporary files left behind"
    with Image.open(directory / name) as img:
        assert img.format == "PNG"
        img.verify()
    with Image.open(directory / name) as img:
        assert img.size[0] > 100 and img.size[1] > 100


def _pixels(path: Path, rgb: tuple[int, int, int], tolerance: int = 40) -> int:
    """How many pixels of the PNG are within ``tolerance`` of ``rgb`` on every channel."""
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=int)
    return int((np.abs(pixels - np.array(rgb)).max(axis=-1) <= tolerance).sum())


RED, BLUE = (255, 0, 0), (0, 0, 255)


def test_plot_roc_curves(tmp_path):
    curves = {
        "raw": (np.array([0, 0.2, 1]), np.array([0, 0.7, 1]), 0.75),
        "cropped": (np.array([0, 0.1, 1]), np.array([0, 0.9, 1]), 0.9),
        "other": ([0, 1], [0, 1], 0.5),
    }
    plot_roc_curves(curves, tmp_path / "figures" / "roc.png")
    _assert_only_png(tmp_path / "figures", "roc.png")
    # without segmentation red and dotted, with segmentation blue: both curves are drawn
    assert (
        _pixels(tmp_path / "figures" / "roc.png", RED) > 200 and _pixels(tmp_path / "figures" / "roc.png", BLUE) > 200
    )
    plot_roc_curves({"cropped": curves["cropped"]}, tmp_path / "one.png")
    assert _pixels(tmp_path / "one.png", RED) == 0 and _pixels(tmp_path / "one.png", BLUE) > 200


def test_plot_roc_curves_overwrites(tmp_path):
    path = tmp_path / "roc.png"
    path.write_bytes(b"old")
    plot_roc_curves({"cropped": ([0, 1], [0, 1], 0.5)}, path)
    _assert_only_png(tmp_path, "roc.png")


def test_plot_confusion_matrices(tmp_path):
    confusions = {"raw": {"tn": 80, "fp": 25, "fn": 15, "tp": 83}, "cropped": {"tn": 0, "fp": 0, "fn": 0, "tp": 0}}
    plot_confusion_matrices(confusions, tmp_path / "confusion.png")
    _assert_only_png(tmp_path, "confusion.png")
    with Image.open(tmp_path / "confusion.png") as img:
        width, height = img.size
        pixels = np.asarray(img.convert("RGB"), dtype=int)
    assert 1.6 < width / height < 2.4  # two matrices side by side
    left, right = pixels[:, : width // 2], pixels[:, width // 2 :]
    dark = (pixels.sum(axis=-1) < 250).astype(int)  # the Blues map's deep cells: the counts' largest
    assert dark[:, : width // 2].sum() > 1000 and (right.min(axis=-1) > 200).mean() > (left.min(axis=-1) > 200).mean()


def test_plot_training_curves(tmp_path):
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "train_loss": [0.9, 0.6, 0.4],
            "val_loss": [1.0, 0.7, 0.6],
            "val_auc": [0.6, 0.7, 0.8],
            "note": ["a", "b", "c"],
        }
    )
    plot_training_curves(history, tmp_path / "train.png", "Classifier")
    _assert_only_png(tmp_path, "train.png")
    plot_training_curves(history[["epoch", "train_loss"]], tmp_path / "loss" / "only.png", "Classifier")
    with Image.open(tmp_path / "train.png") as both, Image.open(tmp_path / "loss" / "only.png") as one:
        assert both.size[0] > 1.7 * one.size[0]  # losses and scores on two axes, side by side


def test_failed_plot_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        plot_training_curves(pd.DataFrame({"epoch": [1, 2]}), tmp_path / "train.png", "empty")
    with pytest.raises(KeyError):
        plot_confusion_matrices({"raw": {"tn": 1}}, tmp_path / "confusion.png")
    assert list(tmp_path.iterdir()) == []
