"""What the classifier sees (lung-masked, standardised views), the multi-source training table,
the source-balanced sampler, and that training, evaluation and the registered pipeline agree."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidct.checkpoints import load_checkpoint, save_state_dict
from covidct.classification.adaptation import adapt_batchnorm
from covidct.classification.data import resize_for_classifier
from covidct.classification.inputs import STANDARD_MEAN, STANDARD_SD, classifier_view
from covidct.classification.model import build_classifier
from covidct.classification.table import checkpoint_meta, classifier_table, evenly_spaced
from covidct.classification.train import (
    SourceBatches,
    balanced_sampler,
    fit_and_predict,
    predict_per_group,
    predict_scores,
)
from covidct.config import ConfigError, declared_sources, load_params
from covidct.images import read_grayscale
from covidct.lung_box import crop_to_lung_bbox
from covidct.lung_crop import LungCrop, segment_and_crop
from covidct.registry.pipeline_model import TwoStagePipeline
from covidct.stages.evaluate import paper_split
from covidct.thresholds import decision_threshold
from helpers.configs import make_config
from helpers.paths import DATA, REPO
from helpers.tiny import save_tiny_networks

pytestmark = pytest.mark.data  # reads the real data (skipped without it)

SLICE = DATA / "covid-ct" / "CT_COVID" / "2020.01.24.919183-p27-132.png"


def _lungs(shape: tuple[int, int]) -> np.ndarray:
    """Two ellipses either side of the midline: a mask shaped like a pair of lungs."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    left = ((xx - 0.3 * w) / (0.15 * w)) ** 2 + ((yy - 0.5 * h) / (0.3 * h)) ** 2 <= 1
    right = ((xx - 0.7 * w) / (0.15 * w)) ** 2 + ((yy - 0.5 * h) / (0.3 * h)) ** 2 <= 1
    return left | right


def test_plain_view_is_the_resized_crop_as_before() -> None:
    image = read_grayscale(SLICE)
    assert np.array_equal(classifier_view(image, None, 96, False, False, False), resize_for_classifier(image, 96))


def test_lung_mask_blanks_everything_outside_the_lung_and_keeps_the_lung() -> None:
    image = read_grayscale(SLICE)
    mask = _lungs(image.shape)
    view = classifier_view(image, mask, 128, lung_mask=True, standardise=False, equalise=False)
    lung = resize_for_classifier(mask.astype(np.uint8) * 255, 128) > 127

    def away(m: np.ndarray) -> np.ndarray:  # two pixels from the mask's edge, where resizing cannot blur it
        return m & np.roll(m, 2, 0) & np.roll(m, -2, 0) & np.roll(m, 2, 1) & np.roll(m, -2, 1)

    assert view[away(~lung)].max() == 0
    assert np.array_equal(view[away(lung)], resize_for_classifier(image, 128)[away(lung)])


def test_standardised_view_does_not_see_the_ct_window() -> None:
    """Two sources showing the same lung through different windows (a linear grey-level map)
    give the same standardised view, up to rounding: the window no longer tells them apart."""
    image = read_grayscale(SLICE)
    mask = _lungs(image.shape)
    other_window = np.clip(0.6 * image.astype(float) + 60, 0, 255).round().astype(np.uint8)
    a = classifier_view(image, mask, 128, lung_mask=True, standardise=True, equalise=False)
    b = classifier_view(other_window, mask, 128, lung_mask=True, standardise=True, equalise=False)
    lung = a > 0
    assert np.abs(a.astype(int) - b.astype(int))[lung].mean() < 2.0
    assert not np.array_equal(resize_for_classifier(image, 128), resize_for_classifier(other_window, 128))
    small_lung = resize_for_classifier(mask.astype(np.uint8) * 255, 128) == 255
    values = classifier_view(image, mask, 128, lung_mask=False, standardise=True, equalise=False)[small_lung].astype(
        float
    )
    assert values.mean() == pytest.approx(STANDARD_MEAN, abs=3) and values.std() == pytest.approx(STANDARD_SD, rel=0.15)


def test_an_empty_mask_shows_the_whole_image_and_a_wrong_mask_is_an_error() -> None:
    image = read_grayscale(SLICE)
    empty = np.zeros(image.shape, dtype=bool)
    view = classifier_view(image, empty, 64, lung_mask=True, standardise=False, equalise=False)
    assert np.array_equal(view, resize_for_classifier(image, 64))  # as the crop stage keeps the whole image
    with pytest.raises(ValueError, match="mask shape"):
        classifier_view(image, empty[:10], 64, lung_mask=True, standardise=False, equalise=False)
    with pytest.raises(ValueError, match="needs the crop's lung mask"):
        classifier_view(image, None, 64, lung_mask=False, standardise=True, equalise=False)


def test_the_crops_lung_mask_is_aligned_with_the_crop() -> None:
    """A picture that is its own mask: the crop and the crop's mask must show the same shape."""
    mask = _lungs((300, 400))
    image = np.where(mask, 200, 20).astype(np.uint8)
    result = LungCrop(mask, crop_to_lung_bbox(image, mask, 5))
    assert result.crop.fallback is None and result.lung.shape == image.shape
    assert np.mean((result.crop.image > 110) == result.lung) > 0.99


def test_evenly_spaced_slices_per_scan() -> None:
    table = pd.DataFrame({"scan": ["1"] * 10 + ["2"] * 2, "relpath": [f"s_{k:04d}.png" for k in [*range(10), 0, 1]]})
    picked = evenly_spaced(table.sample(frac=1, random_state=0), 4)  # any row order: relpaths sort in slice order
    assert picked.loc[picked["scan"] == "1", "relpath"].str[2:6].astype(int).tolist() == [0, 3, 6, 9]  # first to last
    assert len(picked[picked["scan"] == "2"]) == 2  # a short scan gives what it has
    assert len(evenly_spaced(table, 0)) == 12


def test_equalised_view_does_not_see_the_ct_window() -> None:
    """Two windows of one slice (a monotone grey-level map) look alike once equalised, and not before."""
    image = read_grayscale(SLICE)
    other_window = np.clip(image.astype(float) * 0.6 + 60, 0, 255).astype(np.uint8)
    plain = [classifier_view(x, None, 128, False, False, False).astype(float) for x in (image, other_window)]
    equal = [classifier_view(x, None, 128, False, False, True).astype(float) for x in (image, other_window)]
    assert np.abs(plain[0] - plain[1]).mean() > 20
    assert np.abs(equal[0] - equal[1]).mean() < 5


def test_balanced_sampler_draws_every_source_and_class_alike() -> None:
    sources = np.array(["covid-ct"] * 100 + ["cc-ccii"] * 900)
    labels = np.array([1] * 50 + [0] * 50 + [1] * 100 + [0] * 800)
    draws = np.array(list(balanced_sampler(sources, labels, seed=0)))
    cells = pd.Series([f"{s}:{y}" for s, y in zip(sources[draws], labels[draws], strict=True)]).value_counts(
        normalize=True
    )
    assert len(draws) == 1000 and cells.between(0.2, 0.3).all() and len(cells) == 4
    assert np.array_equal(draws, np.array(list(balanced_sampler(sources, labels, seed=0))))  # seeded
    assert balanced_sampler(sources[:100], labels[:100], seed=0) is None  # one source: plain shuffling


def test_source_batches_hold_one_source_each_in_turn_and_both_classes() -> None:
    sources = np.array(["covid-ct"] * 100 + ["cc-ccii"] * 900 + ["sars-cov-2-ct"] * 40)
    labels = np.array([1] * 50 + [0] * 50 + [1] * 100 + [0] * 800 + [1] * 30 + [0] * 10)
    batches = list(SourceBatches(sources, labels, 8, torch.Generator().manual_seed(0)))
    assert len(batches) == 1040 // 8 and all(len(b) == 8 for b in batches)
    assert all(len(set(sources[b])) == 1 for b in batches)  # BatchNorm sees one source at a time
    per_source = pd.Series([sources[b[0]] for b in batches]).value_counts()
    assert per_source.max() - per_source.min() <= 1  # the sources in turn, not by their size
    drawn = np.concatenate(batches)
    for source in np.unique(sources):
        covid = labels[drawn[sources[drawn] == source]].mean()
        assert 0.4 < covid < 0.6, source  # classes alike within a source, whatever its own share
    again = list(SourceBatches(sources, labels, 8, torch.Generator().manual_seed(0)))
    assert batches == again  # seeded by the generator the loader's resume state holds


def test_each_group_is_scored_on_its_own_statistics() -> None:
    """A group's scores depend on its own images only, and are what adapting to it alone gives."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 200, size=(96, 32, 32), dtype=np.uint8)
    groups = np.repeat(["a", "b", "c"], 32)
    device, norm = torch.device("cpu"), ([0.5] * 3, [0.25] * 3)
    model = build_classifier("efficientnet_b0")
    first = predict_per_group(model, images, groups, device, *norm)
    other = images.copy()
    other[groups == "b"] += 40  # one site's window, shifted
    second = predict_per_group(model, other, groups, device, *norm)
    assert np.array_equal(first[groups != "b"], second[groups != "b"])
    assert not np.allclose(first[groups == "b"], second[groups == "b"])
    alone = adapt_batchnorm(copy.deepcopy(model), other[groups == "b"], *norm, device)
    assert np.allclose(second[groups == "b"], predict_scores(alone, other[groups == "b"], device, *norm), atol=1e-6)


def test_source_batchnorm_keeps_test_slices_out_of_validation(tmp_path: Path) -> None:
    """Statistics are estimated per source and split, so a trained source's test slices never move
    its validation scores (nor the checkpoint chosen on them), and too few slices are refused."""
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {
            "source": np.repeat(["covid-ct", "cc-ccii"], 72),
            "relpath": [f"{i}.png" for i in range(144)],
            "label": [0, 1] * 72,
            "split": (["train"] * 8 + ["val"] * 32 + ["test"] * 32) * 2,
            "trained": True,
        }
    )
    images = rng.integers(0, 200, size=(144, 32, 32), dtype=np.uint8)
    other = images.copy()
    test = (table["split"] == "test").to_numpy()
    other[test] = 255 - other[test]
    config = make_config(
        "classifier", model="efficientnet_b0", image_size=32, epochs=2, batch_size=4, source_batchnorm=True
    )
    device, meta = torch.device("cpu"), {"model": config.model, "image_size": 32}
    first = fit_and_predict(images, table, config, device, tmp_path / "a.safetensors", meta)
    second = fit_and_predict(other, table, config, device, tmp_path / "b.safetensors", meta)
    val = first[1]["split"] == "val"
    assert first[2]["epoch"] == second[2]["epoch"]
    assert np.array_equal(first[1].loc[val, "score"], second[1].loc[val, "score"])
    assert not np.allclose(first[1].loc[~val, "score"], second[1].loc[~val, "score"])
    with pytest.raises(ValueError, match="at least 32 scans of the site, got 8"):
        fit_and_predict(images[:48], table[:48], config, device, tmp_path / "c.safetensors", meta)


DECLARED = {
    k: v for k, v in declared_sources(load_params(REPO / "params.yaml")).items() if k in ("covid-ct", "cc-ccii")
}


def _split_files(root: Path) -> None:
    (root / "data" / "splits").mkdir(parents=True)
    pd.DataFrame(
        {
            "relpath": ["a.png", "b.png", "c.png"],
            "label": [1, 0, 1],
            "split": ["train", "val", "test"],
            "patient": ["a", "b", "c"],
            "scan": ["a", "b", "c"],
            "subclass": ["CT_COVID", "CT_NonCOVID", "CT_COVID"],
        }
    ).to_csv(root / "data" / "splits" / "covid_ct.csv", index=False)
    rows = [
        {
            "relpath": f"s{scan}_{k:04d}.png",
            "label": scan % 2,
            "split": split,
            "patient": f"P{scan}",
            "scan": str(scan),
            "subclass": "NCP" if scan % 2 else "CP",
        }
        for scan, split in ((1, "train"), (2, "val"), (3, "test"))
        for k in range(6)
    ]
    pd.DataFrame(rows).to_csv(root / "data" / "splits" / "cc_ccii.csv", index=False)


def test_classifier_table_marks_what_is_trained_on_and_takes_the_rest_whole(tmp_path: Path) -> None:
    _split_files(tmp_path)
    one = classifier_table(tmp_path, make_config("classifier", cc_ccii_per_scan=3), DECLARED)
    # CC-CCII is not trained on: every split of it (3 slices a scan) is scored as held-out evidence
    assert one.groupby("source").size().to_dict() == {"covid-ct": 3, "cc-ccii": 9}
    assert set(one.loc[one["source"] == "cc-ccii", "split"]) == {"train", "val", "test"}
    assert one.loc[one["trained"], "source"].unique().tolist() == ["covid-ct"]
    assert sorted(one.loc[one["source"] == "cc-ccii", "patient"].unique()) == ["P1", "P2", "P3"]
    both = classifier_table(
        tmp_path, make_config("classifier", sources=("covid-ct", "cc-ccii"), cc_ccii_per_scan=0), DECLARED
    )
    assert both["trained"].all() and len(both) == 3 + 18
    with pytest.raises(ConfigError, match="classifier.sources names 'sars-cov-2-ct', which is not declared"):
        classifier_table(tmp_path, make_config("classifier", sources=("sars-cov-2-ct",)), DECLARED)
    meta = checkpoint_meta(
        make_config("classifier", sources=("covid-ct", "cc-ccii"), lung_mask=True, standardise=True), "raw"
    )
    assert (
        meta["sources"] == ["covid-ct", "cc-ccii"] and not meta["lung_mask"] and not meta["standardise"]
    )  # raw: no segmentation


def test_held_out_rows_are_scored_but_never_train_or_choose(tmp_path: Path) -> None:
    """Changing what the held-out source looks like changes nothing the classifier learnt or chose."""
    rng = np.random.default_rng(0)
    n = 24
    table = pd.DataFrame(
        {
            "source": ["covid-ct"] * 12 + ["cc-ccii"] * 12,
            "relpath": [f"{i}.png" for i in range(n)],
            "label": [0, 1] * 12,
            "split": (["train"] * 8 + ["val"] * 2 + ["test"] * 2) * 2,
        }
    )
    table["trained"] = table["source"] == "covid-ct"
    images = rng.integers(0, 255, size=(n, 32, 32), dtype=np.uint8)
    config = make_config("classifier", model="efficientnet_b0", image_size=32, epochs=2, batch_size=4)
    device = torch.device("cpu")
    first = fit_and_predict(
        images, table, config, device, tmp_path / "a.safetensors", {"model": config.model, "image_size": 32}
    )
    other = images.copy()
    other[12:] = 255 - other[12:]  # the held-out source, redrawn
    second = fit_and_predict(
        other, table, config, device, tmp_path / "b.safetensors", {"model": config.model, "image_size": 32}
    )
    assert (
        first[1]["source"].tolist().count("cc-ccii") == 12  # held out: every split of it
        and not first[1].loc[first[1]["source"] == "cc-ccii", "trained"].any()
    )
    assert first[2]["epoch"] == second[2]["epoch"]
    ours = first[1]["source"] == "covid-ct"
    assert np.array_equal(first[1].loc[ours, "score"], second[1].loc[ours, "score"])
    assert not np.array_equal(first[1].loc[~ours, "score"], second[1].loc[~ours, "score"])


def test_threshold_is_chosen_on_the_pooled_validation_of_trained_sources_and_tables_stay_covid_ct() -> None:
    predictions = pd.DataFrame(
        {
            "source": ["covid-ct"] * 4 + ["cc-ccii"] * 4,
            "split": ["val", "val", "test", "test"] * 2,
            "label": [1, 0, 1, 0] * 2,
            "score": [0.9, 0.1, 0.8, 0.2, 0.3, 0.05, 0.7, 0.6],
            "trained": [True] * 8,
        }
    )
    config = make_config("evaluate", val_recall_floor=1.0)
    assert decision_threshold(predictions[predictions["split"] == "val"], config) == pytest.approx(
        0.3
    )  # the CC-CCII COVID slice counts
    assert paper_split(predictions, "test")["score"].tolist() == [0.8, 0.2]


def test_registered_pipeline_shows_the_classifier_the_view_it_trained_on(tmp_path: Path) -> None:
    segmenter, classifier = save_tiny_networks(tmp_path)
    state_dict, meta = load_checkpoint(classifier, torch.device("cpu"), "test")
    save_state_dict(classifier, state_dict, meta | {"lung_mask": True, "standardise": True})
    pipeline = TwoStagePipeline(
        segmenter, classifier, make_config("crop", min_lung_fraction=0.0), 0.5, device=torch.device("cpu")
    )
    image = read_grayscale(SLICE)
    (got,) = pipeline.predict_arrays(["slice"], [image])
    (crop,) = segment_and_crop([image], pipeline.segmenter, pipeline.segmenter_meta, pipeline.crop, pipeline.device)
    view = classifier_view(crop.crop.image, crop.lung, 64, True, True, False)
    meta = pipeline.classifier_meta
    expected = predict_scores(pipeline.classifier, view[None], pipeline.device, meta["mean"], meta["std"])[0]
    plain = predict_scores(
        pipeline.classifier,
        resize_for_classifier(crop.crop.image, 64)[None],
        pipeline.device,
        meta["mean"],
        meta["std"],
    )[0]
    assert got.probability == pytest.approx(float(expected), abs=1e-6)
    assert got.probability != pytest.approx(float(plain), abs=1e-6)
