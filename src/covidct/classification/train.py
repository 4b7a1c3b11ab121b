"""Training of the classifier: BCE on one logit, Adam, the paper's augmentation, and the
checkpoint with the best validation score (never the test split)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Sampler, WeightedRandomSampler
from tqdm.auto import tqdm

from covidct.classification.adaptation import adapt_batchnorm
from covidct.classification.data import CachedImages, Mixing, batch_mixing, paper_augmentation, to_model_input
from covidct.classification.model import build_classifier, load_classifier, normalisation, zero_head
from covidct.config import ClassifierConfig
from covidct.metrics import binary_metrics
from covidct.runtime import autocast, autocast_dtype, grad_scaler, seed_everything
from covidct.training_loop import TrainingRun, run_fingerprint, train_one_epoch

# The code a resume state depends on: a state saved by other code is never picked up.
TRAINING_CODE = (
    "covidct.classification.train",
    "covidct.classification.adaptation",
    "covidct.classification.data",
    "covidct.classification.model",
    "covidct.training_loop",
    "covidct.runtime",
    "covidct.metrics",
)


@torch.inference_mode()
def predict_scores(
    model: torch.nn.Module,
    images: np.ndarray,
    device: torch.device,
    mean,
    std,
    batch_size: int = 32,
    progress: str | None = None,
    tta: bool = False,
    dtype: torch.dtype | None | str = "auto",
) -> np.ndarray:
    """COVID probabilities for uint8 (N, S, S) images; ``tta`` averages each with its mirror's;
    ``dtype``: the autocast's (:func:`covidct.runtime.autocast_dtype` of the checkpoint's precision)."""
    model.eval()
    loader = DataLoader(CachedImages(images, np.zeros(len(images))), batch_size=batch_size)
    scores = []
    for batch, _ in tqdm(loader, desc=progress, unit="batch", disable=progress is None):
        inputs = to_model_input(batch, mean, std, device)
        with autocast(device, dtype):
            probability = torch.sigmoid(model(inputs).float()[:, 0])
            if tta:  # the mirror is a view the training augmentation also shows (hflip)
                probability = (probability + torch.sigmoid(model(inputs.flip(-1)).float()[:, 0])) / 2
        scores.append(probability.cpu().numpy())
    return np.concatenate(scores)


def predict_per_group(
    model: torch.nn.Module,
    images: np.ndarray,
    groups: np.ndarray,
    device: torch.device,
    mean,
    std,
    batch_size: int = 32,
    tta: bool = False,
    dtype: torch.dtype | None | str = "auto",
) -> np.ndarray:
    """:func:`predict_scores` with the BatchNorm statistics re-estimated on each group's own images
    first (``classifier.source_batchnorm``): a source's scans are normalised by that source, as its
    batches were in training, and a new site's by its own, which no label is needed for."""
    scores = np.empty(len(images), dtype=np.float32)
    for group in pd.unique(groups):
        rows = groups == group
        adapt_batchnorm(model, images[rows], mean, std, device, batch_size)
        scores[rows] = predict_scores(model, images[rows], device, mean, std, batch_size, tta=tta, dtype=dtype)
    return scores


def classifier_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    optimiser: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    normalise: tuple[Sequence[float], Sequence[float]],
    desc: str = "classifier",
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
    pos_weight: float | None = None,
    after_step: Callable[[], None] | None = None,
    dtype: torch.dtype | None | str = "auto",
    mix: Mixing | None = None,
) -> tuple[float, int]:
    """One BCE epoch over uint8 batches; the trainer and the throughput benchmark both run it.
    ``mix``: :func:`covidct.classification.data.batch_mixing`'s, applied to each batch on the device."""
    loss_fn = torch.nn.BCEWithLogitsLoss(
        pos_weight=None if pos_weight is None else torch.tensor(pos_weight, device=device)
    )

    def prepare(batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = to_model_input(batch[0], *normalise, device), batch[1].to(device)
        return (inputs, labels) if mix is None else mix(inputs, labels)

    return train_one_epoch(
        model,
        loader,
        prepare,
        lambda logits, labels: loss_fn(logits[:, 0], labels),
        optimiser,
        scaler,
        device,
        schedule,
        desc=desc,
        after_step=after_step,
        dtype=dtype,
    )


def positive_weight(labels: np.ndarray, class_weight: str) -> float | None:
    """``balanced``: COVID's loss weight n_noncovid / n_covid, so both classes weigh the same in
    total (the paper's own suggestion for its imbalance); ``none``: plain BCE."""
    if class_weight == "none":
        return None
    positives = int(labels.sum())
    if positives == 0:
        raise ValueError("classifier.class_weight: balanced needs COVID images in the train split")
    return (len(labels) - positives) / positives


def balanced_sampler(groups: np.ndarray, labels: np.ndarray, seed: int) -> WeightedRandomSampler | None:
    """With more than one source, each epoch draws every (source, class) cell equally often, so
    the larger source cannot teach "which source" as the easiest answer; one source: plain shuffling."""
    if len(np.unique(groups)) < 2:
        return None
    cells = pd.Series(list(zip(groups, labels, strict=True)))
    weights = 1.0 / cells.map(cells.value_counts()).to_numpy(dtype=float)
    return WeightedRandomSampler(
        torch.from_numpy(weights), len(weights), replacement=True, generator=torch.Generator().manual_seed(seed)
    )


class SourceBatches(Sampler[list[int]]):
    """Batches that each hold one source, the sources in turn, both classes alike within each:
    BatchNorm then normalises every batch by its own source's statistics, so what the network
    learns is relative to its source, and a new site is normalised by its own scans
    (:func:`predict_per_group`). Draws from ``generator``, which the data loader's resume state holds."""

    def __init__(self, groups: np.ndarray, labels: np.ndarray, batch_size: int, generator: torch.Generator) -> None:
        self.batch_size, self.generator, self.batches = batch_size, generator, max(1, len(labels) // batch_size)
        cells = {
            source: [(groups == source) & (labels == label) for label in np.unique(labels)]
            for source in pd.unique(groups)
        }
        self.cells = [[torch.from_numpy(np.flatnonzero(c)) for c in cell if c.any()] for cell in cells.values()]

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        turns = torch.randperm(len(self.cells), generator=self.generator).repeat(self.batches // len(self.cells) + 1)
        for turn in turns[: self.batches].tolist():
            cells = self.cells[turn]
            picks = torch.randint(len(cells), (self.batch_size,), generator=self.generator).tolist()
            yield [int(cells[c][torch.randint(len(cells[c]), (1,), generator=self.generator)]) for c in picks]


def _sources(sources: np.ndarray | None, labels: np.ndarray) -> np.ndarray:
    return np.zeros(len(labels), dtype=int) if sources is None else sources


def _selection_score(metrics: dict[str, float], val_loss: float, name: str) -> float:
    return -val_loss if name == "neg_loss" else metrics[name]


@dataclass(frozen=True)
class _Setup:
    """What the epoch loop of :func:`train_classifier` runs with, built in one fixed order
    (the seeded draws of a run depend on it)."""

    run: TrainingRun
    loader: DataLoader
    norm: tuple[tuple[float, ...], tuple[float, ...]]  # ImageNet mean and std of the backbone
    schedule: torch.optim.lr_scheduler.LRScheduler | None
    pos_weight: float | None
    after_step: Callable[[], None] | None  # the weight average's update
    mix: Mixing | None  # mixup / CutMix
    dtype: torch.dtype | None
    scoring: dict[str, Any]  # how the kept weights score: checkpoint meta


def _setup(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    config: ClassifierConfig,
    device: torch.device,
    checkpoint: Path,
    meta: dict,
    on_epoch: Callable[[dict], None],
    resume_dir: Path | None,
    train_sources: np.ndarray | None,
) -> _Setup:
    seed_everything(config.seed)
    model = build_classifier(config.model, config.pretrained)
    if config.head_init == "zero":
        zero_head(model)
    model = model.to(device).to(memory_format=torch.channels_last)
    mean, std = normalisation(model)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    dataset = CachedImages(*train, paper_augmentation(config.augment, config.seed))
    if config.source_batchnorm:
        generator = torch.Generator().manual_seed(config.seed)
        batches = SourceBatches(_sources(train_sources, train[1]), train[1], config.batch_size, generator)
        loader = DataLoader(dataset, batch_sampler=batches, generator=generator)
    else:
        sampler = balanced_sampler(train_sources, train[1], config.seed) if train_sources is not None else None
        loader = DataLoader(
            dataset,
            batch_size=config.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            generator=torch.Generator().manual_seed(config.seed),
            drop_last=len(train[0]) > config.batch_size,  # a batch of 1 breaks batch norm
        )
    fingerprint = None
    if resume_dir is not None:
        settings = {"trainer": "classifier", "config": config.model_dump(), "meta": meta, "device": device.type}
        fingerprint = run_fingerprint(settings, (*train, *val), TRAINING_CODE)
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, config.epochs * len(loader))
        if config.schedule == "cosine"
        else None
    )
    # A running average of the weights smooths the epoch-to-epoch swings that a small validation
    # split would otherwise pick a checkpoint from; it is what gets scored and kept.
    ema = ModelEmaV3(model, decay=config.ema_decay) if config.ema_decay > 0 else None
    dtype = autocast_dtype(device, config.precision)
    run = TrainingRun(
        model=model,
        optimiser=optimiser,
        scaler=grad_scaler(device, dtype),
        loader=loader,
        device=device,
        checkpoint=checkpoint,
        best=-np.inf,
        on_epoch=on_epoch,
        schedule=schedule,
        resume_dir=resume_dir,
        fingerprint=fingerprint,
    )
    run.averaged = ema.module if ema is not None else None
    return _Setup(
        run=run,
        loader=loader,
        norm=(mean, std),
        schedule=schedule,
        pos_weight=positive_weight(train[1], config.class_weight),
        after_step=(lambda: ema.update(model)) if ema is not None else None,
        mix=batch_mixing(config.augment),
        dtype=dtype,
        # absent means no TTA, so checkpoints written before the option read the same
        scoring=({"tta": True} if config.tta else {}) | {"precision": config.precision},
    )


def _validate(
    model: torch.nn.Module,
    val: tuple[np.ndarray, np.ndarray],
    config: ClassifierConfig,
    setup: _Setup,
    device: torch.device,
    val_sources: np.ndarray | None,
) -> tuple[float, dict[str, float], float]:
    """Validation loss, metrics, and the score that picks the checkpoint."""
    if config.source_batchnorm:
        groups = _sources(val_sources, val[1])
        scores = predict_per_group(model, val[0], groups, device, *setup.norm, config.batch_size * 2, dtype=setup.dtype)
    else:
        scores = predict_scores(model, val[0], device, *setup.norm, config.batch_size * 2, dtype=setup.dtype)
    loss = float(
        torch.nn.functional.binary_cross_entropy(
            torch.from_numpy(scores).double().clamp(1e-7, 1 - 1e-7), torch.from_numpy(val[1]).double()
        )
    )
    metrics = binary_metrics(val[1], scores)
    return loss, metrics, _selection_score(metrics, loss, config.select_metric)


def train_classifier(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    config: ClassifierConfig,
    device: torch.device,
    checkpoint: Path,
    meta: dict,
    on_epoch: Callable[[dict], None] = lambda row: None,
    resume_dir: Path | None = None,
    train_sources: np.ndarray | None = None,
    val_sources: np.ndarray | None = None,
) -> pd.DataFrame:
    """Train; keep the weights with the best validation ``config.select_metric``; return history.
    ``train_sources`` (one name per training image) balances the sources, see :func:`balanced_sampler`;
    with ``config.source_batchnorm`` they make the batches (:class:`SourceBatches`) and
    ``val_sources`` the groups validation is normalised by.

    With ``resume_dir``, a resume state is saved there after every epoch and a run killed
    part-way carries on from it when started again with the same config, meta and data;
    the state is left in place at the end (the caller removes it once its outputs are written).
    """
    setup = _setup(train, val, config, device, checkpoint, meta, on_epoch, resume_dir, train_sources)
    run = setup.run
    for epoch in range(run.start(), config.epochs + 1):
        started = time.perf_counter()
        train_loss, seen = classifier_epoch(
            run.model,
            setup.loader,
            run.optimiser,
            run.scaler,
            device,
            setup.norm,
            f"classifier epoch {epoch}/{config.epochs}",
            setup.schedule,
            setup.pos_weight,
            setup.after_step,
            dtype=setup.dtype,
            mix=setup.mix,
        )
        train_seconds = time.perf_counter() - started
        val_loss, val_metrics, score = _validate(run.scored, val, config, setup, device, val_sources)
        run.offer(
            score,
            meta
            | setup.scoring
            | {
                "epoch": epoch,
                f"val_{config.select_metric}": score,
                "mean": list(setup.norm[0]),
                "std": list(setup.norm[1]),
            },
        )
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            **{f"val_{k}": v for k, v in val_metrics.items()},
        }
        row |= {
            "best_val_score": run.best,
            "train_images_per_s": seen / train_seconds,
            "epoch_seconds": time.perf_counter() - started,
        }
        run.end_epoch(row)
        tqdm.write(
            f"classifier epoch {epoch}: loss {row['train_loss']:.4f}, val loss {val_loss:.4f}, val AUC {val_metrics['auc']:.3f}, val acc {val_metrics['accuracy']:.3f} ({row['train_images_per_s']:.1f} img/s)"
        )
    return pd.DataFrame(run.history)


def fit_and_predict(
    images: np.ndarray,
    table: pd.DataFrame,
    config: ClassifierConfig,
    device: torch.device,
    checkpoint: Path,
    meta: dict,
    on_epoch: Callable[[dict], None] = lambda row: None,
    resume_dir: Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Train on ``table.split == "train"``, choose on "val", then score val and test with the
    chosen checkpoint. Returns the history, the predictions and the checkpoint meta.
    With ``source`` and ``trained`` columns (:mod:`covidct.classification.table`), only trained
    rows train and choose (validation pooled over their sources, which are balanced in
    training); the others' rows are all scored, held out. ``resume_dir``: see :func:`train_classifier`."""
    labels = table["label"].to_numpy()
    trained = table["trained"].to_numpy(dtype=bool) if "trained" in table else np.ones(len(table), dtype=bool)
    part = {split: (table["split"] == split).to_numpy() for split in ("train", "val", "test")}
    fit, choose = part["train"] & trained, part["val"] & trained
    sources = table["source"].to_numpy() if "source" in table else None
    history = train_classifier(
        (images[fit], labels[fit]),
        (images[choose], labels[choose]),
        config,
        device,
        checkpoint,
        meta,
        on_epoch,
        resume_dir,
        train_sources=None if sources is None else sources[fit],
        val_sources=None if sources is None else sources[choose],
    )
    model, chosen = load_classifier(checkpoint, device)
    keep = part["val"] | part["test"] | ~trained
    dtype = autocast_dtype(device, chosen.get("precision", "auto"))
    score = {"tta": chosen.get("tta", False), "dtype": dtype}
    if config.source_batchnorm:  # normalised per source and split; a held-out source by all of its slices
        source = pd.Series(_sources(sources, labels)).astype(str)
        groups = np.where(trained, source + "/" + table["split"].to_numpy(), source)
        scores = predict_per_group(model, images[keep], groups[keep], device, chosen["mean"], chosen["std"], **score)
    else:
        scores = predict_scores(
            model, images[keep], device, chosen["mean"], chosen["std"], progress="score val, test and held out", **score
        )
    columns = [
        c for c in ("source", "relpath", "split", "label", "patient", "scan", "subclass", "trained") if c in table
    ]
    predictions = table[keep].assign(score=scores)[[*columns, "score"]]
    return history, predictions, chosen
