"""The segmenter's training epoch with NCHW weights against channels-last weights (what
``build_segmenter`` now returns), side by side in one process: same slices, augmentation,
loss, batch and threads, alternating rounds, medians.

    python benchmarks/segmenter_training.py --rounds 5 --batches 8

Each round is the stage's own ``train_one_epoch`` over ``--batches`` batches of real lung-set
training slices. Run from the repository root after ``dvc repro prepare_data``; writes
``reports/benchmarks/segmenter_training.json``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from side_by_side import alternate, save
from torch.utils.data import DataLoader

from covidct.config import PreprocessConfig, SegmenterConfig, load_params
from covidct.runtime import configure_threads, grad_scaler, select_device
from covidct.segmentation.data import load_lung_split
from covidct.segmentation.losses import FocalTverskyLoss
from covidct.segmentation.model import build_segmenter
from covidct.segmentation.train import SliceDataset, segmentation_augmentation
from covidct.training_loop import train_one_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=8, help="batches per round")
    args = parser.parse_args()
    root = Path.cwd()
    params = load_params(root / "params.yaml")
    pre, config = PreprocessConfig.of(params), SegmenterConfig.of(params)
    device, threads = select_device(), configure_threads()
    _, images, masks, _ = load_lung_split(root, "train", pre)
    n = args.batches * config.batch_size
    loader = DataLoader(
        SliceDataset(images[:n], masks[:n], segmentation_augmentation(config.seed)),
        batch_size=config.batch_size,
        shuffle=True,
    )
    loss_fn = FocalTverskyLoss(config.tversky_alpha, config.tversky_beta, config.tversky_gamma)
    torch.manual_seed(config.seed)
    channels_last = build_segmenter(config.channels).to(device)
    nchw = build_segmenter(config.channels).to(device).to(memory_format=torch.contiguous_format)
    nchw.load_state_dict(channels_last.state_dict())
    models = {"nchw": nchw, "channels_last": channels_last}
    optimisers = {name: torch.optim.Adam(model.parameters(), lr=config.lr) for name, model in models.items()}
    scaler = grad_scaler(device)

    def one_round(name: str) -> Callable[[], float]:
        def run() -> float:
            started = time.perf_counter()
            _, seen = train_one_epoch(
                models[name],
                loader,
                lambda b: (b[0].to(device), b[1].to(device)),
                loss_fn,
                optimisers[name],
                scaler,
                device,
                desc=name,
            )
            return seen / (time.perf_counter() - started)

        return run

    result = {
        "channels": list(config.channels),
        "size": pre.size,
        "batch_size": config.batch_size,
        "threads": threads,
        "device": str(device),
    }
    result |= alternate({name: one_round(name) for name in models}, args.rounds)
    result["speedup"] = result["channels_last_images_per_s"] / result["nchw_images_per_s"]
    save(result, root / "reports/benchmarks/segmenter_training.json")


if __name__ == "__main__":
    main()
