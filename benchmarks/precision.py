"""fp32 against bf16 autocast for the trained segmenter, side by side in one process: inference
speed and Dice on the lung set's held-out slices, training-step speed on its training slices,
how far the bf16 masks are from the fp32 ones, and the registered pipeline (``models/pipeline``)
on COVID-CT's test scans with its segmenter in each precision: scans/s, test AUC, the largest
score difference. This is what ``precision: auto`` rests on.

    python benchmarks/precision.py --rounds 5 --batches 4

Run from the repository root after ``dvc repro``; writes
``reports/benchmarks/precision.json``. ``native_bf16`` says whether this CPU does bf16 in
hardware: where it does not, bf16 is emulated and ``auto`` keeps fp32.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from side_by_side import alternate, save
from torch.utils.data import DataLoader

from covidct.config import PreprocessConfig, SegmenterConfig, load_params
from covidct.metrics import binary_metrics, dice_score
from covidct.paths import COVID_CT_SPLIT, PIPELINE, SEGMENTER, raw
from covidct.predict import load_pipeline
from covidct.runtime import configure_threads, grad_scaler, native_cpu_bf16, select_device
from covidct.segmentation.data import load_lung_split
from covidct.segmentation.inference import predict_probabilities
from covidct.segmentation.losses import FocalTverskyLoss
from covidct.segmentation.model import build_segmenter, load_segmenter
from covidct.segmentation.train import SliceDataset, segmentation_augmentation
from covidct.training_loop import train_one_epoch

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4, help="training batches per round")
    args = parser.parse_args()
    root = Path.cwd()
    params = load_params(root / "params.yaml")
    pre, config = PreprocessConfig.of(params), SegmenterConfig.of(params)
    device, threads = select_device(), configure_threads()
    model, _ = load_segmenter(root / SEGMENTER, device)
    _, test_images, test_masks, _ = load_lung_split(root, "test", pre)
    _, train_images, train_masks, _ = load_lung_split(root, "train", pre)

    def inference(name: str) -> Callable[[], float]:
        def run() -> float:
            started = time.perf_counter()
            predict_probabilities(model, test_images, device, config.batch_size, dtype=DTYPES[name])
            return len(test_images) / (time.perf_counter() - started)

        return run

    n = args.batches * config.batch_size
    loader = DataLoader(
        SliceDataset(train_images[:n], train_masks[:n], segmentation_augmentation(config.seed)),
        batch_size=config.batch_size,
        shuffle=True,
    )
    loss_fn = FocalTverskyLoss(config.tversky_alpha, config.tversky_beta, config.tversky_gamma)
    nets = {name: build_segmenter(config.channels).to(device) for name in DTYPES}
    optimisers = {name: torch.optim.Adam(net.parameters(), lr=config.lr) for name, net in nets.items()}

    def training(name: str) -> Callable[[], float]:
        def run() -> float:
            started = time.perf_counter()
            to_device = lambda b: (b[0].to(device), b[1].to(device))  # noqa: E731
            scaler = grad_scaler(device, DTYPES[name])
            _, seen = train_one_epoch(
                nets[name], loader, to_device, loss_fn, optimisers[name], scaler, device, desc=name, dtype=DTYPES[name]
            )
            return seen / (time.perf_counter() - started)

        return run

    result = {
        "channels": list(config.channels),
        "size": pre.size,
        "threads": threads,
        "device": str(device),
        "native_bf16": native_cpu_bf16(),
    }
    result["inference"] = alternate({name: inference(name) for name in DTYPES}, args.rounds)
    result["training"] = alternate({name: training(name) for name in DTYPES}, args.rounds)
    for part in ("inference", "training"):
        result[part]["bf16_speedup"] = result[part]["bf16_images_per_s"] / result[part]["fp32_images_per_s"]
    masks = {
        name: predict_probabilities(model, test_images, device, config.batch_size, dtype=dtype) > 0.5
        for name, dtype in DTYPES.items()
    }
    for name, predicted in masks.items():
        result[f"{name}_test_dice"] = float(
            np.mean([dice_score(p, m) for p, m in zip(predicted, test_masks, strict=True)])
        )
    result["bf16_vs_fp32_mask_dice"] = float(
        np.mean([dice_score(a, b) for a, b in zip(masks["bf16"], masks["fp32"], strict=True)])
    )
    result["test_slices"] = len(test_images)
    result["pipeline"] = pipeline_side_by_side(root, args.rounds)
    save(result, root / "reports/benchmarks/precision.json")


def pipeline_side_by_side(root: Path, rounds: int) -> dict[str, object]:
    """The registered pipeline on COVID-CT's test scans, its segmenter in fp32 and in bf16 (the
    classifier as registered): speed, test AUC and how far the scores move."""
    pipeline = load_pipeline(str(root / PIPELINE))
    test = pd.read_csv(root / COVID_CT_SPLIT).query("split == 'test'")
    names = list(test["relpath"])
    blobs = [(root / raw("covid-ct") / name).read_bytes() for name in names]
    scores: dict[str, np.ndarray] = {}

    def scan(name: str) -> Callable[[], float]:
        def run() -> float:
            pipeline.segmenter_meta = pipeline.segmenter_meta | {"precision": name}
            started = time.perf_counter()
            predictions = [
                p
                for i in range(0, len(blobs), 64)
                for p in pipeline.predict_encoded(names[i : i + 64], blobs[i : i + 64])
            ]
            scores[name] = np.array([p.probability for p in predictions], dtype=float)
            return len(blobs) / (time.perf_counter() - started)

        return run

    result = alternate({name: scan(name) for name in DTYPES}, rounds, "scans_per_s")
    result["bf16_speedup"] = result["bf16_scans_per_s"] / result["fp32_scans_per_s"]
    labels = test["label"].to_numpy()
    for name, probabilities in scores.items():
        result[f"{name}_test_auc"] = binary_metrics(labels, probabilities, pipeline.threshold)["auc"]
    result["largest_score_difference"] = float(np.abs(scores["bf16"] - scores["fp32"]).max())
    result["label_changes"] = int(
        ((scores["bf16"] >= pipeline.threshold) != (scores["fp32"] >= pipeline.threshold)).sum()
    )
    result["test_scans"] = len(names)
    return result


if __name__ == "__main__":
    main()
