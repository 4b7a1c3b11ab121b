"""What training both networks share: the step (mixed precision where available, loss scaling,
progress) and the epoch bookkeeping (best weights, history, a resume state after every epoch)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from covidct.checkpoints import load_resume_state, save_resume_state, save_state_dict
from covidct.runtime import autocast, restore_rng_state, rng_state

STATE_FORMAT = 1  # bump when the resume state's layout changes: older states then never match
LIBRARIES = ("torch", "numpy", "albumentations", "timm", "monai")


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
    after_step: Callable[[], None] | None = None,
    dtype: torch.dtype | None | str = "auto",
) -> tuple[float, int]:
    """One pass over ``batches``; returns the mean loss and the number of images seen.

    The loss is computed in fp32 on the network's output, also under autocast. ``after_step``
    runs after every optimiser step (a weight average's update); ``dtype``: the autocast's
    (:func:`covidct.runtime.autocast_dtype`).
    """
    model.train()
    losses, seen = [], 0
    bar = tqdm(batches, desc=desc, unit="batch")
    for batch in bar:
        inputs, targets = to_device(batch)
        optimiser.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            outputs = model(inputs)
        loss = loss_fn(outputs.float(), targets)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        if schedule is not None:
            schedule.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
        seen += len(inputs)
        bar.set_postfix(loss=f"{np.mean(losses):.4f}")
    return float(np.mean(losses)), seen


def run_fingerprint(settings: dict[str, Any], arrays: Sequence[np.ndarray], modules: Sequence[str]) -> str:
    """A hash of everything that decides a run's trajectory: its settings, its input arrays, the
    source of the modules that train it and the library versions. A resume state is picked up
    only by a run with the same fingerprint, so one from other params or data never is."""
    digest = hashlib.sha256(json.dumps({"format": STATE_FORMAT, **settings}, sort_keys=True, default=str).encode())
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    for name in modules:
        spec = importlib.util.find_spec(name)
        digest.update(Path(spec.origin).read_bytes() if spec is not None and spec.origin else name.encode())
    for library in LIBRARIES:
        try:
            digest.update(f"{library}={importlib.metadata.version(library)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{library}=none".encode())
    return digest.hexdigest()


#: History columns measured by the clock: logged to MLflow per epoch, never written to a tracked
#: file, so two runs of the same training write the same bytes.
TIMING_COLUMNS = ("epoch_seconds", "train_images_per_s")


def tracked_history(history: pd.DataFrame) -> pd.DataFrame:
    """The history as a DVC output holds it: every column but the wall-clock ones."""
    return history.drop(columns=[c for c in TIMING_COLUMNS if c in history.columns])


def _plain(value: Any) -> Any:
    """numpy scalars to Python ones, so the history loads with ``weights_only=True``."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value.item() if isinstance(value, np.generic) else value


@dataclass(kw_only=True)  # eleven settings: each named where a run is made
class TrainingRun:
    """The bookkeeping around the epochs of one training run.

    Keeps the best validation weights (written to ``checkpoint``) and the history; with a
    ``resume_dir`` it also writes, after every finished epoch, everything the next epoch
    depends on (weights, their running average, optimiser, schedule, scaler, best weights and
    score, history, and every random stream), so a killed run started again with the same fingerprint carries on
    from the last finished epoch and ends with the weights an uninterrupted run would have.
    """

    model: torch.nn.Module
    optimiser: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: DataLoader
    device: torch.device
    checkpoint: Path
    best: float
    on_epoch: Callable[[dict], None]
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None
    resume_dir: Path | None = None
    fingerprint: str | None = None
    history: list[dict] = field(default_factory=list)
    best_weights: dict[str, Any] | None = None
    averaged: torch.nn.Module | None = None  # a running average of the weights: scored and kept in their place

    @property
    def scored(self) -> torch.nn.Module:
        """The weights validation scores and :meth:`offer` keeps: the average's when there is one."""
        return self.model if self.averaged is None else self.averaged

    def __post_init__(self) -> None:
        if self.resume_dir is not None and self.fingerprint is None:
            raise ValueError("a resumable run needs a fingerprint of its settings and inputs")

    @property
    def augmentation(self) -> object | None:
        return getattr(self.loader.dataset, "transform", None)

    def start(self) -> int:
        """The first epoch to run: 1, or the one after the last finished epoch of a matching resume
        state, after restoring that state, rewriting the best checkpoint (DVC deleted it before
        re-running the stage) and replaying the finished epochs' rows to ``on_epoch``."""
        if self.resume_dir is None:
            return 1
        state = load_resume_state(self.resume_dir, self.fingerprint)
        if state is None:
            return 1
        self.model.load_state_dict(state["model"])
        if self.averaged is not None:
            self.averaged.load_state_dict(state["averaged"])
        self.optimiser.load_state_dict(state["optimiser"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.history, self.best, self.best_weights = list(state["history"]), state["best_score"], state["best"]
        if self.best_weights is not None:
            save_state_dict(self.checkpoint, self.best_weights["state_dict"], self.best_weights["meta"])
        for row in self.history:
            self.on_epoch(row)
        # last, so nothing above (the callback included) moves a random stream
        restore_rng_state(state["rng"], self.device, self.loader.generator, self.augmentation)
        tqdm.write(f"resuming after epoch {state['epoch']} from {self.resume_dir}")
        return state["epoch"] + 1

    def offer(self, score: float, meta: dict[str, Any]) -> bool:
        """Keep the weights if ``score`` beats the best so far; True if it did."""
        if not score > self.best:
            return False
        self.best = score
        state_dict = self.scored.state_dict()
        save_state_dict(self.checkpoint, state_dict, meta)
        if self.resume_dir is not None:
            self.best_weights = {
                "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()},
                "meta": _plain(meta),
            }
        return True

    def end_epoch(self, row: dict[str, Any]) -> None:
        """Record a finished epoch, report it, then save the resume state (after the callback, so
        the saved random streams are exactly those the next epoch starts from)."""
        self.history.append(row)
        self.on_epoch(row)
        if self.resume_dir is not None:
            save_resume_state(self.resume_dir, self.state(int(row["epoch"])))

    def state(self, epoch: int) -> dict[str, Any]:
        """Plain types and tensors only: it is read back with ``torch.load(weights_only=True)``."""
        return {
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "history": [_plain(row) for row in self.history],
            "best_score": float(self.best),
            "best": self.best_weights,
            "model": self.model.state_dict(),
            "averaged": self.averaged.state_dict() if self.averaged is not None else None,
            "optimiser": self.optimiser.state_dict(),
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(self.device, self.loader.generator, self.augmentation),
        }
