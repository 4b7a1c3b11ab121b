"""Classifier inputs: every image decoded and resized once into memory, augmented per epoch.

Decoding a PNG/JPEG of up to 1671 px costs more than augmenting a 224 px array, so the
cache keeps training bound by the network, not by the decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from timm.data import Mixup
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from covidct.config import AugmentConfig
from covidct.images import read_grayscale


def resize_for_classifier(gray: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxW -> uint8 ``size`` x ``size``; area interpolation when shrinking avoids aliasing.

    Training and the registered pipeline both call this, so a scan is scored on the same pixels.
    """
    interpolation = cv2.INTER_AREA if min(gray.shape) >= size else cv2.INTER_LINEAR
    return cv2.resize(gray, (size, size), interpolation=interpolation)


def load_resized(paths: Sequence[Path], size: int, progress: str | None = "decode") -> np.ndarray:
    """uint8 (N, size, size) grayscale, decoded and resized once."""
    out = np.empty((len(paths), size, size), dtype=np.uint8)
    for i, path in enumerate(tqdm(paths, desc=progress, unit="img", disable=progress is None)):
        out[i] = resize_for_classifier(read_grayscale(path), size)
    return out


def paper_augmentation(config: AugmentConfig, seed: int) -> A.Compose:
    """The paper's label-safe augmentation (scale +-0.1, rotation under 5 degrees, horizontal
    flip), optionally with a shift and a brightness/contrast change: moves that keep every
    lesion in the picture, where crops and cut-outs could remove the only one. Optionally, half
    the time each, down- and up-sampling and JPEG re-encoding: the sources differ in resolution
    (CC-CCII's 128 px) and format (COVID-CT's figures are JPEG), which a model can otherwise tell
    them apart by."""
    shift = {"translate_percent": (-config.translate, config.translate)} if config.translate else {}
    transforms = [
        A.Affine(
            scale=(1 - config.scale, 1 + config.scale),
            rotate=(-config.rotate, config.rotate),
            **shift,
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            p=1.0,
        ),
        A.HorizontalFlip(p=config.hflip),
    ]
    if config.brightness_contrast:  # only when asked: the paper's transforms keep their random streams
        limit = config.brightness_contrast
        transforms.append(A.RandomBrightnessContrast(brightness_limit=limit, contrast_limit=limit, p=1.0))
    if config.downscale:
        linear = {"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR}
        transforms.append(A.Downscale(scale_range=(config.downscale, 1.0), interpolation_pair=linear, p=0.5))
    if config.jpeg_quality:
        transforms.append(A.ImageCompression(quality_range=(config.jpeg_quality, 100), p=0.5))
    return A.Compose(transforms, seed=seed)


# (normalised batch, 0/1 labels) -> (mixed batch, soft labels)
Mixing = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def batch_mixing(config: AugmentConfig) -> Mixing | None:
    """timm's mixup / CutMix on a normalised batch and its 0/1 labels, or None when both are off.

    A mixed image's label is the COVID share of what it shows, so a blend of two sources' slices
    cannot be told apart by its source: a leave-one-source-out candidate. timm pairs image i with
    image n-1-i (the balanced sampler has already shuffled), which needs an even batch, so an odd
    one (a split smaller than the batch) is left unmixed. Draws come from numpy's global stream,
    which a resumed run restores.
    """
    if not (config.mixup or config.cutmix):
        return None
    mixer = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=0.0, num_classes=2)

    def mix(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(inputs) % 2:
            return inputs, labels
        mixed, targets = mixer(inputs, labels.long())
        return mixed, targets[:, 1]

    return mix


class CachedImages(Dataset):
    """uint8 (H, W) images and 0/1 labels -> (1, H, W) uint8 tensors; normalised on the device."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: A.Compose | None = None) -> None:
        self.images, self.labels, self.transform = images, labels.astype(np.float32), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(image))[None], torch.tensor(self.labels[index])


def to_model_input(
    batch: torch.Tensor, mean: Sequence[float], std: Sequence[float], device: torch.device
) -> torch.Tensor:
    """uint8 (B, 1, H, W) -> normalised float (B, 3, H, W), channels-last, on ``device``.

    The grey CT is repeated over the 3 channels so ImageNet-shaped weights fit unchanged.
    """
    x = batch.to(device, non_blocking=True).float().div_(255.0).expand(-1, 3, -1, -1)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous(memory_format=torch.channels_last)
