"""Training of the lung segmenter: augmented slices, Focal Tversky loss, Adam with a cosine
schedule, and the checkpoint with the best validation Dice."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from covidct.config import PreprocessConfig, SegmenterConfig
from covidct.metrics import dice_score
from covidct.runtime import grad_scaler, seed_everything
from covidct.segmentation.inference import predict_probabilities, segmenter_dtype
from covidct.segmentation.losses import FocalTverskyLoss
from covidct.segmentation.model import build_segmenter
from covidct.training_loop import TrainingRun, run_fingerprint, train_one_epoch

# The code a resume state depends on: a state saved by other code is never picked up.
TRAINING_CODE = (
    "covidct.segmentation.train",
    "covidct.segmentation.model",
    "covidct.segmentation.losses",
    "covidct.segmentation.inference",
    "covidct.training_loop",
    "covidct.runtime",
    "covidct.metrics",
)


def segmentation_augmentation(seed: int) -> A.Compose:
    """Geometry and appearance changes that COVID-CT figures show and the lung set lacks:
    zoom and shift, flips (the lung set's orientation is not harmonised), contrast, blur, JPEG."""
    return A.Compose(
        [
            A.Affine(
                scale=(0.8, 1.15),
                translate_percent=(-0.08, 0.08),
                rotate=(-12, 12),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=0.8,
            ),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.2),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.RandomGamma(gamma_limit=(70, 150), p=0.3),
            A.GaussianBlur(blur_limit=(3, 5), p=0.2),
            A.ImageCompression(quality_range=(40, 95), p=0.3),
        ],
        seed=seed,
    )


class SliceDataset(Dataset):
    """Preprocessed uint8 slices and boolean masks, kept in memory and augmented on the fly."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, transform: A.Compose | None) -> None:
        self.images, self.masks, self.transform = images, masks.astype(np.uint8), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.images[index], self.masks[index]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return torch.from_numpy(image).float().div_(255.0)[None], torch.from_numpy(np.ascontiguousarray(mask)).float()[
            None
        ]


def segmenter_meta(pre: PreprocessConfig, config: SegmenterConfig) -> dict[str, Any]:
    """What travels with the weights so every later use prepares slices and casts as training did."""
    return {
        "channels": list(config.channels),
        "size": pre.size,
        "clahe_clip": pre.clahe_clip,
        "precision": config.precision,
    }


def mean_dice(probabilities: np.ndarray, masks: np.ndarray) -> float:
    return float(np.mean([dice_score(p > 0.5, m) for p, m in zip(probabilities, masks, strict=True)]))


def train_segmenter(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    config: SegmenterConfig,
    device: torch.device,
    checkpoint: Path,
    meta: dict,
    on_epoch: Callable[[dict], None] = lambda row: None,
    resume_dir: Path | None = None,
    initial: dict[str, torch.Tensor] | None = None,
) -> pd.DataFrame:
    """Train; write the best-validation-Dice weights to ``checkpoint``; return per-epoch history.

    With ``resume_dir``, a resume state is saved there after every epoch and a run killed
    part-way carries on from it when started again with the same config, meta and data;
    the state is left in place at the end (the caller removes it once its outputs are written).
    ``initial``: weights to start from (another net's of the same widths) instead of random ones.
    """
    seed_everything(config.seed)
    model = build_segmenter(config.channels).to(device)
    if initial is not None:
        model.load_state_dict(initial)
    loss_fn = FocalTverskyLoss(config.tversky_alpha, config.tversky_beta, config.tversky_gamma)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    loader = DataLoader(
        SliceDataset(*train, segmentation_augmentation(config.seed) if config.augment else None),
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
        drop_last=len(train[0]) > config.batch_size,
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.lr, total_steps=config.epochs * len(loader), pct_start=0.15
    )
    fingerprint = None
    if resume_dir is not None:
        settings = {"trainer": "segmenter", "config": config.model_dump(), "meta": meta, "device": device.type}
        if initial is not None:  # a state started from other weights is not this run's
            settings["initial"] = hashlib.sha256(
                b"".join(t.cpu().numpy().tobytes() for t in initial.values())
            ).hexdigest()
        fingerprint = run_fingerprint(settings, (*train, *val), TRAINING_CODE)
    dtype = segmenter_dtype(device, config.precision)
    run = TrainingRun(
        model=model,
        optimiser=optimiser,
        scaler=grad_scaler(device, dtype),
        loader=loader,
        device=device,
        checkpoint=checkpoint,
        best=-1.0,
        on_epoch=on_epoch,
        schedule=schedule,
        resume_dir=resume_dir,
        fingerprint=fingerprint,
    )
    for epoch in range(run.start(), config.epochs + 1):
        started = time.perf_counter()
        train_loss, _ = train_one_epoch(
            model,
            loader,
            lambda batch: (batch[0].to(device), batch[1].to(device)),
            loss_fn,
            optimiser,
            run.scaler,
            device,
            schedule,
            f"segmenter epoch {epoch}/{config.epochs}",
            dtype=dtype,
        )
        val_dice = mean_dice(predict_probabilities(model, val[0], device, config.batch_size, dtype=dtype), val[1])
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_dice": val_dice,
            "epoch_seconds": time.perf_counter() - started,
        }
        run.offer(val_dice, meta | {"epoch": epoch, "val_dice": val_dice})
        row["best_val_dice"] = run.best
        run.end_epoch(row)
        tqdm.write(
            f"segmenter epoch {epoch}: loss {row['train_loss']:.4f}, val Dice {val_dice:.4f} (best {run.best:.4f})"
        )
    return pd.DataFrame(run.history)
