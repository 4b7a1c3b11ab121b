"""The classifier's training loop against a bare PyTorch loop on the same model, batch, input
size and threads, measured side by side in one process (alternating rounds, medians).

    python benchmarks/training_throughput.py --rounds 5 --batches 12

The project's loop is the trainer's own epoch (``classifier_epoch``): it decodes nothing (images
are cached), but augments every image (albumentations), normalises on the device and runs
through ``train_one_epoch`` (autocast, GradScaler, progress bar); the bare loop trains on tensors prepared in advance. Run from the
repository root after ``dvc repro prepare_data``; writes ``reports/benchmarks/training_throughput.json``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import pandas as pd
import torch
from side_by_side import alternate, save
from torch.utils.data import DataLoader

from covidct.classification.data import CachedImages, load_resized, paper_augmentation, to_model_input
from covidct.classification.model import build_classifier, normalisation
from covidct.classification.train import classifier_epoch
from covidct.config import ClassifierConfig, load_params
from covidct.paths import COVID_CT_SPLIT as SPLIT
from covidct.paths import raw
from covidct.runtime import configure_threads, grad_scaler, select_device


def bare_round(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], optimiser: torch.optim.Optimizer
) -> float:
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    started = time.perf_counter()
    for inputs, targets in batches:
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs)[:, 0], targets)
        loss.backward()
        optimiser.step()
    return sum(len(x) for x, _ in batches) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=12, help="batches per round")
    args = parser.parse_args()
    root = Path.cwd()
    config = ClassifierConfig.of(load_params(root / "params.yaml"))
    device, threads = select_device(), configure_threads()
    n = args.batches * config.batch_size
    table = pd.read_csv(root / SPLIT).query("split == 'train'").head(n)
    images = load_resized([root / raw("covid-ct") / p for p in table["relpath"]], config.image_size, progress=None)
    labels = table["label"].to_numpy()

    ours = build_classifier(config.model, config.pretrained).to(device).to(memory_format=torch.channels_last)
    bare = copy.deepcopy(ours)
    mean, std = normalisation(ours)
    loader = DataLoader(
        CachedImages(images, labels, paper_augmentation(config.augment, config.seed)),
        batch_size=config.batch_size,
        shuffle=True,
    )
    prepared = [
        (
            to_model_input(torch.from_numpy(images[i : i + config.batch_size])[:, None], mean, std, device),
            torch.tensor(labels[i : i + config.batch_size], dtype=torch.float32, device=device),
        )
        for i in range(0, n, config.batch_size)
    ]
    optimisers = {
        "ours": torch.optim.Adam(ours.parameters(), lr=config.lr),
        "bare": torch.optim.Adam(bare.parameters(), lr=config.lr),
    }
    scaler = grad_scaler(device)

    def covidct_round() -> float:
        started = time.perf_counter()
        _, seen = classifier_epoch(ours, loader, optimisers["ours"], scaler, device, (mean, std), "covidct loop")
        return seen / (time.perf_counter() - started)

    result = {
        "model": config.model,
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "threads": threads,
        "device": str(device),
    }
    result |= alternate(
        {"bare": lambda: bare_round(bare, prepared, optimisers["bare"]), "covidct": covidct_round}, args.rounds
    )
    result["ratio"] = result["covidct_images_per_s"] / result["bare_images_per_s"]
    save(result, root / "reports/benchmarks/training_throughput.json")


if __name__ == "__main__":
    main()
