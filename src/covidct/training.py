"""The training step both networks share: mixed precision where available, loss scaling, progress."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from covidct.runtime import autocast


def train_one_epoch(
    model: torch.nn.Module,
    batches: Iterable,
    to_device: Callable[[object], tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimiser: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
    desc: str = "train",
) -> tuple[float, int]:
    """One pass over ``batches``; returns the mean loss and the number of images seen.

    The loss is computed in fp32 on the network's output, also under autocast.
    """
    model.train()
    losses, seen = [], 0
    bar = tqdm(batches, desc=desc, unit="batch")
    for batch in bar:
        inputs, targets = to_device(batch)
        optimiser.zero_grad(set_to_none=True)
        with autocast(device):
            outputs = model(inputs)
        loss = loss_fn(outputs.float(), targets)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        if schedule is not None:
            schedule.step()
        losses.append(loss.item())
        seen += len(inputs)
        bar.set_postfix(loss=f"{np.mean(losses):.4f}")
    return float(np.mean(losses)), seen
