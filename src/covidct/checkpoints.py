"""Weights on disk: a state dict plus plain metadata, loaded with ``weights_only=True`` so a
checkpoint can never run code when it is opened.

The per-epoch resume state of a training run lives here too, outside the DVC outputs
(``.covidct/resume/<stage>/``, git- and dvc-ignored): DVC deletes a stage's outputs before it
re-runs the stage, and a state that must survive that cannot be one of them.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from covidct.atomic import atomic_path

RESUME_ROOT = Path(".covidct/resume")
RESUME_FILE = "state.pt"


def save_state_dict(path: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state_dict, "meta": meta}, tmp)


def save_checkpoint(path: Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    save_state_dict(path, model.state_dict(), meta)


def load_checkpoint(path: Path, device: torch.device, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``what`` names the producing stage for the error message (e.g. "train_segmenter")."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found (run the {what} stage)")
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    return checkpoint["state_dict"], checkpoint["meta"]


def resume_dir(root: Path, stage: str) -> Path:
    """Where a stage keeps its resume state between a kill and the next run."""
    return root / RESUME_ROOT / stage


def save_resume_state(directory: Path, state: dict[str, Any]) -> None:
    """Written through a temporary file and a rename: a kill during the save leaves the previous state."""
    with atomic_path(directory / RESUME_FILE) as tmp:
        torch.save(state, tmp)


def load_resume_state(directory: Path, fingerprint: str) -> dict[str, Any] | None:
    """The saved state if it belongs to this very run (same ``fingerprint``), else None.

    A state from other params, inputs or code is removed, never picked up; an unreadable one
    (which the atomic save should rule out) is treated the same way rather than stopping training.
    """
    path = directory / RESUME_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file means: start afresh
        tqdm.write(f"{path}: unreadable resume state ({type(exc).__name__}: {exc}); starting afresh")
        clear_resume_state(directory)
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        tqdm.write(f"{path}: resume state of another run (different params, inputs or code); starting afresh")
        clear_resume_state(directory)
        return None
    return state


def clear_resume_state(directory: Path) -> None:
    """Remove a run's resume state, with any temporary file a kill during a save left behind."""
    shutil.rmtree(directory, ignore_errors=True)


def clear_stage_resume(root: Path, stage: str) -> None:
    """After a stage succeeded: its resume state, then ``.covidct/resume`` and ``.covidct`` if now empty."""
    clear_resume_state(resume_dir(root, stage))
    for folder in (root / RESUME_ROOT, root / RESUME_ROOT.parent):
        with contextlib.suppress(OSError):
            folder.rmdir()
