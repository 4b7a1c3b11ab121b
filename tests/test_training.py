"""Smoke tests of the real training code on a handful of real images: one epoch, tiny nets, CPU.

They check the wiring (data -> loss -> checkpoint -> reload -> scores), the checkpoint format
(safetensors, metadata in its header) and CPU determinism, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covidct.checkpoints import load_checkpoint, save_state_dict
from covidct.classification.data import load_resized
from covidct.classification.model import load_classifier
from covidct.classification.train import predict_scores, train_classifier
from covidct.datasets import covid_ct_split
from covidct.images import read_grayscale, read_mask
from covidct.metrics import binary_metrics
from covidct.runtime import autocast_dtype, native_cpu_bf16
from covidct.segmentation.inference import predict_probabilities, segmenter_dtype
from covidct.segmentation.inputs import segmenter_input
from covidct.segmentation.model import build_segmenter, load_segmenter
from covidct.segmentation.train import mean_dice, train_segmenter
from helpers.configs import augment, make_config
from helpers.paths import DATA

pytestmark = pytest.mark.data  # reads the real data (skipped without it)

CPU = torch.device("cpu")
SIZE = 64
LUNG = DATA / "lung-seg"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the nets are tiny, and two threads on a busy 2-core machine spin
    against each other (several times slower); restored afterwards for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- segmenter


def _lung_slices(ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    images = np.stack([segmenter_input(read_grayscale(LUNG / "images" / f"{i}.png"), SIZE, 7.0) for i in ids])
    masks = []
    for i in ids:
        mask = read_mask(LUNG / "masks" / f"{i}.png")
        masks.append(cv2.resize(mask.astype(np.uint8), (SIZE, SIZE), interpolation=cv2.INTER_NEAREST).astype(bool))
    return images, np.stack(masks)


@pytest.fixture(scope="module")
def lung_data() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    manifest = pd.read_csv(LUNG / "manifest.csv")
    # slices from several patients, the middle of each volume (large lungs)
    picked = manifest.groupby("patient_id", sort=True).nth(20)["id"].tolist()
    assert len(picked) >= 12
    train, val = _lung_slices(picked[:8]), _lung_slices(picked[8:12])
    assert train[0].shape == (8, SIZE, SIZE) and train[0].dtype == np.uint8
    assert train[1].dtype == bool and 0 < train[1].mean() < 1
    return train, val


SEG_CONFIG = make_config("segmenter", channels=(4, 8, 16), epochs=1, batch_size=4, lr=2e-3, augment=True, seed=0)


def _train_segmenter(lung_data, checkpoint: Path) -> pd.DataFrame:
    train, val = lung_data
    meta = {"channels": list(SEG_CONFIG.channels), "size": SIZE, "clahe_clip": 7.0}
    return train_segmenter(train, val, SEG_CONFIG, CPU, checkpoint, meta)


@pytest.fixture(scope="module")
def segmenter_run(lung_data, tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    checkpoint = tmp_path_factory.mktemp("seg") / "model.safetensors"
    return _train_segmenter(lung_data, checkpoint), checkpoint


def test_segmenter_history(segmenter_run) -> None:
    history, _ = segmenter_run
    assert list(history["epoch"]) == [1]
    row = history.iloc[0]
    assert 0.0 <= row["val_dice"] <= 1.0
    assert row["best_val_dice"] == row["val_dice"]
    assert 0.0 < row["train_loss"] <= 1.0  # a Focal Tversky loss
    assert np.isfinite(row["train_loss"])


def test_segmenter_checkpoint_loads(segmenter_run, lung_data) -> None:
    history, checkpoint = segmenter_run
    assert checkpoint.is_file()
    assert [p.name for p in checkpoint.parent.iterdir()] == ["model.safetensors"]  # no temp file left
    model, meta = load_segmenter(checkpoint, CPU)
    assert meta["channels"] == [4, 8, 16] and meta["size"] == SIZE
    assert meta["epoch"] == 1
    assert meta["val_dice"] == pytest.approx(history.iloc[0]["val_dice"])
    assert not model.training
    # the reloaded weights reproduce the validation Dice recorded at save time
    val_images, val_masks = lung_data[1]
    dtype = segmenter_dtype(CPU, meta.get("precision", "auto"))  # as training validated: bf16 on a CPU with AMX
    probabilities = predict_probabilities(model, val_images, CPU, batch_size=4, dtype=dtype)
    assert probabilities.shape == val_images.shape and probabilities.dtype == np.float32
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    assert mean_dice(probabilities, val_masks) == pytest.approx(meta["val_dice"], abs=1e-6)


def test_segmenter_deterministic_on_cpu(segmenter_run, lung_data, tmp_path: Path) -> None:
    history, _ = segmenter_run
    again = _train_segmenter(lung_data, tmp_path / "model.safetensors")
    assert again["train_loss"].tolist() == history["train_loss"].tolist()
    assert again["val_dice"].tolist() == history["val_dice"].tolist()


def test_segmenter_is_channels_last_and_computes_what_nchw_does(segmenter_run, lung_data) -> None:
    model, _ = load_segmenter(segmenter_run[1], CPU)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    nchw = build_segmenter([4, 8, 16]).to(memory_format=torch.contiguous_format).eval()
    nchw.load_state_dict(model.state_dict())
    inputs = torch.from_numpy(lung_data[1][0][:2]).float().div(255.0)[:, None]
    with torch.inference_mode():
        torch.testing.assert_close(model(inputs), nchw(inputs), rtol=1e-4, atol=1e-5)


def test_precision_settings_resolve_per_device_and_network() -> None:
    assert autocast_dtype(CPU, "fp32") is None and autocast_dtype(CPU, "bf16") is torch.bfloat16
    assert autocast_dtype(CPU, "auto") is None  # the classifier: no gain from bf16 on a CPU
    assert segmenter_dtype(CPU, "auto") is (torch.bfloat16 if native_cpu_bf16() else None)  # only with bf16 in hardware
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        autocast_dtype(CPU, "fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype(CPU, "fp8")
    if torch.cuda.is_available():
        assert autocast_dtype(torch.device("cuda"), "auto") in (torch.bfloat16, torch.float16)


def test_bf16_segmenter_trains_deterministically_and_segments_like_fp32(
    segmenter_run, lung_data, tmp_path: Path
) -> None:
    """The mixed-precision path runs here on every CPU run, a rerun gives the same bits, and its
    lung probabilities stay within a stated tolerance of fp32 (the trained net's: benchmarks/precision.py)."""
    bf16 = SEG_CONFIG.replace(precision="bf16")
    train, val = lung_data
    meta = {"channels": list(bf16.channels), "size": SIZE, "clahe_clip": 7.0, "precision": "bf16"}
    first = train_segmenter(train, val, bf16, CPU, tmp_path / "a.safetensors", meta)
    again = train_segmenter(train, val, bf16, CPU, tmp_path / "b.safetensors", meta)
    assert first["train_loss"].tolist() == again["train_loss"].tolist() and np.isfinite(first["train_loss"]).all()
    model, _ = load_segmenter(segmenter_run[1], CPU)
    full = predict_probabilities(model, val[0], CPU, batch_size=4, dtype=None)
    half = predict_probabilities(model, val[0], CPU, batch_size=4, dtype=torch.bfloat16)
    assert np.abs(half - full).mean() < 0.01  # the one-epoch net sits near 0.5, so compare where it decides
    sure = np.abs(full - 0.5) > 0.05
    assert sure.mean() > 0.3 and np.array_equal((half > 0.5)[sure], (full > 0.5)[sure])


def test_segmenter_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_segmenter(tmp_path / "model.safetensors", CPU)


def test_the_same_weights_save_to_the_same_bytes(tmp_path: Path) -> None:
    """What keeps dvc.lock unchanged when a reproduction matches (torch.save writes a random id)."""
    torch.manual_seed(0)
    model = build_segmenter((4, 8, 16))
    meta = {"channels": [4, 8, 16], "epoch": np.int64(3), "val_dice": np.float32(0.5)}
    save_state_dict(tmp_path / "a.safetensors", model.state_dict(), meta)
    save_state_dict(tmp_path / "b.safetensors", model.state_dict(), dict(reversed(meta.items())))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    state, loaded = load_checkpoint(tmp_path / "a.safetensors", CPU, "train_segmenter")
    assert loaded == {"channels": [4, 8, 16], "epoch": 3, "val_dice": 0.5}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "content", [b"", b"\x80\x02}q\x00.", b"\x10\x00\x00\x00\x00\x00\x00\x00{}"], ids=["empty", "pickle", "bad-header"]
)
def test_an_unreadable_checkpoint_names_the_file_and_the_stage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"model\.safetensors: .*run the train_segmenter stage again"):
        load_segmenter(path, CPU)


# ---------------------------------------------------------------- classifier


CLF_CONFIG = make_config("classifier", model="efficientnet_b0", image_size=SIZE, epochs=1, batch_size=4, seed=0)


@pytest.fixture(scope="module")
def covid_data() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    table = covid_ct_split(DATA / "covid-ct", subset_per_class=4)
    parts = {}
    for split, n in (("train", 4), ("val", 2)):
        rows = table[table["split"] == split].groupby("label").head(n)
        images = load_resized([DATA / "covid-ct" / p for p in rows["relpath"]], SIZE, progress=None)
        parts[split] = (images, rows["label"].to_numpy().copy())
    assert parts["train"][0].shape == (8, SIZE, SIZE) and parts["train"][0].dtype == np.uint8
    assert sorted(parts["train"][1].tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert sorted(parts["val"][1].tolist()) == [0, 0, 1, 1]
    return parts["train"], parts["val"]


def _train_classifier(covid_data, checkpoint: Path) -> pd.DataFrame:
    train, val = covid_data
    return train_classifier(train, val, CLF_CONFIG, CPU, checkpoint, {"model": CLF_CONFIG.model, "image_size": SIZE})


@pytest.fixture(scope="module")
def classifier_run(covid_data, tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    checkpoint = tmp_path_factory.mktemp("clf") / "model.safetensors"
    return _train_classifier(covid_data, checkpoint), checkpoint


def test_classifier_history(classifier_run) -> None:
    history, _ = classifier_run
    assert list(history["epoch"]) == [1]
    row = history.iloc[0]
    assert np.isfinite(row["train_loss"]) and row["train_loss"] > 0
    assert np.isfinite(row["val_loss"]) and row["val_loss"] > 0
    assert 0.0 <= row["val_auc"] <= 1.0
    assert 0.0 <= row["val_accuracy"] <= 1.0
    assert row["best_val_score"] == row["val_auc"]  # select_metric = auc


def test_classifier_checkpoint_scores(classifier_run, covid_data) -> None:
    history, checkpoint = classifier_run
    assert checkpoint.is_file()
    model, meta = load_classifier(checkpoint, CPU)
    assert meta["model"] == "efficientnet_b0" and meta["epoch"] == 1
    assert len(meta["mean"]) == 3 and len(meta["std"]) == 3
    assert not model.training
    (train_images, _), (val_images, val_labels) = covid_data
    scores = predict_scores(model, val_images, CPU, meta["mean"], meta["std"], batch_size=3)
    assert scores.shape == (len(val_images),)
    assert ((scores >= 0) & (scores <= 1)).all()
    # the reloaded weights reproduce the validation figures of training
    assert binary_metrics(val_labels, scores)["auc"] == pytest.approx(meta["val_auc"])
    assert meta["val_auc"] == pytest.approx(history.iloc[0]["val_auc"])
    bce = -np.mean(
        val_labels * np.log(np.clip(scores, 1e-7, 1)) + (1 - val_labels) * np.log(np.clip(1 - scores, 1e-7, 1))
    )
    assert bce == pytest.approx(history.iloc[0]["val_loss"], abs=1e-4)
    # batch size does not change the scores (eval mode: no batch statistics)
    all_scores = predict_scores(model, train_images, CPU, meta["mean"], meta["std"], batch_size=8)
    one_by_one = predict_scores(model, train_images, CPU, meta["mean"], meta["std"], batch_size=1)
    assert all_scores.shape == (8,)
    np.testing.assert_allclose(all_scores, one_by_one, atol=1e-5)


def test_classifier_deterministic_on_cpu(classifier_run, covid_data, tmp_path: Path) -> None:
    history, _ = classifier_run
    again = _train_classifier(covid_data, tmp_path / "model.safetensors")
    assert again["train_loss"].tolist() == history["train_loss"].tolist()
    assert again["val_loss"].tolist() == history["val_loss"].tolist()


def test_classifier_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_classifier(tmp_path / "model.safetensors", CPU)


# ---------------------------------------------------------------- recipe levers


def test_zero_head_starts_at_one_half_and_timm_head_does_not(covid_data) -> None:
    from covidct.classification.model import build_classifier, normalisation, zero_head
    from covidct.classification.variants import LITE0_WHEEL

    (images, _), _ = covid_data
    model = build_classifier("tf_efficientnet_lite0", LITE0_WHEEL)
    mean, std = normalisation(model)
    timm_scores = predict_scores(model, images, CPU, mean, std)
    zero_head(model)
    np.testing.assert_array_equal(predict_scores(model, images, CPU, mean, std), np.full(len(images), 0.5, np.float32))
    # timm's U(-1, 1) head on pretrained features: confident from the first step, why the lever exists
    assert np.abs(timm_scores - 0.5).mean() > 0.3


def test_tta_is_the_mean_over_the_image_and_its_mirror(classifier_run, covid_data) -> None:
    _, checkpoint = classifier_run
    model, meta = load_classifier(checkpoint, CPU)
    (images, _), _ = covid_data
    plain = predict_scores(model, images, CPU, meta["mean"], meta["std"])
    mirrored = predict_scores(model, np.ascontiguousarray(images[:, :, ::-1]), CPU, meta["mean"], meta["std"])
    np.testing.assert_allclose(
        predict_scores(model, images, CPU, meta["mean"], meta["std"], tta=True), (plain + mirrored) / 2, atol=1e-6
    )
    assert "tta" not in meta  # absent = off, so earlier checkpoints read the same


def test_positive_weight() -> None:
    from covidct.classification.train import positive_weight

    assert positive_weight(np.array([1, 0, 0, 0]), "balanced") == 3.0
    assert positive_weight(np.array([1, 0, 0, 0]), "none") is None
    with pytest.raises(ValueError, match="class_weight"):
        positive_weight(np.zeros(4), "balanced")


def test_levers_change_training_and_land_in_the_checkpoint(covid_data, tmp_path: Path) -> None:

    train, val = covid_data
    config = CLF_CONFIG.replace(epochs=2, schedule="cosine", class_weight="balanced", head_init="zero", tta=True)
    history = train_classifier(
        train, val, config, CPU, tmp_path / "model.safetensors", {"model": config.model, "image_size": SIZE}
    )
    assert list(history["epoch"]) == [1, 2]
    assert history.iloc[0]["train_loss"] < 1.0  # a zero head starts near ln 2 (timm's starts far above)
    _, meta = load_classifier(tmp_path / "model.safetensors", CPU)
    assert meta["tta"] is True


def test_cosine_schedule_ends_at_zero(covid_data, tmp_path: Path) -> None:

    from covidct.classification import train as train_module

    seen: list[float] = []
    real_epoch = train_module.classifier_epoch

    def spy(model, loader, optimiser, *args, **kwargs):
        result = real_epoch(model, loader, optimiser, *args, **kwargs)
        seen.append(optimiser.param_groups[0]["lr"])
        return result

    train, val = covid_data
    config = CLF_CONFIG.replace(epochs=2, schedule="cosine")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "classifier_epoch", spy)
        train_classifier(train, val, config, CPU, tmp_path / "model.safetensors", {})
    assert seen[0] == pytest.approx(config.lr / 2) and seen[1] == pytest.approx(0.0, abs=1e-12)


def test_extra_augmentation_only_when_asked() -> None:
    from covidct.classification.data import paper_augmentation

    paper = paper_augmentation(augment(), seed=0)
    assert [type(t).__name__ for t in paper.transforms] == ["Affine", "HorizontalFlip"]
    stronger = paper_augmentation(augment(translate=0.05, brightness_contrast=0.2), seed=0)
    assert [type(t).__name__ for t in stronger.transforms] == ["Affine", "HorizontalFlip", "RandomBrightnessContrast"]
    image = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    outputs = {stronger(image=image)["image"].mean().round(3) for _ in range(5)}
    assert len(outputs) > 1
    blurred = paper_augmentation(augment(rotate=0.0, scale=0.0, hflip=0.0, downscale=0.25, jpeg_quality=20), seed=0)
    assert [type(t).__name__ for t in blurred.transforms][2:] == ["Downscale", "ImageCompression"]
    checks = np.indices((64, 64)).sum(axis=0) % 2 * 255  # the finest detail a 64 px image holds
    detail = [
        np.abs(np.diff(blurred(image=checks.astype(np.uint8))["image"].astype(float), axis=1)).mean() for _ in range(20)
    ]
    assert max(detail) == pytest.approx(255) and min(detail) < 128  # half the time each: kept, or blurred away


def test_mixing_blends_images_and_labels_alike() -> None:
    """Mixup: image i becomes lam x_i + (1 - lam) x_(n-1-i), its label likewise; CutMix: a patch
    of x_(n-1-i), the label the share of the image still x_i; an odd batch is left as it is."""
    from covidct.classification.data import batch_mixing

    assert batch_mixing(augment()) is None
    np.random.seed(0)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([1.0, 0.0, 0.0, 0.0])
    mixed, soft = batch_mixing(augment(mixup=0.4))(images.clone(), labels)
    lam = float(soft[0])  # image 0 (COVID) is mixed with image 3 (not)
    assert 0 < lam < 1 and soft.tolist() == pytest.approx([lam, 0.0, 0.0, 1 - lam])
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    pasted, share = batch_mixing(augment(cutmix=1.0))(images.clone(), labels)
    kept = (pasted[0] == images[0]).all(dim=0).float().mean()
    assert 0 < float(share[0]) < 1 and float(share[0]) == pytest.approx(float(kept))
    assert ((pasted[0] == images[0]) | (pasted[0] == images[3])).all()
    odd = torch.randn(3, 3, 16, 16)
    same, hard = batch_mixing(augment(mixup=0.4))(odd.clone(), labels[:3])
    assert torch.equal(same, odd) and torch.equal(hard, labels[:3])


def test_mixup_reaches_the_loss(covid_data, tmp_path: Path) -> None:
    """With ``mixup`` on, the loss sees blended labels; off, only 0 and 1."""
    from covidct.classification import train as train_module

    def targets_seen(config) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        real = train_module.train_one_epoch

        def spy(model, batches, to_device, *args, **kwargs):
            def recorded(batch):
                inputs, targets = to_device(batch)
                seen.append(targets.clone())
                return inputs, targets

            return real(model, batches, recorded, *args, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train_module, "train_one_epoch", spy)
            train_classifier(*covid_data, config, CPU, tmp_path / "model.safetensors", {})
        return torch.cat(seen)

    assert set(targets_seen(CLF_CONFIG).tolist()) <= {0.0, 1.0}
    blended = targets_seen(CLF_CONFIG.replace(augment=augment(mixup=1.0)))
    assert ((blended > 0) & (blended < 1)).any()


def test_moving_average_of_the_weights_is_what_gets_scored_and_kept(covid_data, tmp_path: Path) -> None:
    """With ``ema_decay`` d the checkpoint holds the per-step average avg <- d avg + (1 - d) w,
    started from the initial weights, and validation scored those averaged weights."""

    from covidct.classification import train as train_module

    snapshots: list[dict[str, torch.Tensor]] = []
    real_epoch = train_module.classifier_epoch

    def spy(model, *args, **kwargs):
        *rest, after_step = args

        def recorded() -> None:
            snapshots.append({k: v.detach().clone() for k, v in model.named_parameters()})
            after_step()

        snapshots.append({k: v.detach().clone() for k, v in model.named_parameters()})  # before the first step
        return real_epoch(model, *rest, recorded, **kwargs)

    train, val = covid_data
    config = CLF_CONFIG.replace(batch_size=4, ema_decay=0.5)  # 8 images: two steps
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "classifier_epoch", spy)
        history = train_classifier(
            train, val, config, CPU, tmp_path / "model.safetensors", {"model": config.model, "image_size": SIZE}
        )
    initial, first, second = snapshots
    model, meta = load_classifier(tmp_path / "model.safetensors", CPU)
    kept = dict(model.named_parameters())
    for name in ("conv_stem.weight", "classifier.weight", "classifier.bias"):
        expected = 0.25 * initial[name] + 0.25 * first[name] + 0.5 * second[name]
        torch.testing.assert_close(kept[name], expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(kept["classifier.weight"], second["classifier.weight"])  # not the last weights
    scores = predict_scores(model, val[0], CPU, meta["mean"], meta["std"])
    assert binary_metrics(val[1], scores)["auc"] == pytest.approx(history.iloc[0]["val_auc"])
